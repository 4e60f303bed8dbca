//! Table-driven tests of the scheduler's decisions: each case builds a situation (hives,
//! workers, leases, waiting requests) step by step on an explicit clock and names the actions
//! its last step must produce. Queue-depth actions are left out of the comparison except where
//! a case is about them.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use rbee_api::{HeartbeatWorker, HiveHeartbeat, NodeResources, WorkerState};
use rbee_registry::{HiveRecord, HiveSource, HiveState};

use super::*;

const M: &str = "file:m.gguf";

/// A hive as a heartbeat shows it: free memory in GiB, models on disk, workers.
struct HiveSpec {
    id: &'static str,
    free_gib: u64,
    models: &'static [&'static str],
    workers: Vec<(&'static str, WorkerState, u32)>,
}

fn hive(id: &'static str, free_gib: u64) -> HiveSpec {
    HiveSpec {
        id,
        free_gib,
        models: &[M],
        workers: Vec::new(),
    }
}

impl HiveSpec {
    fn ready(mut self, worker: &'static str) -> Self {
        self.workers.push((worker, WorkerState::Ready, 1));
        self
    }
    fn with(mut self, worker: &'static str, state: WorkerState, slots: u32) -> Self {
        self.workers.push((worker, state, slots));
        self
    }
    fn models(mut self, models: &'static [&'static str]) -> Self {
        self.models = models;
        self
    }
    fn record(&self) -> HiveRecord {
        HiveRecord {
            id: self.id.into(),
            url: format!("http://{}", self.id),
            source: HiveSource::Joined,
            state: HiveState::Up,
            joined_unix_ms: 0,
            last_seen_unix_ms: Some(0),
            approved: true,
            pending_url: None,
            bound: true,
            heartbeat: Some(HiveHeartbeat {
                hive_id: self.id.into(),
                url: format!("http://{}", self.id),
                version: "test".into(),
                resources: NodeResources {
                    cpu_cores: 2,
                    memory_total_bytes: 64 << 30,
                    memory_available_bytes: self.free_gib << 30,
                    gpus: Vec::new(),
                    model_disk_free_bytes: 1 << 30,
                },
                workers: self
                    .workers
                    .iter()
                    .map(|(id, state, slots)| HeartbeatWorker {
                        id: (*id).into(),
                        model: M.into(),
                        device: "cpu".into(),
                        state: *state,
                        busy: false,
                        slots: *slots,
                    })
                    .collect(),
                models: self.models.iter().map(|m| (*m).to_string()).collect(),
                model_sha256: Default::default(),
            }),
        }
    }
}

/// A scheduler and its clock.
struct Sim {
    s: Scheduler,
    t0: Instant,
    now: Instant,
}

impl Sim {
    fn new(hives: &[HiveSpec]) -> Self {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Limits {
            queue_length: 3,
            queue_wait: Duration::from_secs(30),
            spawn_wait: Duration::from_secs(120),
            heartbeat: Duration::from_secs(5),
        });
        s.set_hives(hives.iter().map(HiveSpec::record).collect(), t0);
        Self { s, t0, now: t0 }
    }
    fn at(&mut self, secs: u64) -> &mut Self {
        self.now = self.t0 + Duration::from_secs(secs);
        self
    }
    fn hives(&mut self, hives: &[HiveSpec]) -> Vec<Action> {
        self.s
            .set_hives(hives.iter().map(HiveSpec::record).collect(), self.now)
    }
    /// A request for the model with a 600 s deadline.
    fn arrive(&mut self) -> Vec<Action> {
        self.arrive_avoiding(None)
    }
    fn arrive_avoiding(&mut self, avoid: Option<Avoid>) -> Vec<Action> {
        self.arrive_as("alice", 0, avoid)
    }
    /// A request of `client` with `priority`, 600 s deadline.
    fn arrive_as(&mut self, client: &str, priority: i32, avoid: Option<Avoid>) -> Vec<Action> {
        let deadline = self.now + Duration::from_secs(600);
        let who = Requester::new(client, priority);
        match self.s.arrive(M, who, avoid, deadline, self.now) {
            Ok((_, a)) => a,
            Err(e) => vec![Action::Reject {
                ticket: u64::MAX,
                why: Rejection::Timeout,
                error: e,
            }],
        }
    }
    fn arrive_with_deadline(&mut self, secs: u64) -> Vec<Action> {
        let deadline = self.now + Duration::from_secs(secs);
        let who = Requester::new("alice", 0);
        self.s.arrive(M, who, None, deadline, self.now).unwrap().1
    }
    fn release(&mut self, hive: &str, worker: &str) -> Vec<Action> {
        self.s.release(&WorkerKey::new(hive, worker), self.now)
    }
    fn tick(&mut self, ticket: Ticket) -> Vec<Action> {
        self.s.tick(ticket, self.now)
    }
}

