//! End to end: push trouble never slows, fails or loses a delivery.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{dovecot_with_dovepush, wait_until, WAIT};
use dovepush_testkit::dovecot::Dovecot;
use dovepush_testkit::free_port;
use dovepush_testkit::messages;
use dovepush_testkit::sink::{url_for, Request, Sink};

#[test]
fn receiver_down_for_50_deliveries_then_up_each_arrives_once() {
    let port = free_port();
    let dovecot = dovecot_with_dovepush(
        &url_for(port, None),
        &[
            ("dovepush_spool_retry_interval", "1s"),
            ("dovepush_max_retries", "1"),
        ],
    );
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    // One connection = one lmtp process for the whole test.
    let mut lmtp = dovecot.lmtp().unwrap();
    for n in 0..50 {
        let latency = lmtp
            .deliver(&["alice@example.com"], &messages::simple(n))
            .unwrap();
        assert!(
            latency < Duration::from_secs(1),
            "delivery {n} took {latency:?}"
        );
    }
    assert!(
        wait_until(WAIT, || dovecot.queued_files().len() == 50),
        "expected 50 queued events, found {}\n{}",
        dovecot.queued_files().len(),
        dovecot.log()
    );

    let sink = Sink::start_on(port).unwrap();
    let all_arrived = wait_until(WAIT, || {
        let ids: HashSet<String> = sink
            .requests()
            .iter()
            .filter_map(|r| r.event_id().map(str::to_string))
            .collect();
        ids.len() == 50
    });
    assert!(
        all_arrived,
        "only {} arrived\n{}",
        sink.requests().len(),
        dovecot.log()
    );
    let uids: HashSet<u64> = sink
        .requests()
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert_eq!(uids, (1..=50).collect::<HashSet<u64>>());
    assert!(wait_until(WAIT, || dovecot.queued_files().is_empty()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.requests().len(), 50, "each event once");
    // The same connection (and so the same lmtp process) still delivers.
    lmtp.deliver(&["alice@example.com"], &messages::simple(51))
        .unwrap();
    assert!(wait_until(WAIT, || sink.requests().len() >= 51));
}

#[test]
fn a_receiver_that_sleeps_5s_does_not_slow_lmtp_replies() {
    let sink = Sink::start();
    sink.set_delay(Duration::from_secs(5));
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[("dovepush_timeout_msecs", "10000")]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    let mut worst = Duration::ZERO;
    for n in 0..20 {
        worst = worst.max(
            lmtp.deliver(&["alice@example.com"], &messages::simple(n))
                .unwrap(),
        );
    }
    // The stock ox driver would hold each reply for the whole 5 s exchange.
    assert!(
        worst < Duration::from_secs(1),
        "slowest LMTP reply took {worst:?}"
    );
    let requests = sink.wait_for(20, Duration::from_secs(30));
    assert_eq!(requests.len(), 20, "{}", dovecot.log());
}

#[test]
fn malformed_mail_delivers_and_notifies() {
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    let mails = [
        messages::bad_encoded_words(),
        messages::missing_from(),
        messages::huge_subject(),
    ];
    for mail in &mails {
        lmtp.deliver(&["alice@example.com"], mail).unwrap();
    }
    let (ok, stderr) = dovecot
        .deliver_lda("alice", &messages::huge_subject())
        .unwrap();
    assert!(ok, "{stderr}");
    let requests = sink.wait_for(4, WAIT);
    assert_eq!(requests.len(), 4, "{}", dovecot.log());
    let mut by_uid: Vec<serde_json::Value> = requests.iter().map(|r| r.json()).collect();
    by_uid.sort_by_key(|b| b["imap-uid"].as_u64());
    assert!(by_uid[0]["subject"].as_str().unwrap().contains('\u{fffd}'));
    assert!(
        by_uid[1].get("from").is_none(),
        "no From header, no from key"
    );
    assert_eq!(by_uid[1]["subject"], "no sender");
    for big in &by_uid[2..] {
        let subject = big["subject"].as_str().unwrap();
        assert!(
            subject.len() <= 4096 && subject.starts_with("xxxx"),
            "{}",
            subject.len()
        );
    }
    for r in &requests {
        assert!(r.body.len() < 16 * 1024);
    }
}

/// Waits for `n` notifications and checks that none carries UID 0 and no two the same
/// UID; returns them.
fn all_notified_with_distinct_uids(sink: &Sink, n: usize, dovecot: &Dovecot) -> Vec<Request> {
    let requests = sink.wait_for(n, WAIT);
    assert_eq!(requests.len(), n, "{}", dovecot.log());
    let uids: HashSet<u64> = requests
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert!(!uids.contains(&0), "{}", dovecot.log());
    assert_eq!(uids.len(), n, "UIDs are distinct");
    requests
}

#[test]
fn lmtp_processes_that_exit_after_one_connection_send_no_uid_0() {
    // service_count = 1: each LMTP connection is a process of its own, which exits as
    // soon as the client quits; there is no ioloop left to give UIDs later.
    let sink = Sink::start();
    let mut dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    let config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    let config = config.replacen(
        "service lmtp {\n",
        "service lmtp {\n  service_count = 1\n",
        1,
    );
    std::fs::write(dovecot.config_path(), config).unwrap();
    dovecot.restart().expect("restarting Dovecot");
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let per_thread = 15;
    std::thread::scope(|scope| {
        for c in 0..4 {
            let dovecot = &dovecot;
            scope.spawn(move || {
                for n in 0..per_thread {
                    let mut lmtp = dovecot.lmtp().unwrap();
                    lmtp.deliver(&["alice@example.com"], &messages::simple(c * 1000 + n))
                        .unwrap();
                }
            });
        }
    });
    all_notified_with_distinct_uids(&sink, 4 * per_thread, &dovecot);
}

#[test]
fn concurrent_maildir_deliveries_never_carry_uid_0() {
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let per_connection = 50;
    std::thread::scope(|scope| {
        for c in 0..4 {
            let dovecot = &dovecot;
            scope.spawn(move || {
                let mut lmtp = dovecot.lmtp().unwrap();
                for n in 0..per_connection {
                    lmtp.deliver(&["alice@example.com"], &messages::simple(c * 1000 + n))
                        .unwrap();
                }
            });
        }
    });
    let requests = all_notified_with_distinct_uids(&sink, 4 * per_connection, &dovecot);

    // The UIDs dovepush assigned after the commit are the ones IMAP shows: each notified
    // UID opens the message that was notified (its number ends the subject), and
    // Dovecot found nothing to complain about while taking them into its index.
    let fetched = dovecot
        .doveadm(&[
            "fetch",
            "-u",
            "alice",
            "uid hdr.message-id",
            "mailbox",
            "INBOX",
            "all",
        ])
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    let listing = String::from_utf8_lossy(&fetched.stdout);
    let mut number_of_uid = std::collections::HashMap::new();
    let mut uid = None;
    for line in listing.lines() {
        if let Some(v) = line.strip_prefix("uid: ") {
            uid = v.trim().parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("hdr.message-id: ") {
            let n: u64 = v
                .trim()
                .trim_start_matches("<m")
                .split('@')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            number_of_uid.insert(uid.take().unwrap(), n);
        }
    }
    assert_eq!(number_of_uid.len(), 4 * per_connection, "{listing}");
    for request in &requests {
        let body = request.json();
        let uid = body["imap-uid"].as_u64().unwrap();
        let subject = body["subject"].as_str().unwrap();
        let n: u64 = subject.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(
            number_of_uid.get(&uid),
            Some(&n),
            "UID {uid} is not {subject:?}"
        );
    }
    let log = dovecot.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error:") || l.contains("Panic:") || l.contains("Warning:"))
        // The master logs this when a test restarts its instance.
        .filter(|l| !l.contains("master: Warning: Killed with signal 15"))
        .collect();
    assert!(complaints.is_empty(), "{log}");
}

#[test]
fn lda_returns_at_once_and_the_service_sends_what_the_receiver_missed_when_it_is_back() {
    let port = free_port();
    let dovecot = dovecot_with_dovepush(
        &url_for(port, None),
        &[
            ("dovepush_max_retries", "0"),
            ("dovepush_timeout_msecs", "500"),
            ("dovepush_spool_retry_interval", "1s"),
        ],
    );
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let started = Instant::now();
    let (ok, stderr) = dovecot.deliver_lda("alice", &messages::simple(1)).unwrap();
    assert!(ok, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "dovecot-lda waited {:?}",
        started.elapsed()
    );
    assert!(
        wait_until(WAIT, || dovecot.queued_files().len() == 1),
        "{}",
        dovecot.log()
    );

    let sink = Sink::start_on(port).unwrap();
    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "{}", dovecot.log());
    assert_eq!(requests[0].json()["user"], "alice");
    assert!(
        wait_until(WAIT, || dovecot.queued_files().is_empty()),
        "{}",
        dovecot.log()
    );
    let (ok, _) = dovecot.deliver_lda("alice", &messages::simple(2)).unwrap();
    assert!(ok);
    let requests = sink.wait_for(2, WAIT);
    let uids: HashSet<u64> = requests
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert_eq!(uids, HashSet::from([1, 2]), "{}", dovecot.log());
}
