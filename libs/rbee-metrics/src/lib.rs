//! A small Prometheus registry: counters, gauges and histograms rendered in
//! the text exposition format 0.0.4.
//!
//! Handles are cheap to clone and share one registry. Misuse (a wrong
//! number of label values, an invalid name, re-registering a name with a
//! different type or labels) is ignored rather than panicking, so metrics
//! can never take the server down.

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard};

/// `Content-Type` for [`Registry::render`] output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets for latencies, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

enum Value {
    Scalar(f64),
    Histogram {
        // Per-bucket (not cumulative) counts; made cumulative when rendering.
        buckets: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    labels: Vec<String>,
    // Upper bounds, sorted and finite; +Inf is implicit.
    buckets: Vec<f64>,
    // Sorted by label values so output is stable.
    series: Vec<(Vec<String>, Value)>,
}

impl Family {
    fn new_value(&self) -> Value {
        match self.kind {
            Kind::Histogram => Value::Histogram {
                buckets: vec![0; self.buckets.len()],
                sum: 0.0,
                count: 0,
            },
            Kind::Counter | Kind::Gauge => Value::Scalar(0.0),
        }
    }

    fn find(&self, label_values: &[&str]) -> Result<usize, usize> {
        self.series.binary_search_by(|(key, _)| {
            key.iter()
                .map(String::as_str)
                .cmp(label_values.iter().copied())
        })
    }

    fn get(&self, label_values: &[&str]) -> Option<&Value> {
        if label_values.len() != self.labels.len() {
            return None;
        }
        self.find(label_values).ok().map(|i| &self.series[i].1)
    }

    /// The series for `label_values`, created on first use; `None` when the
    /// number of values is wrong.
    fn get_or_insert(&mut self, label_values: &[&str]) -> Option<&mut Value> {
        if label_values.len() != self.labels.len() {
            return None;
        }
        let i = match self.find(label_values) {
            Ok(i) => i,
            Err(i) => {
                let key = label_values.iter().map(|s| (*s).to_owned()).collect();
                let value = self.new_value();
                self.series.insert(i, (key, value));
                i
            }
        };
        Some(&mut self.series[i].1)
    }

    fn render(&self, out: &mut String) {
        if !self.help.is_empty() {
            let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(&self.help));
        }
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.as_str());
        for (key, value) in &self.series {
            match value {
                Value::Scalar(v) => {
                    let _ = writeln!(
                        out,
                        "{}{} {}",
                        self.name,
                        LabelSet(&self.labels, key, None),
                        Float(*v)
                    );
                }
                Value::Histogram {
                    buckets,
                    sum,
                    count,
                } => {
                    let mut cumulative = 0u64;
                    for (bound, n) in self.buckets.iter().zip(buckets) {
                        cumulative += n;
                        let le = Float(*bound).to_string();
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {}",
                            self.name,
                            LabelSet(&self.labels, key, Some(&le)),
                            cumulative
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        self.name,
                        LabelSet(&self.labels, key, Some("+Inf")),
                        count
                    );
                    let labels = LabelSet(&self.labels, key, None);
                    let _ = writeln!(out, "{}_sum{} {}", self.name, labels, Float(*sum));
                    let _ = writeln!(out, "{}_count{} {}", self.name, labels, count);
                }
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    families: Vec<Family>,
}

/// A set of metric families. Clones share the same data.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = lock(&self.inner).families.len();
        f.debug_struct("Registry").field("families", &n).finish()
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic elsewhere while holding the lock leaves plain numbers behind;
    // still usable, and metrics must not cascade the panic.
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or finds) a counter family. Names should end in `_total`.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Counter {
        Counter(self.register(name, help, labels, Kind::Counter, &[]))
    }

    /// `<name>{version="..."} 1`: which build a daemon runs, for dashboards and for checking
    /// that an upgrade reached every node.
    pub fn build_info(&self, name: &str, version: &str) {
        self.gauge(
            name,
            "The running build (always 1), labelled with its version.",
            &["version"],
        )
        .set(&[version], 1.0);
    }

    /// Registers (or finds) a gauge family.
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Gauge {
        Gauge(self.register(name, help, labels, Kind::Gauge, &[]))
    }