/// The actions in a compact form: `grant 0 h1/w1`, `grant 0 h1/w1 spawned`,
/// `reject 1 QUEUE_FULL`, `spawn h1,h2`, `watch h1/w9`.
fn summary(actions: &[Action], with_depth: bool) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Grant { ticket, grant } => Some(format!(
                "grant {ticket} {}/{}{}",
                grant.key.hive,
                grant.key.worker,
                if grant.spawned { " spawned" } else { "" }
            )),
            Action::Reject { ticket, error, .. } => {
                let t = if *ticket == u64::MAX {
                    "new".to_owned()
                } else {
                    ticket.to_string()
                };
                Some(format!("reject {t} {}", error.code))
            }
            Action::Spawn { hives, .. } => Some(format!(
                "spawn {}",
                hives
                    .iter()
                    .map(|(h, _)| h.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            Action::Watch { key, .. } => Some(format!("watch {}/{}", key.hive, key.worker)),
            Action::QueueDepth { depth, .. } if with_depth => Some(format!("depth {depth}")),
            Action::QueueDepth { .. } | Action::Rearm { .. } => None,
        })
        .collect()
}

/// The one check: the actions of a situation's last step, as [`summary`] writes them.
fn check(name: &str, got: Vec<Action>, want: &[&str]) {
    let got = summary(&got, false);
    assert_eq!(got, want, "situation: {name}");
}

type Situation = fn() -> Vec<Action>;

