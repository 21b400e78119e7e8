//! Crash and outage campaigns for the receiver: killed with SIGKILL again and again under
//! a steady load, every notification it acknowledged is pushed; on a full disk it answers
//! 503, never 200 for what it could not store, and recovers when there is space again.
//!
//! Short in CI; `DOVEPUSH_CAMPAIGN=full` (`./scripts/soak`) runs the sizes in the README's
//! Reliability table. Each prints one result line.

#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::{load, seed_devices, spawn_receiver};
use common::*;
use dovepush_testkit::loopfs::LoopFs;

fn full() -> bool {
    std::env::var("DOVEPUSH_CAMPAIGN").is_ok_and(|v| v == "full")
}

/// The outbox depth a running receiver reports.
async fn outbox_depth(addr: std::net::SocketAddr) -> Option<u64> {
    let metrics = admin_get(addr, "/metrics").await.text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("dovepush_outbox_depth "))?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_every_few_seconds_it_pushes_every_acknowledged_notification() {
    let (duration, between) = if full() {
        (Duration::from_secs(300), 3000..10_000u64)
    } else {
        (Duration::from_secs(15), 1000..3000u64)
    };
    let events = if full() { 150_000 } else { 10_000 };
    let dir = tempfile::tempdir().unwrap();
    let (apns, app) = mock_apns_app(dir.path()).await;
    let config = dir.path().join("receiver.toml");
    std::fs::write(&config, config_text(dir.path(), &app)).unwrap();
    seed_devices(&dir.path().join("store.sqlite"), events).await;

    // A steady load across restarts: ids are handed out once, acknowledged ones noted.
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut kills = 0;
    let (mut child, mut addr) = spawn_receiver(&config, &dir.path().join("run0.log"));
    loop {
        let stop = Arc::new(AtomicBool::new(false));
        // 200 notifications a second, in blocks of 20 every 100 ms.
        let pacer = {
            let (next, acked, stop) = (next.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let from = next.fetch_add(20, Ordering::Relaxed);
                    if from >= events {
                        return;
                    }
                    let ids: Vec<usize> = (from..(from + 20).min(events)).collect();
                    let ok = load(addr, ids, 4, stop.clone()).await;
                    acked.lock().unwrap().extend(ok);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let done = started.elapsed() >= duration;
        if done {
            // The last instance: stop loading, let it send everything.
            stop.store(true, Ordering::Relaxed);
            let _ = pacer.await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(between.clone()))).await;
        // SAFETY: a plain syscall sending a signal to our own child process.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = child.wait();
        stop.store(true, Ordering::Relaxed);
        let _ = pacer.await;
        kills += 1;
        (child, addr) = spawn_receiver(&config, &dir.path().join(format!("run{kills}.log")));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while outbox_depth(addr).await != Some(0) {
        assert!(Instant::now() < deadline, "the outbox never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let requests = apns.requests();
    let pushed: HashSet<String> = requests.iter().map(|r| r.device_token.clone()).collect();
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<&usize> = acked
        .iter()
        .filter(|n| !pushed.contains(&format!("tok{n}")))
        .collect();
    println!(
        "campaign kill-9: {:?}, {kills} kills (seed {seed}), {} acknowledged, {} pushes ({} twice), {} lost",
        started.elapsed(),
        acked.len(),
        requests.len(),
        requests.len() - pushed.len(),
        lost.len()
    );
    assert!(kills >= 3, "only {kills} kills");
    assert!(acked.len() > 500, "only {} acknowledged", acked.len());
    assert!(lost.is_empty(), "acknowledged but never pushed: {lost:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_503_never_200_and_space_brings_200_back() {
    let rounds = if full() { 2000 } else { 200 };
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(dir.path(), "small", 32).expect("a small loop-mounted ext4 (root)");
    let store = fs.path().join("store.sqlite");
    let text = config_text(dir.path(), "").replace(
        &format!("path = \"{}\"", dir.path().join("store.sqlite").display()),
        &format!("path = \"{}\"", store.display()),
    );
    let config = dir.path().join("receiver.toml");
    std::fs::write(&config, text).unwrap();
    seed_devices(&store, rounds * 3).await;
    let (mut child, addr) = spawn_receiver(&config, &dir.path().join("run.log"));

    // Fill the disk to the last block.
    let filler = fs.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        let _ = file.sync_all();
    }
    let no_stop = || Arc::new(AtomicBool::new(false));
    let refused = request(
        addr,
        "PUT",
        NOTIFY_PATH,
        &[
            ("authorization", &notify_auth()),
            ("x-dovepush-event-id", "probe"),
        ],
        notification("u0", 1, 1),
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(
        refused.json()["error"],
        "store unavailable, try again later"
    );
    let full_ids: Vec<usize> = (0..rounds).collect();
    let acked_while_full = load(addr, full_ids.clone(), 4, no_stop()).await;
    // Space again: the receiver recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let later: Vec<usize> = (rounds..2 * rounds).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acked_after: Vec<usize> = Vec::new();
    while acked_after.len() < later.len() && Instant::now() < deadline {
        let missing: Vec<usize> = later
            .iter()
            .filter(|n| !acked_after.contains(n))
            .copied()
            .collect();
        acked_after.extend(load(addr, missing, 4, no_stop()).await);
    }
    // Every 200 is in the store, during the full disk and after.
    let _ = child.kill();
    let _ = child.wait();
    let events = dovepush_receiver::store::sqlite::inspect::event_ids(&store).unwrap();
    let missing: Vec<&usize> = acked_while_full
        .iter()
        .chain(&acked_after)
        .filter(|n| !events.contains(&format!("ev-{n}")))
        .collect();
    println!(
        "campaign disk-full: {rounds} notifications on a full disk, {} answered 200 (stored: {}), \
         then {} of {} answered 200 once space was back; {} acknowledged but not stored",
        acked_while_full.len(),
        acked_while_full.len() - missing.len().min(acked_while_full.len()),
        acked_after.len(),
        later.len(),
        missing.len()
    );
    assert!(
        acked_while_full.len() < rounds,
        "the disk never filled: every notification was stored"
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert_eq!(acked_after.len(), later.len(), "it did not recover");
    drop(fs);
}
