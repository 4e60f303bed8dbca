//! The operator documents against the code: every error code explained, every metric listed
//! (scraped from live daemons), the alert rules and dashboard using only real metrics, every
//! route with a curl example that runs against a live stack, and the systemd units verified.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use rbee_test_harness::hub::{HubDouble, HubFile};
use rbee_test_harness::{
    Daemon, HiveOptions, QueenOptions, WorkerOptions, promtool_check_metrics, temp_dir, test_model,
    workspace_binary,
};
use serde_json::{Value, json};

const CLIENT: &str = "docs-client-token-0123456789";
const JOIN: &str = "docs-join-token-0123456789ab";
const HIVE: &str = "docs-hive-token-0123456789ab";
const WORKER: &str = "docs-worker-token-0123456789";

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn read_doc(name: &str) -> String {
    std::fs::read_to_string(docs().join(name)).unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

/// The text under each `## ` heading, by heading.
fn sections(doc: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            if let Some((k, v)) = current.take() {
                out.insert(k, v);
            }
            current = Some((h.trim().to_owned(), String::new()));
        } else if let Some((_, v)) = current.as_mut() {
            v.push_str(line);
            v.push('\n');
        }
    }
    if let Some((k, v)) = current {
        out.insert(k, v);
    }
    out
}

#[test]
fn troubleshooting_explains_every_error_code_and_no_other() {
    let doc = read_doc("TROUBLESHOOTING.md");
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.strip_suffix('`'))
        .map(str::to_owned)
        .collect();
    let served: BTreeSet<String> = rbee_api::codes::ALL.iter().map(|c| c.to_string()).collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/TROUBLESHOOTING.md: codes without a section {missing:?}; sections for codes the daemons never send {extra:?}"
    );
}

#[test]
fn systemd_units_verify_without_any_output() {
    let dir = temp_dir("units");
    for (unit, binary) in [
        ("queen-rbee.service", "queen-rbee"),
        ("rbee-hive.service", "rbee-hive"),
    ] {
        let text = std::fs::read_to_string(docs().join("systemd").join(unit)).unwrap();
        // The units name the installed path; point it at this build's binary.
        let installed = format!("/usr/local/bin/{binary}");
        assert!(text.contains(&installed), "{unit} runs {installed}");
        let local = workspace_binary(binary).display().to_string();
        std::fs::write(dir.join(unit), text.replace(&installed, &local)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join(unit))
            .output()
            .expect("systemd-analyze is needed (apt-get install systemd); `cargo xtask test` installs it");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {said}"
        );
    }
}

/// A queen with an admin client token, one hive joined to it (hub: a local double serving
/// `HUB_MODEL`), and a standalone worker.
struct Stack {
    queen: Daemon,
    hive: Daemon,
    worker: Daemon,
    _hub: HubDouble,
}

const HUB_MODEL: &str = "hf:acme/tiny-GGUF:tiny.Q4_1.gguf";

async fn stack() -> Stack {
    let hub = HubDouble::start(vec![HubFile::new(
        "acme/tiny-GGUF",
        "tiny.Q4_1.gguf",
        (0..2_000_000u32).map(|i| (i % 251) as u8).collect(),
    )])
    .await
    .unwrap();
    let queen = Daemon::queen(
        QueenOptions::cluster(("ops", CLIENT), true, JOIN, HIVE),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let model_dir = test_model().parent().unwrap().to_path_buf();
    let hive = Daemon::hive(
        HiveOptions {
            // Downloads land in the first directory: a fresh one, not the model cache.
            model_dirs: vec![temp_dir("docs-models"), model_dir],
            ..HiveOptions::joined(&queen.base_url, "hive-1", HIVE, JOIN)
        }
        .env("HUB__ENDPOINT", hub.endpoint())
        // One process per request, so the spawn examples may start more copies of the model
        // than the chat examples already did (with batching workers, the hive refuses that).
        .env("WORKERS__PARALLEL", 1),
    )
    .await
    .unwrap();
    let worker = Daemon::worker(
        WorkerOptions::new(workspace_binary("llm-worker-rbee"), test_model()).token(WORKER),
    )
    .await
    .unwrap();
    queen
        .wait_hives_up(&reqwest::Client::new(), 1)
        .await
        .unwrap();
    Stack {
        queen,
        hive,
        worker,
        _hub: hub,
    }
}

/// Metric families a daemon serves: name → type, with the label names seen on its series.
fn served_families(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            out.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.split([' ', '{']).next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                series
                    .strip_suffix(s)
                    .filter(|base| out.get(*base).is_some_and(|(k, _)| k == "histogram"))
            })
            .unwrap_or(series);
        let labels: BTreeSet<String> = line
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(inner, _)| {
                inner
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_owned()))
                    .filter(|k| k != "le" && !k.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if let Some((_, seen)) = out.get_mut(family) {
            seen.extend(labels);
        }
    }
    out
}