const CASES: &[(&str, Situation, &[&str])] = &[
    (
        "an idle ready worker is reused",
        || Sim::new(&[hive("h1", 4).ready("w1")]).arrive(),
        &["grant 0 h1/w1"],
    ),
    (
        "the least-used hive's worker is picked",
        || {
            let mut sim = Sim::new(&[
                hive("h1", 4).ready("w1").ready("w3"),
                hive("h2", 4).ready("w2"),
            ]);
            sim.arrive();
            sim.arrive()
        },
        &["grant 1 h2/w2"],
    ),
    (
        "equal load breaks ties by hive id, then worker id",
        || {
            Sim::new(&[
                hive("h2", 4).ready("a"),
                hive("h1", 4).ready("z").ready("y"),
            ])
            .arrive()
        },
        &["grant 0 h1/y"],
    ),
    (
        "no worker: a spawn on the hives in rank order",
        || Sim::new(&[hive("h1", 2), hive("h2", 8)]).arrive(),
        &["spawn h2,h1"],
    ),
    (
        "the model on disk outranks free memory",
        || Sim::new(&[hive("big", 32).models(&[]), hive("small", 2)]).arrive(),
        &["spawn small,big"],
    ),
    (
        "equal memory: fewer workers first",
        || {
            let other = HiveSpec {
                id: "busy",
                free_gib: 4,
                models: &[M],
                workers: vec![("x", WorkerState::Starting, 1)],
            };
            Sim::new(&[other, hive("quiet", 4)]).arrive()
        },
        &["spawn quiet,busy"],
    ),
    (
        "one spawn per model: a second cold request waits for it",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.arrive()
        },
        &[],
    ),
    (
        "an accepted spawn is watched",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"))
        },
        &["watch h1/w9"],
    ),
    (
        "the spawned worker goes to the request that started it",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s.worker_ready(M, WorkerKey::new("h1", "w9"), now)
        },
        &["grant 0 h1/w9 spawned"],
    ),
    (
        "a heartbeat showing the spawned worker ready ends the spawn too",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            sim.hives(&[hive("h1", 4).ready("w9")]);
            // The spawn is over: a cold request for a busy pool may start another.
            sim.arrive();
            sim.arrive()
        },
        &["spawn h1"],
    ),
    (
        "one request behind a busy worker waits for it",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive()
        },
        &[],
    ),
    (
        "a second request behind a busy worker asks for another",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive()
        },
        &["spawn h1"],
    ),
    (
        "a freed worker goes to the earliest waiter",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.release("h1", "w1")
        },
        &["grant 1 h1/w1"],
    ),
    (
        "a retry's avoided worker goes to the next in line",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive_avoiding(Some(Avoid::Worker(WorkerKey::new("h1", "w1"))));
            sim.arrive();
            sim.release("h1", "w1")
        },
        &["grant 2 h1/w1"],
    ),
    (
        "a retry before the first token goes to another hive's worker",
        || {
            Sim::new(&[hive("h1", 4).ready("w1"), hive("h2", 4).ready("w2")])
                .arrive_avoiding(Some(Avoid::Worker(WorkerKey::new("h1", "w1"))))
        },
        &["grant 0 h2/w2"],
    ),
    (
        "a retry avoiding an unreachable hive skips all its workers",
        || {
            Sim::new(&[
                hive("h1", 4).ready("w1").ready("w3"),
                hive("h2", 4).ready("w2"),
            ])
            .arrive_avoiding(Some(Avoid::Hive("h1".into())))
        },
        &["grant 0 h2/w2"],
    ),
    (
        "a full queue refuses at once",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.arrive()
        },
        &["reject new QUEUE_FULL"],
    ),
    (
        "another client's request is not queued behind one client's burst",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.arrive_as("bob", 0, None);
            sim.release("h1", "w1")
        },
        &["grant 3 h1/w1"],
    ),
    (
        "clients take turns, the least recently served first",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.arrive_as("bob", 0, None);
            sim.arrive_as("bob", 0, None);
            sim.release("h1", "w1");
            sim.release("h1", "w1");
            sim.release("h1", "w1")
        },
        &["grant 4 h1/w1"],
    ),
    (
        "within a client, a lower priority goes first",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive_as("alice", 5, None);
            sim.arrive_as("alice", -1, None);
            sim.release("h1", "w1")
        },
        // (It is also the one the spawn its arrival asked for was for.)
        &["grant 2 h1/w1 spawned"],
    ),
    (
        "a client's full share of the queue refuses only that client",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            for _ in 0..4 {
                sim.arrive();
            }
            sim.arrive_as("bob", 0, None)
        },
        &[],
    ),
    (
        "the request's deadline ends its wait",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive_with_deadline(10);
            sim.at(10).tick(1)
        },
        &["reject 1 DEADLINE_EXCEEDED"],
    ),
    (
        "the queue's wait ends a request no worker freed for",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.at(31).tick(1)
        },
        &["reject 1 NO_CAPACITY"],
    ),
    (
        "a timer before any limit changes nothing",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.at(29).tick(1)
        },
        &[],
    ),
    (
        "while a worker is spawned the spawn's wait applies, not the queue's",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.arrive();
            sim.at(31).tick(1)
        },
        &[],
    ),
    (
        "a spawn that takes longer than spawn_wait refuses its request",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.at(121).tick(0)
        },
        &["reject 0 NO_CAPACITY"],
    ),
    (
        "a hive that refused a spawn ranks last for that model",
        || {
            let mut sim = Sim::new(&[hive("h1", 8), hive("h2", 2)]);
            sim.s.spawn_refused(M, "h1", sim.now);
            sim.arrive()
        },
        &["spawn h2,h1"],
    ),
    (
        "every hive refusing: requests with no worker get the hives' answer",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.arrive();
            sim.s.spawn_refused(M, "h1", sim.now);
            sim.s.spawn_exhausted(M, "hive h1 answered 507", sim.now)
        },
        &["reject 0 NO_CAPACITY", "reject 1 NO_CAPACITY"],
    ),
    (
        "every hive refusing: a request behind a busy worker keeps waiting",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.s.spawn_refused(M, "h1", sim.now);
            sim.s.spawn_exhausted(M, "hive h1 answered 507", sim.now)
        },
        &[],
    ),
    (
        "a worker that cannot start is reported to the requests waiting for it",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s
                .worker_failed(M, &WorkerKey::new("h1", "w9"), "exit 1".into(), now)
        },
        &["reject 0 NO_CAPACITY", "reject 1 NO_CAPACITY"],
    ),
    (
        "a failed start on one hive tries the next at once",
        || {
            let mut sim = Sim::new(&[hive("h1", 8), hive("h2", 2)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s
                .worker_failed(M, &WorkerKey::new("h1", "w9"), "exit 1".into(), now)
        },
        &["spawn h2,h1"],
    ),
    (
        "the breaker: after every hive failed, new requests are told why at once",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s
                .worker_failed(M, &WorkerKey::new("h1", "w9"), "exit 1".into(), now);
            sim.at(2).arrive()
        },
        &["reject 1 NO_CAPACITY"],
    ),
    (
        "the breaker closes after its window: the hives are asked again",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s
                .worker_failed(M, &WorkerKey::new("h1", "w9"), "exit 1".into(), now);
            sim.at(6).arrive()
        },
        &["spawn h1"],
    ),
    (
        "a hive that joins after the others failed is tried at once",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s
                .worker_failed(M, &WorkerKey::new("h1", "w9"), "exit 1".into(), now);
            sim.at(1).hives(&[hive("h1", 4), hive("h2", 4)]);
            sim.arrive()
        },
        &["spawn h2,h1"],
    ),
    (
        "no hive up: a clear refusal",
        || Sim::new(&[]).arrive(),
        &["reject 0 NO_CAPACITY"],
    ),
    (
        "cancel while queued",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.s.cancel(1, sim.now)
        },
        &["reject 1 CANCELLED"],
    ),
    (
        "a request whose client left gives its turn to the next",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.arrive();
            sim.s.leave(1, sim.now);
            sim.release("h1", "w1")
        },
        &["grant 2 h1/w1 spawned"],
    ),
    (
        "the drain's cut refuses every waiting request",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.arrive();
            sim.arrive();
            sim.s.cut()
        },
        &["reject 1 SHUTTING_DOWN"],
    ),
    (
        "after the cut new requests are refused",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
            sim.s.cut();
            sim.arrive()
        },
        &["reject new SHUTTING_DOWN"],
    ),
    (
        "a worker with two slots serves two requests at once",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).with("w1", WorkerState::Ready, 2)]);
            sim.arrive();
            sim.arrive()
        },
        &["grant 1 h1/w1"],
    ),
    (
        "a worker's slots are a limit",
        || {
            let mut sim = Sim::new(&[hive("h1", 4).with("w1", WorkerState::Ready, 2)]);
            sim.arrive();
            sim.arrive();
            sim.arrive()
        },
        &[],
    ),
    (
        "starting and failed workers are not routed to",
        || {
            Sim::new(&[hive("h1", 4).with("s", WorkerState::Starting, 1).with(
                "f",
                WorkerState::Failed,
                1,
            )])
            .arrive()
        },
        &["spawn h1"],
    ),
    (
        "a worker seen ready by its watch stays routable until a heartbeat lists it",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s.worker_ready(M, WorkerKey::new("h1", "w9"), now);
            sim.release("h1", "w9");
            sim.at(5).hives(&[hive("h1", 4)]);
            sim.arrive()
        },
        &["grant 1 h1/w9"],
    ),
    (
        "…and no longer than 3 heartbeat intervals",
        || {
            let mut sim = Sim::new(&[hive("h1", 4)]);
            sim.arrive();
            sim.s.spawn_accepted(M, WorkerKey::new("h1", "w9"));
            let now = sim.now;
            sim.s.worker_ready(M, WorkerKey::new("h1", "w9"), now);
            sim.release("h1", "w9");
            sim.at(16).hives(&[hive("h1", 4)]);
            sim.arrive()
        },
        &["spawn h1"],
    ),
];

