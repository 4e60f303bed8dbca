//! The worker's Prometheus metrics.

use rbee_engine::{EngineLoad, StepObserver, StepReport};
use rbee_metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};

/// Sequences per batch step.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Per-token latency is much finer than request latency.
const TOKEN_BUCKETS: &[f64] = &[
    0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    /// Finished requests by outcome: a stop reason, `error`, `rejected` (busy, loading,
    /// draining) or `invalid`.
    pub requests: Counter,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub request_duration: Histogram,
    pub cancellations: Counter,
    pub model_load_seconds: Gauge,
    pub busy: Gauge,
    pub slots: Gauge,
    /// Sequences by state: `running` (in a slot) or `waiting` (for room in the KV pool).
    pub sequences: Gauge,
    pub batch_size: Histogram,
    pub step_seconds: Histogram,
    /// KV pool positions: `total`, `reserved` (running sequences), `cached` (prefix cache).
    pub kv_pool: Gauge,
    pub cached_prompt_tokens: Counter,
    pub context_length: Gauge,
    pub auth_failures: Counter,
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        r.build_info("rbee_worker_build_info", env!("CARGO_PKG_VERSION"));
        Self {
            requests: r.counter(
                "rbee_worker_requests_total",
                "Inference requests by outcome (stop reason, error, rejected, invalid)",
                &["outcome"],
            ),
            prompt_tokens: r.counter(
                "rbee_worker_prompt_tokens_total",
                "Prompt tokens processed",
                &[],
            ),
            generated_tokens: r.counter(
                "rbee_worker_generated_tokens_total",
                "Tokens generated",
                &[],
            ),
            time_to_first_token: r.histogram(
                "rbee_worker_time_to_first_token_seconds",
                "From request accepted to first generated token",
                &[],
                LATENCY_BUCKETS,
            ),
            inter_token: r.histogram(
                "rbee_worker_inter_token_seconds",
                "Time between consecutive generated tokens",
                &[],
                TOKEN_BUCKETS,
            ),
            request_duration: r.histogram(
                "rbee_worker_request_duration_seconds",
                "From request accepted to the end of its stream",
                &[],
                LATENCY_BUCKETS,
            ),
            cancellations: r.counter(
                "rbee_worker_cancellations_total",
                "Generations stopped early by a client disconnect, a cancel call or shutdown",
                &[],
            ),
            model_load_seconds: r.gauge(
                "rbee_worker_model_load_seconds",
                "Seconds it took to load the model",
                &[],
            ),
            busy: r.gauge(
                "rbee_worker_busy",
                "1 while every generation slot is taken, else 0",
                &[],
            ),
            slots: r.gauge(
                "rbee_worker_slots",
                "Sequences the worker generates together",
                &[],
            ),
            sequences: r.gauge(
                "rbee_worker_sequences",
                "Sequences by state: running (in a slot) or waiting (for KV pool room)",
                &["state"],
            ),
            batch_size: r.histogram(
                "rbee_worker_batch_size",
                "Sequences in each batched forward pass",
                &[],
                BATCH_BUCKETS,
            ),
            step_seconds: r.histogram(
                "rbee_worker_step_seconds",
                "Duration of each batched forward pass",
                &[],
                TOKEN_BUCKETS,
            ),
            kv_pool: r.gauge(
                "rbee_worker_kv_pool_tokens",
                "KV pool positions: total, reserved by running sequences, cached for prefix reuse",
                &["state"],
            ),
            cached_prompt_tokens: r.counter(
                "rbee_worker_prompt_tokens_cached_total",
                "Prompt tokens whose attention state was reused from the prefix cache",
                &[],
            ),
            context_length: r.gauge(
                "rbee_worker_context_length",
                "Context limit enforced per request (prompt + max_tokens)",
                &[],
            ),
            auth_failures: r.counter(
                "rbee_worker_auth_failures_total",
                "Requests refused for a missing or wrong bearer token",
                &[],
            ),
            registry: r,
        }
    }
}

impl WorkerMetrics {
    /// Sets the gauges that follow the engine's load (at scrape time).
    pub fn record_load(&self, l: &EngineLoad) {
        self.sequences.set(&["running"], l.running as f64);
        self.sequences.set(&["waiting"], l.waiting as f64);
        self.kv_pool.set(&["total"], l.kv_total_tokens as f64);
        self.kv_pool.set(&["reserved"], l.kv_reserved_tokens as f64);
        self.kv_pool.set(&["cached"], l.kv_cached_tokens as f64);
    }
}

impl StepObserver for WorkerMetrics {
    fn on_step(&self, r: &StepReport) {
        self.batch_size.observe(&[], r.sequences as f64);
        self.step_seconds.observe(&[], r.seconds);
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
