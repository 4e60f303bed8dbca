//! The queen's Prometheus metrics (`rbee_queen_*`).

use rbee_metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};

pub struct QueenMetrics {
    pub registry: Registry,
    pub requests: Counter,
    pub auth_failures: Counter,
    pub audit_dropped: Counter,
    pub ttft: Histogram,
    pub duration: Histogram,
    pub queue_wait: Histogram,
    pub stage: Histogram,
    pub queue_rejections: Counter,
    pub client_refusals: Counter,
    pub client_tokens: Counter,
    pub streams_cut: Counter,
    pub decisions: Counter,
    pub spawns: Counter,
    pub tokens_in: Counter,
    pub tokens_out: Counter,
    pub upstream_errors: Counter,
    pub retries: Counter,
    pub heartbeats: Counter,
    pub hives: Gauge,
    pub workers: Gauge,
    pub queue_depth: Gauge,
    pub inter_token: Histogram,
    pub inflight: Gauge,
}

impl QueenMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        r.build_info("rbee_queen_build_info", env!("CARGO_PKG_VERSION"));
        Self {
            requests: r.counter(
                "rbee_queen_requests_total",
                "Client requests by route, model, client token name, status and error code.",
                &["route", "model", "client", "status", "code"],
            ),
            auth_failures: r.counter(
                "rbee_queen_auth_failures_total",
                "Requests refused for a missing or wrong token.",
                &[],
            ),
            audit_dropped: r.counter(
                "rbee_queen_audit_records_dropped_total",
                "Audit records dropped because the audit writer's queue was full.",
                &[],
            ),
            ttft: r.histogram(
                "rbee_queen_time_to_first_token_seconds",
                "From request accepted to the first token sent to the client.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            duration: r.histogram(
                "rbee_queen_request_duration_seconds",
                "From request accepted to the last byte sent.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            queue_wait: r.histogram(
                "rbee_queen_queue_wait_seconds",
                "Time a request waited for a worker (including a spawn).",
                &[],
                LATENCY_BUCKETS,
            ),
            stage: r.histogram(
                "rbee_queen_stage_seconds",
                "Where a request's time went, per hop: validation (parsing and checks), schedule (waiting for a worker, spawn included), spawn (the part of it spent on a new worker), load (the new worker's spawn-to-ready, as its hive measured it), worker_queue, prefill and decode (as the worker measured them).",
                &["stage"],
                LATENCY_BUCKETS,
            ),
            queue_rejections: r.counter(
                "rbee_queen_queue_rejections_total",
                "Requests that left the wait for a worker without one: full (429), timeout or spawn_failed (503), deadline (504), cancelled.",
                &["reason"],
            ),
            client_refusals: r.counter(
                "rbee_queen_client_refusals_total",
                "Requests refused by their client token's own limits: max_concurrent, requests_per_minute, tokens_per_minute (429 CLIENT_LIMIT), tokens_per_day (429 BUDGET_EXHAUSTED), model (403 MODEL_NOT_ALLOWED).",
                &["client", "reason"],
            ),
            client_tokens: r.counter(
                "rbee_queen_client_tokens_total",
                "Tokens (prompt + completion) of each client's ended requests, as counted against its limits.",
                &["client"],
            ),
            streams_cut: r.counter(
                "rbee_queen_streams_cut_total",
                "Streams the queen ended early: stalled_reader (the client read nothing for server.stream_stall_seconds while frames waited; the worker is freed).",
                &["reason"],
            ),
            decisions: r.counter(
                "rbee_queen_scheduling_decisions_total",
                "Where requests went: an existing worker (reuse) or one spawned for them (spawn).",
                &["decision"],
            ),
            spawns: r.counter(
                "rbee_queen_worker_spawns_total",
                "Workers the queen asked hives to start.",
                &["hive"],
            ),
            tokens_in: r.counter(
                "rbee_queen_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &["model"],
            ),
            tokens_out: r.counter(
                "rbee_queen_completion_tokens_total",
                "Generated tokens of finished requests.",
                &["model"],
            ),
            upstream_errors: r.counter(
                "rbee_queen_upstream_errors_total",
                "Failures talking to hives or workers.",
                &["stage"],
            ),
            retries: r.counter(
                "rbee_queen_retries_total",
                "Requests retried on another worker after a failure before the first token.",
                &[],
            ),
            heartbeats: r.counter(
                "rbee_queen_heartbeats_total",
                "Heartbeats received, by hive.",
                &["hive"],
            ),
            hives: r.gauge("rbee_queen_hives", "Hives by state (up, down).", &["state"]),
            workers: r.gauge(
                "rbee_queen_workers",
                "Workers on hives that are up, by state and model, as the last heartbeats report.",
                &["state", "model"],
            ),
            queue_depth: r.gauge(
                "rbee_queen_queue_depth",
                "Requests waiting for a worker, by model reference.",
                &["model"],
            ),
            inter_token: r.histogram(
                "rbee_queen_inter_token_seconds",
                "Time between two tokens as the client receives them.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inflight: r.gauge(
                "rbee_queen_inflight_requests",
                "Client requests being served now.",
                &[],
            ),
            registry: r,
        }
    }
}

impl Default for QueenMetrics {
    fn default() -> Self {
        Self::new()
    }
}