#[test]
fn scheduling_decisions() {
    assert!(CASES.len() >= 25);
    for (name, situation, want) in CASES {
        check(name, situation(), want);
    }
}

#[test]
fn a_client_over_its_limit_is_refused_until_one_of_its_requests_ends() {
    let mut s = Sim::new(&[]).s;
    s.admit_client("a", Some(2)).unwrap();
    s.admit_client("a", Some(2)).unwrap();
    let e = s.admit_client("a", Some(2)).unwrap_err();
    assert_eq!(e.code, codes::CLIENT_LIMIT);
    assert!(e.retry_after.is_some());
    // Other clients are not affected; no limit means none.
    s.admit_client("b", Some(1)).unwrap();
    s.admit_client("c", None).unwrap();
    s.client_done("a");
    s.admit_client("a", Some(2)).unwrap();
}

#[test]
fn queue_depth_follows_arrivals_grants_and_departures() {
    let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
    assert_eq!(
        summary(&sim.arrive(), true),
        ["depth 1", "grant 0 h1/w1", "depth 0"]
    );
    assert_eq!(summary(&sim.arrive(), true), ["depth 1"]);
    assert_eq!(summary(&sim.arrive(), true), ["depth 2", "spawn h1"]);
    assert_eq!(
        summary(&sim.s.leave(2, sim.now), true),
        ["depth 1"],
        "the spawn for the one that left goes on"
    );
    assert_eq!(
        summary(&sim.release("h1", "w1"), true),
        ["grant 1 h1/w1", "depth 0"]
    );
}