/// Metric rows of one section of MONITORING.md: name → (type, labels).
fn documented_families(section: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() < 4 {
            continue;
        }
        let Some(name) = cells[0].strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        let labels: BTreeSet<String> = cells[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "—" && l != "-")
            .collect();
        out.insert(name.to_owned(), (cells[1].to_owned(), labels));
    }
    out
}

/// Every `rbee_*` metric name an expression mentions, histogram suffixes stripped.
fn metric_names(expr: &str, histograms: &BTreeSet<String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("rbee_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| histograms.contains(*b)))
                .unwrap_or(name);
            names.insert(base.to_owned());
        }
        i = end;
    }
    names
}

fn promtool(args: &[&str], dir: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool is needed (apt-get install prometheus); `cargo xtask test` installs it");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn scrape(c: &reqwest::Client, url: String, token: Option<&str>) -> String {
    let mut req = c.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

#[tokio::test]
async fn monitoring_lists_exactly_the_metrics_the_live_daemons_serve() {
    let s = stack().await;
    let c = reqwest::Client::new();
    // Traffic, so labelled series and histograms exist: through the whole chain (the hive
    // spawns a worker) and straight to the standalone worker.
    let chat = c
        .post(s.queen.url("/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(
            &json!({"model": "smollm2", "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let status = chat.status();
    let body = chat.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let direct = s
        .worker
        .post(
            &c,
            "/v1/inference",
            &json!({"prompt": "Hi", "max_tokens": 4}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    let _ = direct.bytes().await;
    let doc = read_doc("MONITORING.md");
    let sections = sections(&doc);
    let mut documented_all: BTreeMap<String, String> = BTreeMap::new();
    let mut problems = Vec::new();
    for (daemon, text) in [
        (
            "llm-worker-rbee",
            scrape(&c, s.worker.url("/metrics"), None).await,
        ),
        ("rbee-hive", scrape(&c, s.hive.url("/metrics"), None).await),
        (
            "queen-rbee",
            scrape(&c, s.queen.url("/metrics"), None).await,
        ),
    ] {
        promtool_check_metrics(&text);
        let served = served_families(&text);
        let section = sections
            .get(daemon)
            .unwrap_or_else(|| panic!("MONITORING.md has no `## {daemon}` section"));
        let documented = documented_families(section);
        for (name, (kind, labels)) in &served {
            match documented.get(name) {
                None => problems.push(format!("{daemon}: `{name}` is served but not documented")),
                Some((dkind, dlabels)) => {
                    if dkind != kind {
                        problems.push(format!(
                            "{daemon}: `{name}` is a {kind}, documented as {dkind}"
                        ));
                    }
                    // Label names are checked where a series shows them.
                    if !labels.is_empty() && labels != dlabels {
                        problems.push(format!(
                            "{daemon}: `{name}` has labels {labels:?}, documented {dlabels:?}"
                        ));
                    }
                }
            }
        }
        for name in documented.keys() {
            if !served.contains_key(name) {
                problems.push(format!("{daemon}: `{name}` is documented but not served"));
            }
        }
        documented_all.extend(documented.into_iter().map(|(k, (t, _))| (k, t)));
    }
    assert!(
        problems.is_empty(),
        "docs/MONITORING.md:\n{}",
        problems.join("\n")
    );

    // Alert rules and dashboard: valid, and only metrics that exist.
    let monitoring = docs().join("monitoring");
    promtool(&["check", "rules", "alerts.yml"], &monitoring);
    promtool(&["test", "rules", "alerts_test.yml"], &monitoring);
    promtool(&["check", "config", "prometheus.yml"], &monitoring);
    let histograms: BTreeSet<String> = documented_all
        .iter()
        .filter(|(_, t)| *t == "histogram")
        .map(|(k, _)| k.clone())
        .collect();
    let alerts = std::fs::read_to_string(monitoring.join("alerts.yml")).unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring.join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    for (source, text) in std::iter::once(("alerts.yml", alerts.as_str()))
        .chain(exprs.iter().map(|e| ("grafana-dashboard.json", e.as_str())))
    {
        for name in metric_names(text, &histograms) {
            assert!(
                documented_all.contains_key(&name),
                "docs/monitoring/{source} uses `{name}`, which no daemon serves"
            );
        }
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The fenced blocks of a Markdown document: (info string, body, heading above it).
fn fenced_blocks(doc: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut open: Option<(String, String)> = None;
    for line in doc.lines() {
        match open.as_mut() {
            Some((info, body)) => {
                if line.trim_start().starts_with("```") {
                    out.push((info.clone(), std::mem::take(body), heading.clone()));
                    open = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
            None => {
                if let Some(info) = line.trim_start().strip_prefix("```") {
                    open = Some((info.trim().to_owned(), String::new()));
                } else if let Some(h) = line.strip_prefix("### ") {
                    heading = h.trim().to_owned();
                }
            }
        }
    }
    out
}

#[test]
fn api_md_has_a_section_for_every_route_of_every_daemon() {
    let doc = read_doc("API.md");
    let sections = sections(&doc);
    let mut problems = Vec::new();
    for (daemon, routes) in [
        ("queen-rbee", rbee_queen_core::api::router_routes()),
        ("rbee-hive", rbee_hive_core::server::router_routes()),
        ("llm-worker-rbee", rbee_worker::router_routes()),
    ] {
        let Some(section) = sections.get(daemon) else {
            problems.push(format!("no `## {daemon}` section"));
            continue;
        };
        let headings: BTreeSet<String> = section
            .lines()
            .filter_map(|l| l.strip_prefix("### "))
            .map(|h| h.trim().to_owned())
            .collect();
        let served: BTreeSet<String> = routes.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
        for r in served.difference(&headings) {
            problems.push(format!("{daemon}: `{r}` has no `### {r}` section"));
        }
        for h in headings.difference(&served) {
            problems.push(format!("{daemon}: `### {h}` is not a route"));
        }
        let blocks = fenced_blocks(section);
        for r in &served {
            if !blocks.iter().any(|(info, _, h)| info == "sh" && h == r) {
                problems.push(format!("{daemon}: `{r}` has no runnable ```sh example"));
            }
        }
    }
    assert!(problems.is_empty(), "docs/API.md:\n{}", problems.join("\n"));
}

#[tokio::test]
async fn api_md_examples_run_against_a_live_stack() {
    let s = stack().await;
    let doc = read_doc("API.md");
    let blocks = fenced_blocks(&doc);
    let work = temp_dir("api-examples");
    let mut script = String::from("set -euo pipefail\n");
    let mut expected = Vec::new();
    let mut n = 0;
    for (i, (info, body, heading)) in blocks.iter().enumerate() {
        if info != "sh" {
            continue;
        }
        let out = work.join(format!("block-{n}.out"));
        script.push_str(&format!(
            "echo {n} > {dir}/current\n{{\n{body}}} > {out}\n",
            dir = work.display(),
            out = out.display()
        ));
        // A ```text block right after an example is its exact output.
        if let Some((next_info, next_body, _)) = blocks.get(i + 1)
            && next_info == "text"
        {
            expected.push((n, heading.clone(), out.clone(), next_body.clone()));
        }
        n += 1;
    }
    assert!(n > 0, "docs/API.md has no ```sh examples");
    std::fs::write(work.join("examples.sh"), &script).unwrap();
    // Off the async thread: the hub double answers on this runtime while bash runs.
    let mut bash = Command::new("bash");
    bash.arg(work.join("examples.sh"))
        .current_dir(&work)
        .env("QUEEN", &s.queen.base_url)
        .env("TOKEN", CLIENT)
        .env("JOIN_TOKEN", JOIN)
        .env("HIVE", &s.hive.base_url)
        .env("HIVE_TOKEN", HIVE)
        .env("WORKER", &s.worker.base_url)
        .env("WORKER_TOKEN", WORKER)
        .env("HUB_MODEL", HUB_MODEL);
    let out = tokio::task::spawn_blocking(move || bash.output())
        .await
        .unwrap()
        .unwrap();
    let current = std::fs::read_to_string(work.join("current")).unwrap_or_default();
    assert!(
        out.status.success(),
        "docs/API.md example #{} failed ({}):\n{}\n--- stdout of that example:\n{}",
        current.trim(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(work.join(format!("block-{}.out", current.trim())))
            .unwrap_or_default()
    );
    for (n, heading, path, want) in expected {
        let got = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            got.trim_end(),
            want.trim_end(),
            "docs/API.md example #{n} under `{heading}` printed something else"
        );
    }
    println!("{n} API.md examples ran against the live stack");
}
