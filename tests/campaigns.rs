//! Outage and hostile-input campaigns for the delivery path (real Dovecot, the plugin and
//! the sender service): the receiver down for a long stretch in the middle of a stream of
//! deliveries, and a corpus of mutated real-world mails.
//!
//! Short in CI; `DOVEPUSH_CAMPAIGN=full` (`./scripts/soak`) runs the sizes in the README's
//! Reliability table. Each prints one result line.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{dovecot_with_dovepush, wait_until, WAIT};
use dovepush_protocol::Notification;
use dovepush_testkit::free_port;
use dovepush_testkit::messages;
use dovepush_testkit::sink::{url_for, Sink};

fn full() -> bool {
    std::env::var("DOVEPUSH_CAMPAIGN").is_ok_and(|v| v == "full")
}

#[test]
fn the_receiver_down_mid_stream_every_delivery_still_notifies() {
    // Full: 1000 deliveries over 4 connections in about two minutes, the receiver down
    // from 30 s to 90 s. CI: 200 in about ten seconds, down from 3 s to 8 s.
    let (n, pace, down_at, up_at) = if full() {
        (
            1000,
            Duration::from_millis(480),
            Duration::from_secs(30),
            Duration::from_secs(90),
        )
    } else {
        (
            200,
            Duration::from_millis(200),
            Duration::from_secs(3),
            Duration::from_secs(8),
        )
    };
    let port = free_port();
    let dovecot = dovecot_with_dovepush(
        &url_for(port, None),
        &[
            ("dovepush_spool_retry_interval", "1s"),
            ("dovepush_timeout_msecs", "500"),
        ],
    );
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let sink = Mutex::new(Some(Sink::start_on(port).unwrap()));
    let before_outage = Mutex::new(HashSet::new());
    let latencies = Mutex::new(Vec::new());
    let failures = Mutex::new(0usize);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..4 {
            let (dovecot, latencies, failures) = (&dovecot, &latencies, &failures);
            scope.spawn(move || {
                let mut lmtp = dovecot.lmtp().unwrap();
                for k in 0..n / 4 {
                    let next = started + pace * (k as u32);
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    match lmtp.deliver(&["alice@example.com"], &messages::simple(c * 10_000 + k)) {
                        Ok(latency) => latencies.lock().unwrap().push(latency),
                        Err(_) => *failures.lock().unwrap() += 1,
                    }
                }
            });
        }
        // The receiver goes away, and comes back on the same port.
        std::thread::sleep(down_at.saturating_sub(started.elapsed()));
        let first = sink.lock().unwrap().take().unwrap();
        before_outage.lock().unwrap().extend(
            first
                .requests()
                .iter()
                .filter_map(|r| r.event_id().map(str::to_string)),
        );
        drop(first);
        std::thread::sleep(up_at.saturating_sub(started.elapsed()));
        *sink.lock().unwrap() = Some(Sink::start_on(port).unwrap());
    });
    let sink = sink.into_inner().unwrap().unwrap();
    let before_outage = before_outage.into_inner().unwrap();
    let ids = || -> HashSet<String> {
        let mut ids = before_outage.clone();
        ids.extend(
            sink.requests()
                .iter()
                .filter_map(|r| r.event_id().map(str::to_string)),
        );
        ids
    };
    let all = wait_until(Duration::from_secs(120), || ids().len() == n);
    let latencies = latencies.into_inner().unwrap();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    let failures = failures.into_inner().unwrap();
    println!(
        "campaign receiver-down: {n} deliveries, receiver down {:?}, {} notified, {} failed deliveries, slowest LMTP reply {worst:?}, all notified {:?} after the start",
        up_at - down_at,
        ids().len(),
        failures,
        started.elapsed()
    );
    assert!(all, "{} of {n} notified\n{}", ids().len(), dovecot.log());
    assert_eq!(failures, 0);
    assert_eq!(latencies.len(), n);
    let bound = if full() {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    assert!(worst < bound, "an LMTP reply took {worst:?}");
}

#[test]
fn mutated_mails_all_deliver_and_notify_with_bodies_the_receiver_accepts() {
    let n = if full() { 1000 } else { 100 };
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lmtp = dovecot.lmtp().unwrap();
    let mut failed = Vec::new();
    let mut bytes = 0usize;
    for i in 0..n {
        let mail = messages::mutated(&mut rng);
        bytes += mail.len();
        if let Err(e) = lmtp.deliver(&["alice@example.com"], &mail) {
            failed.push((i, e.to_string()));
            lmtp = dovecot.lmtp().unwrap();
        }
    }
    let requests = sink.wait_for(n, WAIT * 3);
    let bad: Vec<String> = requests
        .iter()
        .filter_map(|r| {
            Notification::from_json(&r.body)
                .err()
                .map(|e| e.to_string())
        })
        .collect();
    let log = dovecot.log();
    let crashes = log
        .lines()
        .filter(|l| {
            l.contains("Panic:") || l.contains("Fatal:") || l.contains("killed with signal")
        })
        .count();
    println!(
        "campaign mutated mails: {n} mails ({} MB, seed {seed}), {} failed deliveries, {} notifications, {} the receiver refuses, {crashes} Dovecot crashes",
        bytes / 1_000_000,
        failed.len(),
        requests.len(),
        bad.len()
    );
    assert!(failed.is_empty(), "seed {seed}: {failed:?}");
    assert_eq!(requests.len(), n, "seed {seed}\n{log}");
    assert!(bad.is_empty(), "seed {seed}: {bad:?}");
    assert_eq!(crashes, 0, "seed {seed}\n{log}");
}
