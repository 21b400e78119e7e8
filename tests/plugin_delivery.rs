//! End to end: a real Dovecot with the dovepush plugin delivers over LMTP and LDA and
//! the notification reaches an HTTP sink.

mod common;

use std::time::Duration;

use common::{dovecot_with_dovepush, WAIT};
use dovepush_testkit::messages;
use dovepush_testkit::procfs;
use dovepush_testkit::sink::Sink;

#[test]
fn lmtp_delivery_to_a_subscribed_user_notifies() {
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(Some("push:s3cret")), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();

    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();

    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "log:\n{}", dovecot.log());
    let r = &requests[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path, "/preliminary/http-notify/v1/notify");
    assert_eq!(r.header("authorization"), Some("Basic cHVzaDpzM2NyZXQ="));
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert!(r.event_id().is_some_and(|id| !id.is_empty()));
    let body = r.json();
    assert_eq!(body["user"], "alice@example.com");
    assert_eq!(body["event"], "messageNew");
    assert_eq!(body["folder"], "INBOX");
    assert!(body["imap-uidvalidity"].as_u64().unwrap() > 0);
    assert_eq!(body["imap-uid"], 1);
    assert_eq!(
        body["from"],
        "=?utf-8?q?J=C3=BCrgen?= <juergen@example.net>"
    );
    assert_eq!(body["subject"], "Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?= 1");
    assert_eq!(
        body["snippet"],
        "Hello Alice, this is message number 1. Bye."
    );
    assert_eq!(body["unseen"], 1);
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&r.body).find("\"user\""),
        Some(1),
        "user comes first: {keys:?}"
    );
    // The lmtp process (still alive: it serves the open connection) has its sender.
    // (Tests run in parallel: other instances' senders may be there too, or outlive
    // their lmtp for a moment.)
    let senders: Vec<(procfs::Stat, procfs::Stat)> = procfs::all()
        .into_iter()
        .filter(|p| p.comm == "dovepush-send")
        .filter_map(|sender| Some((procfs::stat(sender.ppid()?)?, sender)))
        .filter(|(parent, _)| parent.comm == "lmtp")
        .collect();
    assert!(
        !senders.is_empty(),
        "no dovepush-send process under an lmtp"
    );
    for (parent, sender) in senders {
        assert_eq!(
            sender.nice(),
            Some(10),
            "the sender yields the CPU to deliveries"
        );
        assert_eq!(
            sender.pgrp(),
            Some(sender.pid),
            "a process group of its own"
        );
        assert_eq!(
            sender.session(),
            parent.session(),
            "in lmtp's session, so that its nice value counts against lmtp's"
        );
    }
}

#[test]
fn user_without_subscription_gets_no_request_and_no_log_noise() {
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["bob@example.com"], &messages::simple(1))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sink.requests().is_empty());
    let log = dovecot.log();
    assert!(
        !log.contains("dovepush"),
        "unexpected dovepush log lines:\n{log}"
    );
}

#[test]
fn lda_delivery_notifies() {
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let (ok, stderr) = dovecot.deliver_lda("alice", &messages::simple(7)).unwrap();
    assert!(ok, "dovecot-lda failed: {stderr}\n{}", dovecot.log());
    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "log:\n{}", dovecot.log());
    let body = requests[0].json();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["imap-uid"], 1);
    assert_eq!(body["subject"], "Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?= 7");
}

#[test]
fn ox_syntax_user_from_metadata_and_two_endpoints() {
    let first = Sink::start();
    let second = Sink::start();
    let line = format!(
        "ox:url={} user_from_metadata max_retries=2",
        first.url(None)
    );
    let dovecot = dovecot_with_dovepush(&second.url(None), &[("dovepush", &line)]);
    dovecot
        .set_subscription("alice", Some("events=x\tuser=3@2"))
        .unwrap();
    dovecot
        .lmtp()
        .unwrap()
        .deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    let a = first.wait_for(1, WAIT);
    let b = second.wait_for(1, WAIT);
    assert_eq!((a.len(), b.len()), (1, 1), "log:\n{}", dovecot.log());
    // The ox line asked for the METADATA identity, the plain URL did not.
    assert_eq!(a[0].json()["user"], "3@2");
    assert_eq!(b[0].json()["user"], "alice@example.com");
    assert_eq!(a[0].event_id(), b[0].event_id(), "one event, one id");
}

#[test]
fn other_mailboxes_only_when_configured() {
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[]);
    let dovecot = common::restart_with_config(
        dovecot,
        "recipient_delimiter = +\nlmtp_save_to_detail_mailbox = yes\nlda_mailbox_autocreate = yes\n",
    );
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice+Work@example.com"], &messages::simple(1))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sink.requests().is_empty(), "Work is not watched by default");
    drop(lmtp);

    let dovecot = common::restart_with(dovecot, &[("dovepush_mailboxes", "INBOX Work")]);
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice+Work@example.com"], &messages::simple(2))
        .unwrap();
    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "log:\n{}", dovecot.log());
    assert_eq!(requests[0].json()["folder"], "Work");
    assert_eq!(requests[0].json()["imap-uid"], 2);
}

#[test]
fn final_4xx_is_not_retried_and_is_logged_with_the_user() {
    let sink = Sink::start();
    sink.set_status(400);
    let dovecot = dovecot_with_dovepush(&sink.url(None), &[("dovepush_max_retries", "3")]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    // The sender's log line reaches Dovecot's log while lmtp waits for the next
    // command: no other delivery is needed.
    let logged = |log: &str| {
        log.contains("user alice@example.com:")
            && log.contains("400")
            && log.contains("not retried")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !logged(&dovecot.log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = dovecot.log();
    assert!(logged(&log), "log:\n{log}");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(sink.attempts(), 1);
    drop(lmtp);
    assert!(dovepush_testkit::dovecot::spool_files(&dovecot.spool_dir()).is_empty());
}

#[test]
fn the_shipped_conf_d_snippet_works_as_is() {
    let sink = Sink::start();
    let snippet = concat!(env!("CARGO_MANIFEST_DIR"), "/conf.d/90-dovepush.conf");
    let mut dovecot =
        dovepush_testkit::dovecot::Dovecot::start(dovepush_testkit::dovecot::Options {
            delivery_plugins: String::new(),
            dovepush_module: Some(dovepush_testkit::dovecot::built_plugin()),
            extra_config: format!("!include {snippet}\n"),
            ..Default::default()
        })
        .unwrap();
    dovecot = common::restart_with(dovecot, &[("dovepush_url", &sink.url(None))]);
    dovecot
        .set_subscription("alice", Some("user=alice-login"))
        .unwrap();
    dovecot
        .lmtp()
        .unwrap()
        .deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "{}", dovecot.log());
    // The snippet turns on user_from_metadata.
    assert_eq!(requests[0].json()["user"], "alice-login");
}
