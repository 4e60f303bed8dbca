//! The hive's Prometheus metrics (`rbee_hive_*`).

use rbee_metrics::{Counter, Gauge, Histogram, Registry};

pub struct HiveMetrics {
    pub registry: Registry,
    pub http_requests: Counter,
    pub auth_failures: Counter,
    pub workers: Gauge,
    pub spawns: Counter,
    pub spawn_to_ready: Histogram,
    pub crashes: Counter,
    pub restarts: Counter,
    pub breaker_open: Counter,
    pub worker_restart_count: Gauge,
    pub worker_exit_code: Gauge,
    pub worker_exit_signal: Gauge,
    pub worker_backoff: Gauge,
    pub worker_breaker: Gauge,
    pub graceful_stops: Counter,
    pub force_kills: Counter,
    pub shutdown_duration: Gauge,
    pub admission_refusals: Counter,
    pub memory_estimate: Gauge,
    pub memory_rss: Gauge,
    pub memory_estimate_ratio: Gauge,
    pub health_probes: Counter,
    pub keep_alive_stops: Counter,
    pub inference_requests: Counter,
    pub inflight: Gauge,
    pub downloads: Counter,
    pub download_bytes: Counter,
    pub heartbeats: Counter,
    pub config_reloads: Counter,
    pub audit_dropped: Counter,
}

const SPAWN_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

impl HiveMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        r.build_info("rbee_hive_build_info", env!("CARGO_PKG_VERSION"));
        Self {
            http_requests: r.counter(
                "rbee_hive_http_requests_total",
                "HTTP requests answered by the hive, by route and status.",
                &["route", "status"],
            ),
            auth_failures: r.counter(
                "rbee_hive_auth_failures_total",
                "Requests refused for a missing or wrong bearer token.",
                &[],
            ),
            workers: r.gauge(
                "rbee_hive_workers",
                "Workers by state (starting, ready, stopping, backoff, failed, stopped).",
                &["state"],
            ),
            spawns: r.counter(
                "rbee_hive_worker_spawns_total",
                "Worker processes started (first starts and restarts).",
                &[],
            ),
            spawn_to_ready: r.histogram(
                "rbee_hive_worker_spawn_to_ready_seconds",
                "From process start to the worker's ready call.",
                &[],
                SPAWN_BUCKETS,
            ),
            crashes: r.counter(
                "rbee_hive_worker_crashes_total",
                "Worker exits nobody asked for, and workers killed for missing the load timeout or failing health checks.",
                &[],
            ),
            restarts: r.counter(
                "rbee_hive_worker_restarts_total",
                "Crashed workers restarted by the restart policy.",
                &[],
            ),
            breaker_open: r.counter(
                "rbee_hive_worker_breaker_open_total",
                "Workers given up on after too many crashes (circuit breaker opened).",
                &[],
            ),
            worker_restart_count: r.gauge(
                "rbee_hive_worker_lifetime_restarts",
                "Restarts of each current worker.",
                &["worker_id"],
            ),
            worker_exit_code: r.gauge(
                "rbee_hive_worker_last_exit_code",
                "Exit code of each current worker's last crash (-1: killed by a signal).",
                &["worker_id"],
            ),
            worker_exit_signal: r.gauge(
                "rbee_hive_worker_last_exit_signal",
                "Signal that ended each current worker's last crash (0: none).",
                &["worker_id"],
            ),
            worker_backoff: r.gauge(
                "rbee_hive_worker_backoff_seconds",
                "Backoff before a crashed worker's next restart (0 when not waiting).",
                &["worker_id"],
            ),
            worker_breaker: r.gauge(
                "rbee_hive_worker_breaker_open",
                "1 when a worker's circuit breaker is open (no more restarts).",
                &["worker_id"],
            ),
            graceful_stops: r.counter(
                "rbee_hive_workers_graceful_shutdown_total",
                "Worker stops that ended before SIGKILL (API, keep-alive and hive shutdown).",
                &[],
            ),
            force_kills: r.counter(
                "rbee_hive_workers_force_killed_total",
                "Worker stops that needed SIGKILL, including kills for a missed load timeout or failed health checks.",
                &[],
            ),
            shutdown_duration: r.gauge(
                "rbee_hive_shutdown_duration_seconds",
                "How long the last hive shutdown took, from signal to the last worker gone.",
                &[],
            ),
            admission_refusals: r.counter(
                "rbee_hive_admission_refusals_total",
                "Spawns refused with 507 because memory or the worker limit did not allow them.",
                &["reason"],
            ),
            memory_estimate: r.gauge(
                "rbee_hive_worker_memory_estimate_bytes",
                "Memory the admission check expected a worker to need.",
                &["worker_id"],
            ),
            memory_rss: r.gauge(
                "rbee_hive_worker_memory_used_bytes",
                "What a worker really uses: resident memory (cpu, metal) or VRAM (cuda), sampled at ready and at each health check.",
                &["worker_id"],
            ),
            memory_estimate_ratio: r.gauge(
                "rbee_hive_worker_memory_estimate_ratio",
                "Memory used divided by the admission estimate (above 1: the estimate is too low).",
                &["worker_id"],
            ),
            health_probes: r.counter(
                "rbee_hive_health_probes_total",
                "Health checks of ready workers, by kind (health, generate) and outcome.",
                &["kind", "outcome"],
            ),
            keep_alive_stops: r.counter(
                "rbee_hive_keep_alive_stops_total",
                "Workers stopped because they were unused for the keep-alive.",
                &[],
            ),
            inference_requests: r.counter(
                "rbee_hive_inference_requests_total",
                "Inference requests proxied to workers, by outcome.",
                &["outcome"],
            ),
            inflight: r.gauge(
                "rbee_hive_inflight_requests",
                "Inference streams passing through the hive now.",
                &[],
            ),
            downloads: r.counter(
                "rbee_hive_model_downloads_total",
                "Model downloads, by outcome.",
                &["outcome"],
            ),
            download_bytes: r.counter(
                "rbee_hive_model_download_bytes_total",
                "Bytes received from the hub.",
                &[],
            ),
            heartbeats: r.counter(
                "rbee_hive_heartbeats_total",
                "Heartbeats sent to the queen, by outcome.",
                &["outcome"],
            ),
            config_reloads: r.counter(
                "rbee_hive_config_reloads_total",
                "SIGHUP reloads, by outcome.",
                &["outcome"],
            ),
            audit_dropped: r.counter(
                "rbee_hive_audit_records_dropped_total",
                "Audit records dropped because the writer's queue was full (a flood of events).",
                &[],
            ),
            registry: r,
        }
    }
}

impl Default for HiveMetrics {
    fn default() -> Self {
        Self::new()
    }
}
