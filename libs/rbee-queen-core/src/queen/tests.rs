//! The queen's shell around the scheduler: hive ranking through the registry and leases that
//! pass a freed worker on, with the real `Queen` and no network.

#![allow(clippy::unwrap_used)]

use super::*;
use rbee_api::{HiveHeartbeat, NodeResources};

fn beat(id: &str, free: u64) -> HiveHeartbeat {
    HiveHeartbeat {
        hive_id: id.into(),
        url: format!("http://127.0.0.1:1/{id}"),
        version: "test".into(),
        resources: NodeResources {
            cpu_cores: 2,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: free,
            gpus: Vec::new(),
            model_disk_free_bytes: 1 << 30,
        },
        workers: Vec::new(),
        models: vec!["file:m.gguf".into()],
        model_sha256: Default::default(),
    }
}

/// A hive joining as a real one does: the join token, then its issued credential.
fn join(queen: &Queen, hb: &HiveHeartbeat) {
    let answer = queen
        .heartbeat(hb, rbee_registry::BeatAuth::Join, None, "t")
        .unwrap();
    let credential = answer.credential.unwrap();
    queen
        .heartbeat(
            hb,
            rbee_registry::BeatAuth::Credential(&credential),
            None,
            "t",
        )
        .unwrap();
}

#[test]
fn a_hive_that_failed_a_spawn_ranks_last_for_that_model_only() {
    let queen = Queen::new(
        QueenConfig::default(),
        Tokens::default(),
        Registry::open_in_memory().unwrap(),
    )
    .unwrap();
    join(&queen, &beat("roomy", 6 << 30));
    join(&queen, &beat("tight", 2 << 30));
    assert_eq!(queen.best_hive("file:m.gguf").as_deref(), Some("roomy"));
    lock(&queen.sched).spawn_refused("file:m.gguf", "roomy", Instant::now());
    assert_eq!(queen.best_hive("file:m.gguf").as_deref(), Some("tight"));
    assert_eq!(queen.best_hive("file:other.gguf").as_deref(), Some("roomy"));
}

#[test]
fn a_grant_for_a_request_that_left_passes_the_worker_on_without_deadlock() {
    // On its own thread and runtime: before the fix this deadlocked (the dropped lease
    // re-entered the scheduler while the waiters' lock was held), and a regression must
    // fail the test, not hang it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _ = tx.send(rt.block_on(grant_to_a_request_that_left()));
    });
    let worker = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(worker, "w1");
}

/// One worker; a request holds it, the next in line has left, a third waits. The worker
/// freed by the first goes, through the one that left, to the third.
async fn grant_to_a_request_that_left() -> String {
    let queen = Queen::new(
        QueenConfig::default(),
        Tokens::default(),
        Registry::open_in_memory().unwrap(),
    )
    .unwrap();
    let mut hb = beat("h1", 4 << 30);
    hb.workers.push(rbee_api::HeartbeatWorker {
        id: "w1".into(),
        model: "file:m.gguf".into(),
        device: "cpu".into(),
        state: rbee_api::WorkerState::Ready,
        busy: false,
        slots: 1,
    });
    join(&queen, &hb);
    let far = Instant::now() + Duration::from_secs(600);
    let first = queen
        .lease("file:m.gguf", "a", alice(), far, None)
        .await
        .unwrap();
    // Next in line, but its client is gone: its answer cannot be delivered, so the lease
    // it is granted is dropped on the spot.
    let (gone, rx) = oneshot::channel();
    drop(rx);
    let (ticket, _) = lock(&queen.sched)
        .arrive("file:m.gguf", alice(), None, far, Instant::now())
        .unwrap();
    lock(&queen.waiters).insert(
        ticket,
        Waiting {
            answer: gone,
            rearm: Arc::new(tokio::sync::Notify::new()),
        },
    );
    let q = queen.clone();
    let third = tokio::spawn(async move { q.lease("file:m.gguf", "c", alice(), far, None).await });
    while lock(&queen.sched).queued("file:m.gguf") < 2 {
        tokio::task::yield_now().await;
    }
    drop(first);
    third.await.unwrap().unwrap().worker_id.clone()
}

fn alice() -> Requester {
    Requester::new("alice", 0)
}