#[test]
fn a_spawn_that_ends_rearms_its_waiters_and_the_queue_limit_applies_again() {
    let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
    sim.arrive();
    sim.arrive();
    sim.arrive();
    assert!(sim.at(31).tick(1).is_empty(), "a spawn is under way");
    let now = sim.now;
    sim.s.spawn_refused(M, "h1", now);
    let ended = sim.s.spawn_exhausted(M, "hive h1 answered 507", now);
    assert!(ended.contains(&Action::Rearm {
        tickets: vec![1, 2]
    }));
    assert_eq!(
        sim.s.wake_at(1, now),
        Some(sim.t0 + Duration::from_secs(30))
    );
    check(
        "re-armed past its queue limit",
        sim.tick(1),
        &["reject 1 NO_CAPACITY"],
    );
    check(
        "the request that asked keeps the spawn's limit",
        sim.tick(2),
        &[],
    );
}

#[test]
fn a_waiter_wakes_at_its_nearest_limit() {
    let mut sim = Sim::new(&[hive("h1", 4).ready("w1")]);
    sim.arrive();
    sim.arrive_with_deadline(10);
    sim.arrive();
    assert_eq!(
        sim.s.wake_at(1, sim.now),
        Some(sim.t0 + Duration::from_secs(10))
    );
    // A spawn is under way: the queue's limit (30 s) is looked at, then the spawn's.
    assert_eq!(
        sim.s.wake_at(2, sim.now),
        Some(sim.t0 + Duration::from_secs(30))
    );
    assert_eq!(
        sim.s.wake_at(0, sim.now),
        None,
        "granted: no longer waiting"
    );
}

#[test]
fn retry_after_follows_recent_durations_and_workers() {
    let mut s = Sim::new(&[]).s;
    assert_eq!(s.retry_after(1, 0), 5, "no history: 5 s");
    for _ in 0..4 {
        s.record_duration(2.0);
    }
    assert_eq!(s.retry_after(1, 0), 2);
    assert_eq!(
        s.retry_after(1, 3),
        8,
        "4 requests ahead of a free place on 1 worker"
    );
    assert_eq!(s.retry_after(2, 3), 4);
}
