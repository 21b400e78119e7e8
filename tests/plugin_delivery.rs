//! End to end: a real Dovecot with the dovepush plugin delivers over LMTP and LDA and
//! the notification reaches an HTTP sink.

mod common;

use std::time::Duration;

use common::{dovecot_with_dovepush, WAIT};
use dovepush_testkit::dovecot::SENDER_USER;
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
    // The sender is the instance's one service process, not root; the lmtp process
    // (still alive: it serves the open connection) has no thread besides its own.
    let sender = dovecot.sender_pid().expect("the sender service runs");
    let (service_uid, _) = dovepush_testkit::dovecot::system_user(SENDER_USER).unwrap();
    assert_eq!(procfs::uids(sender), Some([service_uid; 4]));
    let master = dovecot.master_pid().unwrap();
    let lmtps: Vec<procfs::Stat> = procfs::all()
        .into_iter()
        .filter(|p| p.comm == "lmtp" && p.ppid() == Some(master))
        .collect();
    assert!(!lmtps.is_empty());
    for lmtp in lmtps {
        assert_eq!(procfs::status_field(lmtp.pid, "Threads"), Some(1));
        assert!(
            !procfs::all().iter().any(|p| p.ppid() == Some(lmtp.pid)),
            "lmtp forks nothing"
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
    // The sender service logs it, naming the user, in Dovecot's log.
    let logged = |log: &str| {
        log.contains("dovepush(alice@example.com): Error:")
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
    assert!(dovecot.queued_files().is_empty());
}

#[test]
fn the_shipped_conf_d_snippet_and_endpoint_file_work_as_is() {
    let sink = Sink::start();
    let root = env!("CARGO_MANIFEST_DIR");
    let snippet = format!("{root}/conf.d/90-dovepush.conf");
    // The endpoint file as an admin would fill it in: one line uncommented.
    let endpoints = std::fs::read_to_string(format!("{root}/conf.d/dovepush-endpoints.conf.ext"))
        .unwrap()
        .replace(
            "  #dovepush_url = https://dovepush:PASSWORD@push.example.net:8025/preliminary/http-notify/v1/notify",
            &format!("  dovepush_url = {}", sink.url(None)),
        );
    assert!(endpoints.contains(&sink.url(None)));
    let dir = tempfile::tempdir().unwrap();
    let endpoints_path = dir.path().join("dovepush-endpoints.conf.ext");
    std::fs::write(&endpoints_path, endpoints).unwrap();
    let dovecot = dovepush_testkit::dovecot::Dovecot::start(dovepush_testkit::dovecot::Options {
        delivery_plugins: String::new(),
        dovepush_module: Some(dovepush_testkit::dovecot::built_plugin()),
        extra_config: format!(
            "!include {snippet}\n!include {}\n",
            endpoints_path.display()
        ),
        ..Default::default()
    })
    .unwrap();
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
    // The endpoint file turns on user_from_metadata.
    assert_eq!(requests[0].json()["user"], "alice-login");
}