    /// Registers (or finds) a histogram family with the given upper bucket
    /// bounds; `+Inf` is added automatically, and NaN or infinite bounds
    /// are dropped. Re-registering keeps the first buckets.
    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> Histogram {
        Histogram(self.register(name, help, labels, Kind::Histogram, buckets))
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        kind: Kind,
        buckets: &[f64],
    ) -> Handle {
        let detached = Handle {
            inner: Arc::clone(&self.inner),
            index: None,
        };
        if !valid_metric_name(name) || !valid_label_names(labels, kind) {
            return detached;
        }
        let mut inner = lock(&self.inner);
        if let Some(i) = inner.families.iter().position(|f| f.name == name) {
            let f = &inner.families[i];
            // Same name with another shape would render a broken family.
            if f.kind != kind
                || f.labels
                    .iter()
                    .map(String::as_str)
                    .ne(labels.iter().copied())
            {
                return detached;
            }
            return Handle {
                inner: Arc::clone(&self.inner),
                index: Some(i),
            };
        }
        let mut bounds: Vec<f64> = buckets.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let mut family = Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            labels: labels.iter().map(|s| (*s).to_owned()).collect(),
            buckets: bounds,
            series: Vec::new(),
        };
        // Unlabelled families show a zero sample from the start so
        // dashboards see them before the first update.
        if labels.is_empty() {
            let value = family.new_value();
            family.series.push((Vec::new(), value));
        }
        inner.families.push(family);
        Handle {
            inner: Arc::clone(&self.inner),
            index: Some(inner.families.len() - 1),
        }
    }

    /// All families in the text exposition format, in registration order.
    pub fn render(&self) -> String {
        let inner = lock(&self.inner);
        let mut out = String::new();
        for family in &inner.families {
            family.render(&mut out);
        }
        out
    }
}

/// Shared part of the metric handles. `index: None` marks a handle from a
/// rejected registration: every update is ignored.
#[derive(Clone)]
struct Handle {
    inner: Arc<Mutex<Inner>>,
    index: Option<usize>,
}

impl Handle {
    fn update(&self, label_values: &[&str], f: impl FnOnce(&mut Value)) {
        let Some(index) = self.index else { return };
        let mut inner = lock(&self.inner);
        if let Some(value) = inner
            .families
            .get_mut(index)
            .and_then(|fam| fam.get_or_insert(label_values))
        {
            f(value);
        }
    }

    fn read<T>(&self, label_values: &[&str], f: impl FnOnce(&Value) -> T) -> Option<T> {
        let index = self.index?;
        let inner = lock(&self.inner);
        inner.families.get(index)?.get(label_values).map(f)
    }

    fn remove(&self, label_values: &[&str]) {
        let Some(index) = self.index else { return };
        let mut inner = lock(&self.inner);
        if let Some(fam) = inner.families.get_mut(index) {
            fam.series.retain(|(k, _)| {
                !k.iter()
                    .map(String::as_str)
                    .eq(label_values.iter().copied())
            });
        }
    }

    fn read_scalar(&self, label_values: &[&str]) -> f64 {
        self.read(label_values, |v| match v {
            Value::Scalar(x) => *x,
            Value::Histogram { .. } => 0.0,
        })
        .unwrap_or(0.0)
    }

    fn name(&self) -> String {
        self.index
            .and_then(|i| lock(&self.inner).families.get(i).map(|f| f.name.clone()))
            .unwrap_or_default()
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A monotonically increasing counter family.
#[derive(Clone, Debug)]
pub struct Counter(Handle);

impl Counter {
    /// Adds 1.
    pub fn inc(&self, label_values: &[&str]) {
        self.inc_by(label_values, 1.0);
    }

    /// Adds `v`; negative or NaN values are ignored since counters only go up.
    pub fn inc_by(&self, label_values: &[&str], v: f64) {
        if v.is_nan() || v < 0.0 {
            return;
        }
        self.0.update(label_values, |value| {
            if let Value::Scalar(x) = value {
                *x += v;
            }
        });
    }

    /// The current value; 0 for an untouched label set.
    pub fn get(&self, label_values: &[&str]) -> f64 {
        self.0.read_scalar(label_values)
    }
}

/// A gauge family: a value that can go up and down.
#[derive(Clone, Debug)]
pub struct Gauge(Handle);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, label_values: &[&str], v: f64) {
        self.0.update(label_values, |value| {
            if let Value::Scalar(x) = value {
                *x = v;
            }
        });
    }

