//! End to end: a real Dovecot with the dovepush plugin delivers over LMTP and LDA and
//! the notification reaches an HTTP sink.

mod common;

use std::time::Duration;

use common::{dovecot_with_dovepush, WAIT};
use dovepush_testkit::messages;
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
