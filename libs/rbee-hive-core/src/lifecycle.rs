//! One worker's lifecycle task. It owns the worker process from spawn to the last exit:
//! the ready call (or the load timeout), supervision, the stop sequence, crashes and restarts
//! as the restart policy decides. It writes what it does into the worker's record and
//! reports each step over a channel; the hive turns the reports into the state the API shows,
//! metrics and audit records. It never calls the hive: what it needs is passed in.

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rbee_auth::Token;
use rbee_http::unix_ms;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, error, info, warn};

use crate::config::HiveConfig;
use crate::ports::{PortLease, Ports};
use crate::process::{self, Launch, Process};
use crate::restart::{CrashHistory, Decision};
use crate::worker::{
    BackoffInfo, Commands, ExitInfo, ReadyReport, StopCause, StopInfo, StopOutcome, Worker,
    WorkerState,
};

/// What a lifecycle task reports to the hive, in the order it happens. The channel closes
/// when the task ends.
#[derive(Debug)]
pub enum Report {
    /// The worker's state changed (the hive applies it, so it is seen only after the reports
    /// before it are taken in).
    State(WorkerState),
    /// A process started.
    Spawned,
    /// No process could be started (reported after the `Failed` state).
    SpawnFailed { error: String },
    /// The ready call came: the worker is ready.
    Ready {
        pid: u32,
        spawn_to_ready_seconds: f64,
    },
    /// The process was killed for missing the load timeout or failing health checks.
    ForceKilled,
    /// The process exited without being asked to (or was killed as above).
    Crashed {
        code: Option<i32>,
        signal: Option<i32>,
        reason: String,
        stderr_tail: Vec<String>,
    },
    /// Too many crashes: no more restarts.
    BreakerOpen { recent_crashes: u32 },
    /// Waiting this long before the next start.
    Backoff { delay: Duration },
    /// The backoff is over; the worker starts again.
    Restarted { restart_count: u32 },
    /// Stopped for good.
    Stopped {
        cause: StopCause,
        outcome: StopOutcome,
        seconds: f64,
    },
}

/// A worker's lifecycle task with what it needs from the hive.
pub struct Lifecycle {
    pub worker: Arc<Worker>,
    /// The current configuration (reloads included).
    pub config: watch::Receiver<HiveConfig>,
    pub ports: Arc<Ports>,
    /// Set when the hive shuts down: nothing starts any more.
    pub draining: Arc<AtomicBool>,
    /// Loopback client for the worker's stop request.
    pub http: reqwest::Client,
    /// Where the worker sends its ready call.
    pub ready_url: String,
    pub reports: mpsc::UnboundedSender<Report>,
}

/// How a start ended: the ready call, or one of the [`Outcome`]s.
enum Phase {
    Ready(ReadyReport),
    Over(Outcome),
}

/// How a worker process's supervision ended.
enum Outcome {
    Exited(std::io::Result<std::process::ExitStatus>),
    LoadTimeout,
    Stop(StopCause),
    KillUnhealthy,
}

/// The next stop request.
async fn wait_stop(rx: &mut watch::Receiver<Commands>) -> StopCause {
    loop {
        if let Some(c) = rx.borrow_and_update().stop {
            return c;
        }
        if rx.changed().await.is_err() {
            // The worker record (and with it the sender) is gone: nothing will ask again.
            std::future::pending::<()>().await;
        }
    }
}