    /// Adds `v` (which may be negative).
    pub fn add(&self, label_values: &[&str], v: f64) {
        self.0.update(label_values, |value| {
            if let Value::Scalar(x) = value {
                *x += v;
            }
        });
    }

    /// The current value; 0 for an untouched label set.
    pub fn get(&self, label_values: &[&str]) -> f64 {
        self.0.read_scalar(label_values)
    }

    /// Drops one series, e.g. a worker's when the worker is gone.
    pub fn remove(&self, label_values: &[&str]) {
        self.0.remove(label_values);
    }
}

/// A histogram family.
#[derive(Clone, Debug)]
pub struct Histogram(Handle);

impl Histogram {
    /// Records one observation. NaN is ignored so the sum stays usable.
    pub fn observe(&self, label_values: &[&str], v: f64) {
        if v.is_nan() {
            return;
        }
        let Some(index) = self.0.index else { return };
        let mut inner = lock(&self.0.inner);
        let Some(family) = inner.families.get_mut(index) else {
            return;
        };
        // First bucket whose upper bound is >= v (bounds are inclusive).
        let slot = family.buckets.partition_point(|b| *b < v);
        if let Some(Value::Histogram {
            buckets,
            sum,
            count,
        }) = family.get_or_insert(label_values)
        {
            if let Some(n) = buckets.get_mut(slot) {
                *n += 1;
            }
            *sum += v;
            *count += 1;
        }
    }

    /// Number of observations; 0 for an untouched label set.
    pub fn count(&self, label_values: &[&str]) -> u64 {
        self.0
            .read(label_values, |v| match v {
                Value::Histogram { count, .. } => *count,
                Value::Scalar(_) => 0,
            })
            .unwrap_or(0)
    }

    /// Sum of observations; 0 for an untouched label set.
    pub fn sum(&self, label_values: &[&str]) -> f64 {
        self.0
            .read(label_values, |v| match v {
                Value::Histogram { sum, .. } => *sum,
                Value::Scalar(_) => 0.0,
            })
            .unwrap_or(0.0)
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed (reserved), no duplicates,
/// and no `le` on histograms (it is added per bucket).
fn valid_label_names(labels: &[&str], kind: Kind) -> bool {
    labels.iter().enumerate().all(|(i, name)| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with("__")
            && !(kind == Kind::Histogram && *name == "le")
            && !labels[..i].contains(name)
    })
}

/// `{a="x",b="y"}`, with an optional trailing `le`; empty when no labels.
struct LabelSet<'a>(&'a [String], &'a [String], Option<&'a str>);

impl fmt::Display for LabelSet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let LabelSet(names, values, le) = *self;
        if names.is_empty() && le.is_none() {
            return Ok(());
        }
        f.write_char('{')?;
        let mut first = true;
        let pairs = names
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(String::as_str))
            .chain(le.map(|le| ("le", le)));
        for (name, value) in pairs {
            if !first {
                f.write_char(',')?;
            }
            first = false;
            write!(f, "{name}=\"")?;
            for c in value.chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    '"' => f.write_str("\\\"")?,
                    '\n' => f.write_str("\\n")?,
                    c => f.write_char(c)?,
                }
            }
            f.write_char('"')?;
        }
        f.write_char('}')
    }
}

/// HELP text escapes only backslash and newline.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A float as Prometheus (Go's `ParseFloat`) reads it: `1`, `0.005`,
/// `+Inf`, `-Inf`, `NaN`, and exponent form for extreme magnitudes.
struct Float(f64);

