//! The queen's scheduling decisions, as one state and pure steps: given the state, the time and
//! an event (a request arrives or leaves, a lease ends, hives change, a spawn is answered, a
//! spawned worker comes up or fails, a waiter's timer fires, shutdown cuts), it updates the state
//! and returns the [`Action`]s to carry out. Nothing here waits, sleeps or calls a hive; the
//! shell in `queen.rs` does the I/O and feeds the answers back as events.
//!
//! Capacity is free slots per worker: a worker a heartbeat lists with `slots = N` serves up to N
//! leases of this queen at once.
//!
//! Waiting is fair between clients: each client may queue `queue_length` requests per model,
//! and free workers go round-robin between the clients waiting, least recently served first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rbee_api::codes;
use rbee_http::ApiError;
use rbee_registry::HiveRecord;

mod fair;
mod types;

use types::avoided;
pub use types::{
    Action, Avoid, Grant, HIVE_SPAWN_COOLDOWN, Limits, Rejection, Requester,
    SPAWN_RETRY_AFTER_REFUSAL, Ticket, WorkerKey,
};

#[derive(Debug, Clone)]
struct Waiter {
    ticket: Ticket,
    who: Requester,
    avoid: Option<Avoid>,
    arrived: Instant,
    deadline: Instant,
    queue_deadline: Instant,
    spawn_deadline: Instant,
    /// When the spawn this request started was asked for.
    spawned_at: Option<Instant>,
}

/// A spawn for a model: asked, or answered with the worker being started.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Spawn {
    Asking,
    Starting(WorkerKey),
}

/// The queen's scheduling state; one lock holds it (see `Queen`).
#[derive(Debug)]
pub struct Scheduler {
    limits: Limits,
    /// Hives that are up, as the registry has them.
    hives: Vec<HiveRecord>,
    /// This queen's leases per worker.
    leases: BTreeMap<WorkerKey, u32>,
    /// Workers a spawn watch saw ready that no heartbeat lists as ready yet, with the model
    /// and when they were seen (routable for 3 heartbeat intervals).
    seen_ready: Vec<(WorkerKey, String, Instant)>,
    /// Waiting requests per model, oldest first.
    queues: BTreeMap<String, VecDeque<Waiter>>,
    /// The one spawn under way per model.
    spawns: HashMap<String, Spawn>,
    /// A hive that refused or failed a spawn for a model ranks last for it until then.
    hive_failed: HashMap<(String, String), Instant>,
    /// After every hive refused or failed a model, no new spawn before then.
    refused_until: HashMap<String, Instant>,
    /// Why the last worker spawned for a model did not come up.
    failure: HashMap<String, String>,
    /// Requests in flight per client.
    clients: HashMap<String, u32>,
    /// Per client: the number of the last grant it got (grants are numbered), so the client
    /// served least recently goes first.
    served: HashMap<String, u64>,
    grants: u64,
    /// Recent request durations, for `Retry-After`.
    recent: VecDeque<f64>,
    next_ticket: Ticket,
    cut: bool,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            hives: Vec::new(),
            leases: BTreeMap::new(),
            seen_ready: Vec::new(),
            queues: BTreeMap::new(),
            spawns: HashMap::new(),
            hive_failed: HashMap::new(),
            refused_until: HashMap::new(),
            failure: HashMap::new(),
            clients: HashMap::new(),
            served: HashMap::new(),
            grants: 0,
            recent: VecDeque::new(),
            next_ticket: 0,
            cut: false,
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    // ---- events -------------------------------------------------------------------------

    /// The hives that are up changed (a heartbeat, the sweep, an admin removal).
    pub fn set_hives(&mut self, hives: Vec<HiveRecord>, now: Instant) -> Vec<Action> {
        self.hives = hives;
        let keep = self.limits.heartbeat * 3;
        let hives = &self.hives;
        self.seen_ready.retain(|(key, _, at)| {
            let listed = hives.iter().any(|h| {
                h.id == key.hive
                    && h.heartbeat.as_ref().is_some_and(|hb| {
                        hb.workers
                            .iter()
                            .any(|w| w.id == key.worker && w.state.is_ready())
                    })
            });
            !listed && now.saturating_duration_since(*at) < keep
        });
        self.dispatch_all(now)
    }

