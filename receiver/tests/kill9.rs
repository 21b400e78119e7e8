//! `kill -9` under load: every notification answered 200 is in the store after a restart.
//!
//! Runs the real binary as a child process, loads it with 2000 notifications over 32
//! keep-alive connections, SIGKILLs it mid-load, restarts it, and checks that every
//! acknowledged event id is committed (event log and outbox). Then the whole load is sent
//! again: committed events are recognised as duplicates, the rest are added, and the store
//! ends with exactly one event and one outbox item per notification.

// Signals go out through libc: every unsafe block says why it is sound (the workspace
// cannot turn this lint on for every crate yet, see Cargo.toml).
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::child::{load, seed_devices, spawn_receiver};
use common::*;
use dovepush_receiver::store::sqlite::inspect;

const EVENTS: usize = 2000;
const CONNECTIONS: usize = 32;
const KILL_AFTER: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("receiver.toml");
    std::fs::write(&config_path, config_text(dir.path(), "")).unwrap();
    let store_path = dir.path().join("store.sqlite");

    // One device per user, so every event becomes its own outbox item.
    seed_devices(&store_path, EVENTS).await;

    let (mut child, addr) = spawn_receiver(&config_path, &dir.path().join("run1.log"));
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = {
        let stop = stop.clone();
        tokio::spawn(load(addr, (0..EVENTS).collect(), CONNECTIONS, stop))
    };
    // Kill once enough events are committed (watching the store file).
    let pid = child.id() as libc::pid_t;
    let killer = {
        let store_path = store_path.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let n = inspect::event_ids(&store_path)
                    .map(|s| s.len())
                    .unwrap_or(0);
                if n >= KILL_AFTER || std::time::Instant::now() > deadline {
                    // SAFETY: plain FFI call sending a signal to our own child process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return n;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let committed_at_kill = killer.await.unwrap();
    let acked = load_task.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let status = child.wait().unwrap();
    assert!(!status.success(), "the receiver was killed");
    assert!(committed_at_kill >= KILL_AFTER);
    assert!(
        acked.len() < EVENTS,
        "the kill came after the whole load ({} acked): not a mid-load kill",
        acked.len()
    );
    assert!(acked.len() >= KILL_AFTER / 2, "only {} acked", acked.len());
    eprintln!(
        "killed with {committed_at_kill} events committed, {} acknowledged",
        acked.len()
    );

    // Restart and check every acknowledged event.
    let (mut child, addr) = spawn_receiver(&config_path, &dir.path().join("run2.log"));
    let events = inspect::event_ids(&store_path).unwrap();
    let outbox = inspect::outbox_event_ids(&store_path).unwrap();
    let missing: Vec<_> = acked
        .iter()
        .filter(|n| !events.contains(&format!("ev-{n}")) || !outbox.contains(&format!("ev-{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost: {missing:?}",
        missing.len()
    );

    // Send everything again: the lost-in-flight rest is added, the committed are duplicates.
    let again = load(
        addr,
        (0..EVENTS).collect(),
        CONNECTIONS,
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    assert_eq!(again.len(), EVENTS);
    let events = inspect::event_ids(&store_path).unwrap();
    let outbox = inspect::outbox_event_ids(&store_path).unwrap();
    let all: HashSet<String> = (0..EVENTS).map(|n| format!("ev-{n}")).collect();
    assert_eq!(events, all);
    assert_eq!(outbox, all);
    let m = admin_get(addr, "/metrics").await.text();
    let duplicates: usize = m
        .lines()
        .find_map(|l| l.strip_prefix("dovepush_ingest_duplicates_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        duplicates >= acked.len(),
        "{duplicates} duplicates < {} acked",
        acked.len()
    );
    assert!(
        m.contains(&format!("dovepush_outbox_depth {EVENTS}\n")),
        "{m}"
    );

    // SIGTERM: a clean stop.
    // SAFETY: plain FFI call sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}
