//! End to end: the sender service (`service dovepush`) as a hostile local user and a
//! killed process would meet it.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{dovecot_with_dovepush, wait_until, WAIT};
use dovepush_testkit::dovecot::{system_user, Dovecot, SENDER_USER, STRANGER_USER};
use dovepush_testkit::free_port;
use dovepush_testkit::fswatch::OpenWatch;
use dovepush_testkit::messages;
use dovepush_testkit::procfs;
use dovepush_testkit::sink::{url_for, Sink};

/// Deliver `per_connection` mails to alice over each of `connections` LMTP connections
/// at once; mail numbers are `connection * 1000 + n`.
fn deliver_concurrently(dovecot: &Dovecot, connections: usize, per_connection: usize) {
    std::thread::scope(|scope| {
        for c in 0..connections {
            scope.spawn(move || {
                let mut lmtp = dovecot.lmtp().unwrap();
                for n in 0..per_connection {
                    let latency = lmtp
                        .deliver(&["alice@example.com"], &messages::simple(c * 1000 + n))
                        .unwrap();
                    assert!(
                        latency < Duration::from_secs(1),
                        "a delivery took {latency:?}"
                    );
                }
            });
        }
    });
}

/// Event ids and how often each arrived.
fn arrivals(sink: &Sink) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for request in sink.requests() {
        *seen
            .entry(request.event_id().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    seen
}

/// Run `script` with `sh -c` as the unprivileged local user.
fn as_stranger(script: &str) {
    let (uid, gid) = system_user(STRANGER_USER).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
}

#[test]
fn a_hostile_drop_spool_stalls_nothing_and_each_event_is_sent_exactly_once() {
    let port = free_port();
    let foreign = Sink::start();
    let dovecot = dovecot_with_dovepush(
        &url_for(port, Some("dovecot:s3cret")),
        &[
            ("dovepush_max_retries", "0"),
            ("dovepush_timeout_msecs", "500"),
            ("dovepush_spool_retry_interval", "1s"),
        ],
    );
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    assert!(dovecot.wait_for_sender(WAIT).is_some(), "{}", dovecot.log());
    let drop = dovecot.spool_dir().join("drop");
    let (stranger, _) = system_user(STRANGER_USER).unwrap();

    // A root-only file the service must never open.
    let secret = dovecot.path().join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let watch = OpenWatch::new(&secret).unwrap();
    // A valid-looking record for another user (the receiver is the configured one: a
    // record names no URL) and one that names a foreign URL.
    let record = |id: &str, user: &str, endpoint: Option<&str>| {
        let mut record = serde_json::json!({
            "v": 2, "id": id, "user": user, "subscriber": user,
            "created_ms": 1_700_000_000_000u64,
            "body": {"user": user, "event": "messageNew", "folder": "INBOX",
                     "imap-uidvalidity": 1, "imap-uid": 1, "subject": "Your Bank: FORGED"},
        });
        if let Some(endpoint) = endpoint {
            record["endpoint"] = endpoint.into();
        }
        record.to_string()
    };
    let forged = record("forged1", "bob", None);
    let foreign_record = record("forged2", "bob", Some(&foreign.url(None)));
    let d = drop.display();
    as_stranger(&format!(
        "mkfifo {d}/fifo.json && ln -s {secret} {d}/link.json && \
         truncate -s 200M {d}/big.json && \
         printf '%s' '{forged}' > {d}/forged.json && \
         printf '%s' '{foreign_record}' > {d}/foreign.json",
        secret = secret.display()
    ));
    // The stranger can add files but cannot list what is there.
    let listing = Command::new("ls")
        .arg(&drop)
        .uid(stranger)
        .output()
        .unwrap();
    assert!(!listing.status.success(), "drop/ must not be listable");

    // The receiver is down for 100 deliveries over 4 connections.
    deliver_concurrently(&dovecot, 4, 25);
    assert!(
        wait_until(WAIT, || dovecot.queued_files().len() == 100),
        "expected 100 queued events, found {}\n{}",
        dovecot.queued_files().len(),
        dovecot.log()
    );
    let sink = Sink::start_on(port).unwrap();
    assert!(
        wait_until(WAIT, || arrivals(&sink).len() == 100),
        "{} of 100 arrived\n{}",
        arrivals(&sink).len(),
        dovecot.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let seen = arrivals(&sink);
    assert_eq!(seen.len(), 100);
    assert!(
        seen.values().all(|&n| n == 1),
        "repeats: {:?}",
        seen.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    assert!(sink
        .requests()
        .iter()
        .all(|r| r.json()["user"] == "alice@example.com"));
    assert!(
        foreign.requests().is_empty(),
        "nothing goes to a foreign URL"
    );
    assert!(!watch.opened(), "the link's target was opened");
    assert!(dovecot.queued_files().is_empty());

    // Every planted entry is gone from drop/, each refusal logged with the owner's uid.
    let left: Vec<_> = std::fs::read_dir(&drop).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let log = dovecot.log();
    for name in [
        "fifo.json",
        "link.json",
        "big.json",
        "forged.json",
        "foreign.json",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(name) && l.contains(&format!("uid {stranger}")))
            .unwrap_or_else(|| panic!("no refusal of {name} logged:\n{log}"));
        assert!(line.contains("dovepush"), "{line}");
    }
    // Its memory stayed small (the 200 MB file was never read).
    let sender = dovecot.sender_pid().unwrap();
    let rss_kb = procfs::status_field(sender, "VmRSS").unwrap();
    assert!(rss_kb < 64 * 1024, "the sender uses {rss_kb} kB");
}

#[test]
fn no_dovepush_process_runs_as_root_and_mail_processes_stay_single_threaded() {
    let sink = Sink::start();
    sink.set_delay(Duration::from_millis(20));
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let master = dovecot.master_pid().unwrap();
    let (sender_uid, _) = system_user(SENDER_USER).unwrap();
    let mut looked = 0;
    std::thread::scope(|scope| {
        let delivering = scope.spawn(|| deliver_concurrently(&dovecot, 4, 40));
        while !delivering.is_finished() {
            for p in procfs::all() {
                if p.comm.starts_with("dovepush") {
                    let uids = procfs::uids(p.pid);
                    assert!(
                        uids.is_some_and(|u| !u.contains(&0)),
                        "{} ({}) runs with uids {uids:?}",
                        p.comm,
                        p.pid
                    );
                }
                if p.ppid() == Some(master) && p.comm == "lmtp" {
                    looked += 1;
                    assert_eq!(procfs::status_field(p.pid, "Threads"), Some(1));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(looked > 0, "no lmtp process was seen");
    let sender = dovecot.sender_pid().unwrap();
    assert_eq!(procfs::uids(sender), Some([sender_uid; 4]));
    assert_eq!(sink.wait_for(160, WAIT).len(), 160, "{}", dovecot.log());
}

#[test]
fn the_service_killed_mid_load_is_restarted_and_nothing_is_lost() {
    let sink = Sink::start();
    sink.set_delay(Duration::from_millis(30));
    let dovecot =
        dovecot_with_dovepush(&sink.url(None), &[("dovepush_spool_retry_interval", "1s")]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let first = dovecot.wait_for_sender(WAIT).expect("the service runs");
    std::thread::scope(|scope| {
        let delivering = scope.spawn(|| deliver_concurrently(&dovecot, 4, 50));
        assert!(wait_until(WAIT, || sink.requests().len() >= 40));
        let killed = Command::new("kill")
            .args(["-KILL", &first.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        delivering.join().unwrap();
    });
    let second = dovecot
        .wait_for_sender(WAIT)
        .expect("the master starts it again");
    assert_ne!(first, second);
    assert!(
        wait_until(WAIT, || arrivals(&sink).len() == 200),
        "{} of 200 arrived\n{}",
        arrivals(&sink).len(),
        dovecot.log()
    );
    let uids: HashSet<u64> = sink
        .requests()
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert_eq!(uids.len(), 200);
    assert!(wait_until(WAIT, || dovecot.queued_files().is_empty()));
    // What lmtp left in drop/ for the dead service was taken by the new one.
    let drop = dovecot.spool_dir().join("drop");
    assert!(
        wait_until(WAIT, || std::fs::read_dir(&drop).unwrap().next().is_none()),
        "{:?}\n{}",
        std::fs::read_dir(&drop).unwrap().collect::<Vec<_>>(),
        dovecot.log()
    );
}

#[test]
fn a_reload_hands_the_service_new_endpoints() {
    let old = Sink::start();
    let new = Sink::start();
    let dovecot = dovecot_with_dovepush(&old.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let first = dovecot.wait_for_sender(WAIT).expect("the service runs");
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    assert_eq!(old.wait_for(1, WAIT).len(), 1);
    let config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    std::fs::write(
        dovecot.config_path(),
        config.replace(&old.url(None), &new.url(None)),
    )
    .unwrap();
    assert!(dovecot.reload().is_ok());
    // The old process stops (SIGTERM from the master), a new one reads the new settings.
    assert!(
        wait_until(WAIT, || dovecot
            .sender_pid()
            .is_some_and(|pid| pid != first)),
        "{}",
        dovecot.log()
    );
    drop(lmtp);
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice@example.com"], &messages::simple(2))
        .unwrap();
    assert_eq!(new.wait_for(1, WAIT).len(), 1, "{}", dovecot.log());
    assert_eq!(old.requests().len(), 1);
    assert!(procfs::stat(first).is_none(), "the old service is gone");
}