    /// A request asks for a worker for `model`. Refused at once when its client already has
    /// `queue_length` requests waiting for the model (a client's burst fills only its own
    /// share of the queue).
    pub fn arrive(
        &mut self,
        model: &str,
        who: Requester,
        avoid: Option<Avoid>,
        deadline: Instant,
        now: Instant,
    ) -> Result<(Ticket, Vec<Action>), ApiError> {
        if self.cut {
            return Err(shutting_down());
        }
        let q = self.queues.get(model);
        let n = q.map_or(0, |q| {
            q.iter().filter(|w| w.who.client == who.client).count()
        }) as u32;
        if n >= self.limits.queue_length {
            let all = q.map_or(0, VecDeque::len) as u32;
            let retry = self.retry_after(self.ready_workers(model).len(), all);
            return Err(ApiError::new(
                codes::QUEUE_FULL,
                format!(
                    "{n} requests of client `{}` are already waiting for `{model}`; retry in {retry} s",
                    who.client
                ),
            )
            .retry_after(retry));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queues
            .entry(model.to_owned())
            .or_default()
            .push_back(Waiter {
                ticket,
                who,
                avoid,
                arrived: now,
                deadline,
                queue_deadline: add(now, self.limits.queue_wait),
                spawn_deadline: add(now, self.limits.spawn_wait),
                spawned_at: None,
            });
        let mut actions = vec![self.depth(model)];
        actions.extend(self.dispatch(model, now));
        Ok((ticket, actions))
    }

    /// A waiting request went away (its client left, or it was answered).
    pub fn leave(&mut self, ticket: Ticket, now: Instant) -> Vec<Action> {
        match self.remove_waiter(ticket) {
            Some((model, _)) => {
                let mut actions = vec![self.depth(&model)];
                // What it was waiting for may now go to the next in line.
                actions.extend(self.dispatch(&model, now));
                actions
            }
            None => Vec::new(),
        }
    }

    /// A client cancelled a waiting request.
    pub fn cancel(&mut self, ticket: Ticket, now: Instant) -> Vec<Action> {
        let Some((model, _)) = self.remove_waiter(ticket) else {
            return Vec::new();
        };
        let mut actions = vec![
            Action::Reject {
                ticket,
                why: Rejection::Cancelled,
                error: ApiError::new(
                    codes::CANCELLED,
                    "the request was cancelled while waiting for a worker",
                ),
            },
            self.depth(&model),
        ];
        actions.extend(self.dispatch(&model, now));
        actions
    }

    /// A lease ended: the worker has a free slot again.
    pub fn release(&mut self, key: &WorkerKey, now: Instant) -> Vec<Action> {
        if let Some(n) = self.leases.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.leases.remove(key);
            }
        }
        self.dispatch_all(now)
    }

    /// A hive accepted a spawn for `model`: the worker is starting.
    pub fn spawn_accepted(&mut self, model: &str, key: WorkerKey) -> Vec<Action> {
        self.spawns
            .insert(model.to_owned(), Spawn::Starting(key.clone()));
        vec![Action::Watch {
            model: model.to_owned(),
            key,
        }]
    }

    /// A hive refused a spawn for `model` (or could not be reached): it ranks last for it.
    pub fn spawn_refused(&mut self, model: &str, hive: &str, now: Instant) {
        self.hive_failed.insert(
            (hive.to_owned(), model.to_owned()),
            add(now, HIVE_SPAWN_COOLDOWN),
        );
    }

    /// Every hive asked refused the spawn; `reason` is the last one's answer.
    pub fn spawn_exhausted(&mut self, model: &str, reason: &str, now: Instant) -> Vec<Action> {
        let mut actions = self.end_spawn(model);
        self.refused_until
            .insert(model.to_owned(), add(now, SPAWN_RETRY_AFTER_REFUSAL));
        // Requests with no worker to wait for get the hives' answer now; the others wait for
        // a busy worker.
        let retry = self.retry_after(self.ready_workers(model).len(), 0);
        for w in self.waiters_without_workers(model) {
            self.remove_waiter(w);
            actions.push(Action::Reject {
                ticket: w,
                why: Rejection::NoHive,
                error: ApiError::new(
                    codes::NO_CAPACITY,
                    format!("no hive could start a worker for `{model}`: {reason}"),
                )
                .retry_after(retry),
            });
        }
        if !actions.is_empty() {
            actions.push(self.depth(model));
        }
        actions.extend(self.dispatch(model, now));
        actions
    }

    /// A spawned worker is ready: routable before the hive's next heartbeat lists it.
    pub fn worker_ready(&mut self, model: &str, key: WorkerKey, now: Instant) -> Vec<Action> {
        let mut actions = self.end_spawn_of(model, &key);
        self.failure.remove(model);
        if !self.listed_ready(&key) && !self.seen_ready.iter().any(|(k, _, _)| *k == key) {
            self.seen_ready.push((key, model.to_owned(), now));
        }
        actions.extend(self.dispatch(model, now));
        actions
    }

    /// A spawned worker did not come up; `reason` says what the hive knows.
    pub fn worker_failed(
        &mut self,
        model: &str,
        key: &WorkerKey,
        reason: String,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = self.end_spawn_of(model, key);
        self.failure.insert(model.to_owned(), reason);
        self.spawn_refused(model, &key.hive, now);
        // The next try goes to another hive at once; once every hive failed, wait.
        if self
            .ranked_hives(model, now)
            .iter()
            .all(|h| self.failed_recently(&h.id, model, now))
        {
            self.refused_until
                .insert(model.to_owned(), add(now, SPAWN_RETRY_AFTER_REFUSAL));
        }
        actions.extend(self.dispatch(model, now));
        actions
    }

    /// The watch of a spawned worker gave up (it took longer than `spawn_wait`): the spawn no
    /// longer holds back others; a heartbeat tells when the worker comes up.
    pub fn watch_ended(&mut self, model: &str, key: &WorkerKey, now: Instant) -> Vec<Action> {
        let mut actions = self.end_spawn_of(model, key);
        actions.extend(self.dispatch(model, now));
        actions
    }

    /// A waiting request's timer fired: refuse it if its time is up, else look again (a spawn
    /// blocked by refusals may be tried again now).
    pub fn tick(&mut self, ticket: Ticket, now: Instant) -> Vec<Action> {
        let Some((model, w)) = self.find_waiter(ticket) else {
            return Vec::new();
        };
        let (model, w) = (model.to_owned(), w.clone());
        if now >= w.deadline {
            self.remove_waiter(ticket);
            let mut a = vec![
                Action::Reject {
                    ticket,
                    why: Rejection::Deadline,
                    error: ApiError::new(
                        codes::DEADLINE_EXCEEDED,
                        format!(
                            "the request's deadline passed while waiting for a worker for `{model}`"
                        ),
                    ),
                },
                self.depth(&model),
            ];
            a.extend(self.dispatch(&model, now));
            return a;
        }
        if now >= self.limit(&model, &w) {
            let ahead = self.position(&model, ticket);
            self.remove_waiter(ticket);
            let retry = self.retry_after(self.ready_workers(&model).len(), ahead);
            let mut a = vec![
                Action::Reject {
                    ticket,
                    why: Rejection::Timeout,
                    error: ApiError::new(
                        codes::NO_CAPACITY,
                        format!("no worker for `{model}` became free in time; retry in {retry} s"),
                    )
                    .retry_after(retry),
                },
                self.depth(&model),
            ];
            a.extend(self.dispatch(&model, now));
            return a;
        }
        self.dispatch(&model, now)
    }

    /// The shutdown drain window is over: every waiting request is refused.
    pub fn cut(&mut self) -> Vec<Action> {
        self.cut = true;
        let mut actions = Vec::new();
        for (model, q) in std::mem::take(&mut self.queues) {
            for w in q {
                actions.push(Action::Reject {
                    ticket: w.ticket,
                    why: Rejection::ShuttingDown,
                    error: shutting_down(),
                });
            }
            actions.push(Action::QueueDepth { model, depth: 0 });
        }
        actions
    }

    /// Counts a request against its client's limit (429 when over).
    pub fn admit_client(&mut self, client: &str, limit: Option<u32>) -> Result<(), ApiError> {
        let n = self.clients.entry(client.to_owned()).or_insert(0);
        if let Some(limit) = limit
            && *n >= limit
        {
            let retry = self.retry_after(1, 0);
            return Err(ApiError::new(
                codes::CLIENT_LIMIT,
                format!(
                    "client `{client}` already has {limit} requests in flight (its max_concurrent)"
                ),
            )
            .retry_after(retry));
        }
        *n += 1;
        Ok(())
    }

    /// A client's request is over.
    pub fn client_done(&mut self, client: &str) {
        if let Some(n) = self.clients.get_mut(client) {
            *n = n.saturating_sub(1);
        }
    }

    /// Records how long a request held its worker (for `Retry-After`).
    pub fn record_duration(&mut self, secs: f64) {
        if self.recent.len() == 64 {
            self.recent.pop_front();
        }
        self.recent.push_back(secs);
    }

    // ---- queries ------------------------------------------------------------------------

    /// When the shell should call [`Scheduler::tick`] for this request, if it still waits.
    pub fn wake_at(&self, ticket: Ticket, now: Instant) -> Option<Instant> {
        let (model, w) = self.find_waiter(ticket)?;
        let mut at = w.deadline.min(self.limit(model, w));
        if self.spawns.contains_key(model) && w.queue_deadline > now {
            // The queue's limit does not apply while a worker is being started; it may when
            // the spawn ends (then the request is re-armed).
            at = at.min(w.queue_deadline);
        }
        if let Some(t) = self.refused_until.get(model)
            && *t > now
        {
            at = at.min(*t);
        }
        Some(at)
    }

    /// Seconds until a place frees up, from the recent request durations and the number of
    /// ready workers for the model: at least 1.
    pub fn retry_after(&self, workers: usize, ahead: u32) -> u32 {
        let mean = if self.recent.is_empty() {
            5.0
        } else {
            self.recent.iter().sum::<f64>() / self.recent.len() as f64
        };
        let per_worker = (f64::from(ahead) + 1.0) / workers.max(1) as f64;
        (mean * per_worker).ceil().clamp(1.0, 3600.0) as u32
    }

    /// The hive a new worker for `model` would go to.
    pub fn best_hive(&self, model: &str, now: Instant) -> Option<String> {
        self.ranked_hives(model, now).first().map(|h| h.id.clone())
    }

    /// Requests waiting for `model`.
    pub fn queued(&self, model: &str) -> usize {
        self.queues.get(model).map_or(0, VecDeque::len)
    }

    // ---- the decision -------------------------------------------------------------------

    fn dispatch_all(&mut self, now: Instant) -> Vec<Action> {
        let models: Vec<String> = self.queues.keys().cloned().collect();
        models.iter().flat_map(|m| self.dispatch(m, now)).collect()
    }

    /// Gives free workers to the waiters of `model` in fair order (see [`fair::order`];
    /// a worker goes to the first request that can take it: a retry's avoided worker does not
    /// block those behind), then decides whether a new worker is needed.
    fn dispatch(&mut self, model: &str, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let waiting = self
            .queues
            .get(model)
            .map(|q| fair::order(q, &self.served))
            .unwrap_or_default();
        let mut granted = false;
        let mut rearm = Vec::new();
        for w in &waiting {
            let Some((key, url)) = self.pick(model, &w.avoid) else {
                continue;
            };
            *self.leases.entry(key.clone()).or_insert(0) += 1;
            self.grants += 1;
            self.served.insert(w.who.client.clone(), self.grants);
            if self.spawns.get(model) == Some(&Spawn::Starting(key.clone())) {
                // A heartbeat showed the spawned worker ready before its watch did.
                self.failure.remove(model);
                rearm.extend(self.end_spawn(model));
            }
            self.remove_waiter(w.ticket);
            granted = true;
            actions.push(Action::Grant {
                ticket: w.ticket,
                grant: Grant {
                    key,
                    hive_url: url,
                    spawned: w.spawned_at.is_some(),
                    waited: now.saturating_duration_since(w.arrived),
                    spawn_took: w.spawned_at.map(|t| now.saturating_duration_since(t)),
                },
            });
        }
        if granted {
            actions.push(self.depth(model));
        }
        actions.extend(rearm);
        let Some(first) = self.queues.get(model).and_then(|q| q.front()).cloned() else {
            return actions;
        };
        if self.spawns.contains_key(model) {
            return actions;
        }
        let remaining = self.queued(model);
        let starved = self.waiters_without_workers(model);
        // One request waiting for a busy worker waits; a second one, or one with no worker to
        // wait for, asks for another worker.
        if starved.is_empty() && remaining < 2 {
            return actions;
        }
        if self.spawn_blocked(model, now) {
            if let Some(reason) = self.failure.get(model).cloned() {
                let retry = self
                    .refused_until
                    .get(model)
                    .map_or(1, |t| t.saturating_duration_since(now).as_secs() as u32 + 1);
                for t in &starved {
                    self.remove_waiter(*t);
                    actions.push(Action::Reject {
                        ticket: *t,
                        why: Rejection::SpawnFailed,
                        error: ApiError::new(
                            codes::NO_CAPACITY,
                            format!("no worker for `{model}` could be started: {reason}"),
                        )
                        .retry_after(retry),
                    });
                }
                if !starved.is_empty() {
                    actions.push(self.depth(model));
                }
            }
            return actions;
        }
        let hives = self.ranked_hives(model, now);
        if hives.is_empty() {
            // Nothing drains here: the soonest change is a hive's next heartbeat.
            let retry = self.limits.heartbeat.as_secs().clamp(1, 300) as u32;
            for t in &starved {
                self.remove_waiter(*t);
                actions.push(Action::Reject {
                    ticket: *t,
                    why: Rejection::NoHive,
                    error: ApiError::new(codes::NO_CAPACITY, "no hive is up to run a worker")
                        .retry_after(retry),
                });
            }
            if !starved.is_empty() {
                actions.push(self.depth(model));
            }
            return actions;
        }
        // The request the new worker is for waits for the spawn (spawn_wait) rather than the
        // queue: the first with no worker at all, else the last in line (those before it get
        // the busy workers first).
        let last = self
            .queues
            .get(model)
            .and_then(|q| q.back())
            .map_or(first.ticket, |w| w.ticket);
        let asker = starved.first().copied().unwrap_or(last);
        if let Some(w) = self
            .queues
            .get_mut(model)
            .and_then(|q| q.iter_mut().find(|w| w.ticket == asker))
        {
            w.spawned_at.get_or_insert(now);
        }
        self.spawns.insert(model.to_owned(), Spawn::Asking);
        actions.push(Action::Spawn {
            model: model.to_owned(),
            hives: hives.into_iter().map(|h| (h.id, h.url)).collect(),
        });
        actions
    }

    /// The free worker for `model` on the least-used hive (stable tie-break: hive id, worker
    /// id), not one the request avoids.
    fn pick(&self, model: &str, avoid: &Option<Avoid>) -> Option<(WorkerKey, String)> {
        let mut best: Option<(u32, WorkerKey, String)> = None;
        for (key, url, slots) in self.ready_workers(model) {
            let used = self.leases.get(&key).copied().unwrap_or(0);
            if used >= slots || avoided(avoid, &key) {
                continue;
            }
            let load: u32 = self
                .leases
                .iter()
                .filter(|(k, _)| k.hive == key.hive)
                .map(|(_, n)| *n)
                .sum();
            let better = best.as_ref().is_none_or(|(l, k, _)| (load, &key) < (*l, k));
            if better {
                best = Some((load, key, url));
            }
        }
        best.map(|(_, k, u)| (k, u))
    }

    /// Ready workers for a model on hives that are up (heartbeats and our own spawns), with
    /// their hive's URL and their slots.
    fn ready_workers(&self, model: &str) -> Vec<(WorkerKey, String, u32)> {
        let mut out = Vec::new();
        for h in &self.hives {
            let Some(hb) = &h.heartbeat else { continue };
            for w in &hb.workers {
                if w.model == model && w.state.is_ready() {
                    out.push((WorkerKey::new(&h.id, &w.id), h.url.clone(), w.slots.max(1)));
                }
            }
        }
        for (key, m, _) in &self.seen_ready {
            if m == model
                && !out.iter().any(|(k, _, _)| k == key)
                && let Some(h) = self.hives.iter().find(|h| h.id == key.hive)
            {
                out.push((key.clone(), h.url.clone(), 1));
            }
        }
        out
    }

    fn listed_ready(&self, key: &WorkerKey) -> bool {
        self.hives.iter().any(|h| {
            h.id == key.hive
                && h.heartbeat.as_ref().is_some_and(|hb| {
                    hb.workers
                        .iter()
                        .any(|w| w.id == key.worker && w.state.is_ready())
                })
        })
    }

    /// Waiters of `model` that have no ready worker at all to wait for (the one their retry
    /// avoids does not count), oldest first.
    fn waiters_without_workers(&self, model: &str) -> Vec<Ticket> {
        let ready = self.ready_workers(model);
        self.queues
            .get(model)
            .map(|q| {
                q.iter()
                    .filter(|w| ready.iter().all(|(k, _, _)| avoided(&w.avoid, k)))
                    .map(|w| w.ticket)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Hives a new worker for `model` would go to, best first: not recently failed for it,
    /// the model on disk, most free memory, fewest workers, then id.
    fn ranked_hives(&self, model: &str, now: Instant) -> Vec<HiveRecord> {
        let mut hives: Vec<HiveRecord> = self
            .hives
            .iter()
            .filter(|h| h.heartbeat.is_some())
            .cloned()
            .collect();
        hives.sort_by_key(|h| {
            let hb = h.heartbeat.as_ref();
            (
                self.failed_recently(&h.id, model, now),
                !hb.is_some_and(|b| b.models.iter().any(|m| m == model)),
                std::cmp::Reverse(hb.map_or(0, |b| b.resources.memory_available_bytes)),
                hb.map_or(0, |b| b.workers.len()),
                h.id.clone(),
            )
        });
        hives
    }

    fn failed_recently(&self, hive: &str, model: &str, now: Instant) -> bool {
        self.hive_failed
            .get(&(hive.to_owned(), model.to_owned()))
            .is_some_and(|until| now < *until)
    }

    /// No spawn for `model` now: every hive refused or failed one moments ago (a hive that
    /// joined since, or one that has not failed, is still tried).
    fn spawn_blocked(&self, model: &str, now: Instant) -> bool {
        self.refused_until.get(model).is_some_and(|t| now < *t)
            && self
                .ranked_hives(model, now)
                .iter()
                .all(|h| self.failed_recently(&h.id, model, now))
    }

    /// A waiter's own limit: the spawn's while a worker is being started for its model (or it
    /// started one), else the queue's.
    fn limit(&self, model: &str, w: &Waiter) -> Instant {
        if w.spawned_at.is_some() || self.spawns.contains_key(model) {
            w.spawn_deadline
        } else {
            w.queue_deadline
        }
    }

    fn find_waiter(&self, ticket: Ticket) -> Option<(&str, &Waiter)> {
        self.queues.iter().find_map(|(m, q)| {
            q.iter()
                .find(|w| w.ticket == ticket)
                .map(|w| (m.as_str(), w))
        })
    }

    fn position(&self, model: &str, ticket: Ticket) -> u32 {
        self.queues
            .get(model)
            .and_then(|q| q.iter().position(|w| w.ticket == ticket))
            .unwrap_or(0) as u32
    }

    fn remove_waiter(&mut self, ticket: Ticket) -> Option<(String, Waiter)> {
        let model = self.find_waiter(ticket)?.0.to_owned();
        let q = self.queues.get_mut(&model)?;
        let i = q.iter().position(|w| w.ticket == ticket)?;
        let w = q.remove(i)?;
        if q.is_empty() {
            self.queues.remove(&model);
        }
        Some((model, w))
    }

    /// The spawn for `model` is over: the requests waiting for it look at their timers again
    /// (the queue's limit applies to them from now on).
    fn end_spawn(&mut self, model: &str) -> Vec<Action> {
        if self.spawns.remove(model).is_none() {
            return Vec::new();
        }
        let tickets: Vec<Ticket> = self
            .queues
            .get(model)
            .map(|q| q.iter().map(|w| w.ticket).collect())
            .unwrap_or_default();
        if tickets.is_empty() {
            Vec::new()
        } else {
            vec![Action::Rearm { tickets }]
        }
    }

    /// Ends the spawn for `model` if it is the one that started `key`.
    fn end_spawn_of(&mut self, model: &str, key: &WorkerKey) -> Vec<Action> {
        if self.spawns.get(model) == Some(&Spawn::Starting(key.clone())) {
            self.end_spawn(model)
        } else {
            Vec::new()
        }
    }

    fn depth(&self, model: &str) -> Action {
        Action::QueueDepth {
            model: model.to_owned(),
            depth: self.queued(model),
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        codes::SHUTTING_DOWN,
        "the queen shut down before a worker was free for this request",
    )
    .retry_after(5)
}

/// `now + d`, saturating far in the future instead of overflowing.
fn add(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

#[cfg(test)]
mod tests;