/// The next request for the ready process `pid`: a stop, or a kill for failed health checks.
async fn next_command(rx: &mut watch::Receiver<Commands>, pid: u32) -> Outcome {
    loop {
        let c = *rx.borrow_and_update();
        if let Some(cause) = c.stop {
            return Outcome::Stop(cause);
        }
        if c.kill_unhealthy == Some(pid) {
            return Outcome::KillUnhealthy;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Lifecycle {
    /// Spawn, wait for ready, supervise, restart or stop. Ends when the worker is stopped for
    /// good or given up on; then the report channel closes.
    pub async fn run(self) {
        let span = tracing::info_span!("worker", worker_id = %self.worker.spec.id);
        self.supervise().instrument(span).await;
    }

    fn report(&self, r: Report) {
        // The hive reads until the channel closes; a send fails only if it is gone.
        let _ = self.reports.send(r);
    }

    fn config(&self) -> HiveConfig {
        self.config.borrow().clone()
    }

    async fn supervise(&self) {
        let worker = &self.worker;
        let mut commands = worker.commands();
        let mut crashes = CrashHistory::default();
        loop {
            let stop = commands.borrow().stop;
            if let Some(cause) = stop {
                self.stopped(cause, StopOutcome::NotRunning, 0.0);
                return;
            }
            if self.draining.load(Ordering::SeqCst) {
                self.stopped(StopCause::Shutdown, StopOutcome::NotRunning, 0.0);
                return;
            }
            let (mut process, lease, token) = match self.spawn() {
                Ok(c) => c,
                Err(why) => {
                    error!(error = %why, "cannot start the worker process");
                    worker.set_failure(why.clone());
                    self.report(Report::State(WorkerState::Failed));
                    self.report(Report::SpawnFailed { error: why });
                    return;
                }
            };
            let (pid, port) = (process.pid(), lease.port());
            let mut ready_rx = worker.expect_ready();
            let spawned = Instant::now();
            worker.started(pid, port, token.clone(), spawned);
            self.report(Report::State(WorkerState::Starting));
            self.report(Report::Spawned);
            info!(pid, port, model = %worker.spec.model_ref, device = %worker.spec.device, "worker process started");

            let load_timeout = Duration::from_secs(self.config().workers.load_timeout_seconds);
            let ready = async {
                match (&mut ready_rx).await {
                    Ok(r) => r,
                    Err(_) => std::future::pending().await,
                }
            };
            let phase = tokio::select! {
                st = process.wait() => Phase::Over(Outcome::Exited(st)),
                r = ready => Phase::Ready(r),
                _ = tokio::time::sleep(load_timeout) => Phase::Over(Outcome::LoadTimeout),
                c = wait_stop(&mut commands) => Phase::Over(Outcome::Stop(c)),
            };
            worker.stop_expecting_ready();
            let was_ready = matches!(phase, Phase::Ready(_));
            let outcome = match phase {
                Phase::Ready(report) => {
                    let secs = spawned.elapsed().as_secs_f64();
                    worker.became_ready(report.context_length, report.slots, secs);
                    self.report(Report::Ready {
                        pid,
                        spawn_to_ready_seconds: secs,
                    });
                    info!(
                        spawn_to_ready_s = secs,
                        load_s = report.load_seconds,
                        address = %report.address,
                        "worker ready"
                    );
                    tokio::select! {
                        st = process.wait() => Outcome::Exited(st),
                        c = next_command(&mut commands, pid) => c,
                    }
                }
                Phase::Over(outcome) => outcome,
            };

            let (status, reason) = match outcome {
                Outcome::Stop(cause) => {
                    self.report(Report::State(WorkerState::Stopping));
                    let t0 = Instant::now();
                    let outcome = self.stop_process(&mut process, port, &token).await;
                    self.stopped(cause, outcome, t0.elapsed().as_secs_f64());
                    // The port lease ends with this scope: the port is free again.
                    return;
                }
                Outcome::LoadTimeout => {
                    warn!(
                        timeout_s = load_timeout.as_secs(),
                        "no ready call in time; killing it"
                    );
                    process.signal(libc::SIGKILL);
                    self.report(Report::ForceKilled);
                    let st = process.wait().await;
                    (
                        st,
                        format!(
                            "did not report ready within {} s (workers.load_timeout_seconds)",
                            load_timeout.as_secs()
                        ),
                    )
                }
                Outcome::KillUnhealthy => {
                    // The hive asked: the health loop counted three failed checks in a row.
                    let st = process.kill().await;
                    self.report(Report::ForceKilled);
                    (
                        st,
                        "failed three health checks in a row and was killed".to_owned(),
                    )
                }
                Outcome::Exited(st) => {
                    let why = if was_ready {
                        format!("exited unexpectedly ({})", process::describe_exit(&st))
                    } else {
                        format!(
                            "exited before it was ready ({})",
                            process::describe_exit(&st)
                        )
                    };
                    (st, why)
                }
            };
            let (code, signal) = process::exit_fields(&status);
            // Reap any helper processes the worker left in its group.
            process.reap_group();
            drop(lease);

            let tail = worker.stderr_tail().lines();
            worker.exited(ExitInfo {
                code,
                signal,
                at_unix_ms: unix_ms(),
                reason: reason.clone(),
            });
            warn!(?code, ?signal, %reason, "worker crashed");
            self.report(Report::Crashed {
                code,
                signal,
                reason: reason.clone(),
                stderr_tail: tail,
            });
            let policy = self.config().restart;
            let (delay, recent) = match crashes.crashed(
                &policy,
                Instant::now(),
                rand::random::<f64>(),
            ) {
                Decision::Disabled => {
                    worker.set_failure(format!("{reason}; restarts are disabled"));
                    self.report(Report::State(WorkerState::Failed));
                    return;
                }
                Decision::BreakerOpen { recent_crashes } => {
                    worker.open_breaker(format!(
                            "circuit breaker open: {recent_crashes} crashes within {} s (restart.max_attempts = {}); last: {reason}",
                            policy.window_seconds, policy.max_attempts
                        ));
                    error!(
                        recent = recent_crashes,
                        "circuit breaker open; not restarting"
                    );
                    self.report(Report::BreakerOpen { recent_crashes });
                    self.report(Report::State(WorkerState::Failed));
                    return;
                }
                Decision::Restart {
                    delay,
                    recent_crashes,
                } => (delay, recent_crashes),
            };
            worker.set_backoff(BackoffInfo {
                recent_crashes: recent,
                next_restart_unix_ms: unix_ms() + delay.as_millis() as i64,
                delay_ms: delay.as_millis() as u64,
            });
            self.report(Report::Backoff { delay });
            self.report(Report::State(WorkerState::Backoff));
            info!(
                delay_ms = delay.as_millis() as u64,
                recent, "restarting after backoff"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                cause = wait_stop(&mut commands) => {
                    self.stopped(cause, StopOutcome::NotRunning, 0.0);
                    return;
                }
            }
            let restart_count = worker.count_restart();
            self.report(Report::Restarted { restart_count });
        }
    }

    /// Stopped for good: the record, the log line, the report.
    fn stopped(&self, cause: StopCause, outcome: StopOutcome, seconds: f64) {
        self.worker.stopped(StopInfo {
            cause,
            outcome,
            seconds,
        });
        info!(?cause, ?outcome, seconds, "worker stopped");
        self.report(Report::Stopped {
            cause,
            outcome,
            seconds,
        });
        self.report(Report::State(WorkerState::Stopped));
    }

    /// Ask (`POST /v1/shutdown`), then SIGTERM, then SIGKILL, each after its wait.
    async fn stop_process(&self, process: &mut Process, port: u16, token: &Token) -> StopOutcome {
        let cfg = self.config().shutdown;
        let ask_for = Duration::from_secs(cfg.ask_seconds);
        let ask = async {
            let url = format!("http://127.0.0.1:{port}/v1/shutdown");
            let sent = self
                .http
                .post(&url)
                .bearer_auth(token.expose())
                .timeout(ask_for)
                .send()
                .await;
            if let Err(e) = sent {
                info!(error = %e, "the stop request did not get through; will signal");
            }
        };
        process
            .stop(ask, ask_for, Duration::from_secs(cfg.term_seconds))
            .await
    }

    /// Starts the worker process on a free port with a fresh token (by environment, never
    /// on the command line).
    fn spawn(&self) -> Result<(Process, PortLease, Token), String> {
        let cfg = self.config();
        let lease = self
            .ports
            .reserve(cfg.workers.port_min..=cfg.workers.port_max)?;
        let secret = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        let token = Token::new(secret, "generated worker token").map_err(|e| e.to_string())?;
        let spec = &self.worker.spec;
        let mut args: Vec<OsString> = vec![
            "--model".into(),
            spec.model_path.clone().into(),
            "--listen".into(),
            format!("127.0.0.1:{}", lease.port()).into(),
            "--device".into(),
            spec.device.clone().into(),
            "--worker-id".into(),
            spec.id.clone().into(),
            "--grace-seconds".into(),
            cfg.workers.grace_seconds.to_string().into(),
        ];
        if cfg.workers.threads > 0 {
            args.push("--threads".into());
            args.push(cfg.workers.threads.to_string().into());
        }
        if cfg.workers.parallel > 0 {
            args.push("--parallel".into());
            args.push(cfg.workers.parallel.to_string().into());
        }
        args.push("--kv-tokens".into());
        args.push(spec.kv_tokens.to_string().into());
        if let Some(c) = spec.max_context {
            args.push("--max-context".into());
            args.push(c.to_string().into());
        }
        let launch = Launch {
            binary: spec.binary.clone(),
            args,
            env: vec![
                ("RBEE_LOG_FORMAT", cfg.log_format.clone()),
                ("RBEE_WORKER_TOKEN", token.expose().to_owned()),
                ("RBEE_WORKER_READY_URL", self.ready_url.clone()),
            ],
            worker_id: spec.id.clone(),
        };
        let process = process::spawn(launch, &self.worker.stderr_tail())?;
        Ok((process, lease, token))
    }
}
