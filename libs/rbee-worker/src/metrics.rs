//! The worker's Prometheus metrics.

use rbee_metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};

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
            busy: r.gauge("rbee_worker_busy", "1 while a generation runs, else 0", &[]),
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

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