impl fmt::Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v.is_infinite() {
            f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
        } else if v != 0.0 && (v.abs() >= 1e21 || v.abs() < 1e-6) {
            // Plain notation would print hundreds of digits here.
            write!(f, "{v:e}")
        } else {
            write!(f, "{v}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlabelled_families_render_zero_at_once() {
        let reg = Registry::new();
        reg.counter("rbee_requests_total", "Requests served.", &[]);
        reg.gauge("rbee_slots_busy", "Busy slots.", &[]);
        reg.histogram("rbee_wait_seconds", "Queue wait.", &[], &[0.5, 1.0]);
        assert_eq!(
            reg.render(),
            "# HELP rbee_requests_total Requests served.\n\
             # TYPE rbee_requests_total counter\n\
             rbee_requests_total 0\n\
             # HELP rbee_slots_busy Busy slots.\n\
             # TYPE rbee_slots_busy gauge\n\
             rbee_slots_busy 0\n\
             # HELP rbee_wait_seconds Queue wait.\n\
             # TYPE rbee_wait_seconds histogram\n\
             rbee_wait_seconds_bucket{le=\"0.5\"} 0\n\
             rbee_wait_seconds_bucket{le=\"1\"} 0\n\
             rbee_wait_seconds_bucket{le=\"+Inf\"} 0\n\
             rbee_wait_seconds_sum 0\n\
             rbee_wait_seconds_count 0\n"
        );
    }

    #[test]
    fn labelled_families_render_only_touched_sets_sorted() {
        let reg = Registry::new();
        let c = reg.counter(
            "rbee_http_requests_total",
            "HTTP requests.",
            &["route", "code"],
        );
        assert_eq!(
            reg.render(),
            "# HELP rbee_http_requests_total HTTP requests.\n\
             # TYPE rbee_http_requests_total counter\n"
        );
        c.inc(&["/v1/completions", "200"]);
        c.inc(&["/health", "200"]);
        c.inc_by(&["/v1/completions", "200"], 2.5);
        c.inc(&["/v1/completions", "401"]);
        assert_eq!(c.get(&["/v1/completions", "200"]), 3.5);
        assert_eq!(c.get(&["/nowhere", "200"]), 0.0);
        assert_eq!(
            reg.render(),
            "# HELP rbee_http_requests_total HTTP requests.\n\
             # TYPE rbee_http_requests_total counter\n\
             rbee_http_requests_total{route=\"/health\",code=\"200\"} 1\n\
             rbee_http_requests_total{route=\"/v1/completions\",code=\"200\"} 3.5\n\
             rbee_http_requests_total{route=\"/v1/completions\",code=\"401\"} 1\n"
        );
    }

    #[test]
    fn counters_ignore_negative_and_nan() {
        let reg = Registry::new();
        let c = reg.counter("x_total", "X.", &[]);
        c.inc_by(&[], 2.0);
        c.inc_by(&[], -1.0);
        c.inc_by(&[], f64::NAN);
        assert_eq!(c.get(&[]), 2.0);
    }

    #[test]
    fn gauge_set_add_and_special_values() {
        let reg = Registry::new();
        let g = reg.gauge("rbee_temperature", "Temp.", &["device"]);
        g.set(&["gpu0"], 2.0);
        g.add(&["gpu0"], -0.5);
        g.add(&["gpu1"], 0.005);
        g.set(&["gpu2"], f64::INFINITY);
        g.set(&["gpu3"], f64::NAN);
        g.set(&["gpu4"], 1e-9);
        assert_eq!(g.get(&["gpu0"]), 1.5);
        assert_eq!(
            reg.render(),
            "# HELP rbee_temperature Temp.\n\
             # TYPE rbee_temperature gauge\n\
             rbee_temperature{device=\"gpu0\"} 1.5\n\
             rbee_temperature{device=\"gpu1\"} 0.005\n\
             rbee_temperature{device=\"gpu2\"} +Inf\n\
             rbee_temperature{device=\"gpu3\"} NaN\n\
             rbee_temperature{device=\"gpu4\"} 1e-9\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let reg = Registry::new();
        let h = reg.histogram(
            "rbee_latency_seconds",
            "Latency.",
            &["op"],
            &[1.0, 0.1, 2.5],
        );
        for v in [0.05, 0.1, 0.7, 3.0, 100.0] {
            h.observe(&["decode"], v);
        }
        h.observe(&["decode"], f64::NAN);
        assert_eq!(h.count(&["decode"]), 5);
        assert!((h.sum(&["decode"]) - 103.85).abs() < 1e-9);
        assert_eq!(h.count(&["prefill"]), 0);
        let out = reg.render();
        let sum = Float(h.sum(&["decode"])).to_string();
        assert_eq!(
            out,
            format!(
                "# HELP rbee_latency_seconds Latency.\n\
                 # TYPE rbee_latency_seconds histogram\n\
                 rbee_latency_seconds_bucket{{op=\"decode\",le=\"0.1\"}} 2\n\
                 rbee_latency_seconds_bucket{{op=\"decode\",le=\"1\"}} 3\n\
                 rbee_latency_seconds_bucket{{op=\"decode\",le=\"2.5\"}} 3\n\
                 rbee_latency_seconds_bucket{{op=\"decode\",le=\"+Inf\"}} 5\n\
                 rbee_latency_seconds_sum{{op=\"decode\"}} {sum}\n\
                 rbee_latency_seconds_count{{op=\"decode\"}} 5\n"
            )
        );
    }

    #[test]
    fn latency_buckets_render_plainly() {
        let reg = Registry::new();
        let h = reg.histogram("t_seconds", "T.", &[], LATENCY_BUCKETS);
        h.observe(&[], 0.003);
        let out = reg.render();
        let les: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split("le=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert_eq!(
            les,
            [
                "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
                "2.5", "5", "10", "30", "60", "+Inf"
            ]
        );
        assert!(out.contains("t_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(out.contains("t_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(out.contains("t_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(out.contains("t_seconds_sum 0.003\n"));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let reg = Registry::new();
        let g = reg.gauge("esc", "Back\\slash\nnewline \"quotes\" stay.", &["v"]);
        g.set(&["a\\b\"c\nd"], 1.0);
        assert_eq!(
            reg.render(),
            "# HELP esc Back\\\\slash\\nnewline \"quotes\" stay.\n\
             # TYPE esc gauge\n\
             esc{v=\"a\\\\b\\\"c\\nd\"} 1\n"
        );
    }

    #[test]
    fn wrong_label_count_is_ignored() {
        let reg = Registry::new();
        let c = reg.counter("c_total", "C.", &["a"]);
        c.inc(&[]);
        c.inc(&["x", "y"]);
        let h = reg.histogram("h_seconds", "H.", &["a"], &[1.0]);
        h.observe(&[], 1.0);
        assert_eq!(c.get(&[]), 0.0);
        assert_eq!(h.count(&[]), 0);
        assert_eq!(
            reg.render(),
            "# HELP c_total C.\n# TYPE c_total counter\n\
             # HELP h_seconds H.\n# TYPE h_seconds histogram\n"
        );
    }

    #[test]
    fn same_name_returns_same_family() {
        let reg = Registry::new();
        let a = reg.counter("dup_total", "Dup.", &[]);
        let b = reg.counter("dup_total", "Other help.", &[]);
        a.inc(&[]);
        b.inc(&[]);
        assert_eq!(a.get(&[]), 2.0);
        assert_eq!(reg.render().matches("# TYPE dup_total").count(), 1);

        // Another type or label set under the same name is detached.
        let g = reg.gauge("dup_total", "Dup.", &[]);
        g.set(&[], 9.0);
        let c = reg.counter("dup_total", "Dup.", &["x"]);
        c.inc(&["y"]);
        assert_eq!(g.get(&[]), 0.0);
        assert_eq!(
            reg.render(),
            "# HELP dup_total Dup.\n# TYPE dup_total counter\ndup_total 2\n"
        );
    }

    #[test]
    fn invalid_names_are_not_registered() {
        let reg = Registry::new();
        reg.counter("bad-name_total", "Bad.", &[]).inc(&[]);
        reg.counter("9lives_total", "Bad.", &[]).inc(&[]);
        reg.gauge("g", "Bad.", &["__reserved"]).set(&["x"], 1.0);
        reg.gauge("g2", "Bad.", &["a", "a"]).set(&["x", "y"], 1.0);
        reg.histogram("h", "Bad.", &["le"], &[1.0])
            .observe(&["x"], 1.0);
        assert_eq!(reg.render(), "");
    }

    #[test]
    fn clones_share_state_and_survive_poisoning() {
        let reg = Registry::new();
        let c = reg.counter("shared_total", "S.", &[]);
        let clone = reg.clone();
        let c2 = c.clone();
        let poisoner = reg.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.inner.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(reg.inner.is_poisoned());
        c2.inc(&[]);
        assert_eq!(c.get(&[]), 1.0);
        assert!(clone.render().contains("shared_total 1\n"));
    }

    #[test]
    fn empty_help_omits_help_line() {
        let reg = Registry::new();
        reg.gauge("quiet", "", &[]);
        assert_eq!(reg.render(), "# TYPE quiet gauge\nquiet 0\n");
    }

    #[test]
    fn float_formatting() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (2.5, "2.5"),
            (-3.0, "-3"),
            (0.005, "0.005"),
            (1e300, "1e300"),
            (f64::NEG_INFINITY, "-Inf"),
        ];
        for (v, s) in cases {
            assert_eq!(Float(v).to_string(), s);
        }
    }
}
