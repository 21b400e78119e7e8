//! Everything real, end to end: a private Dovecot with the dovepush plugin loaded, the
//! receiver (library `run` on port 0, real IMAP login, real push transports) and the mock
//! APNs over TLS + HTTP/2. A device registered with alice's real IMAP password sets the
//! METADATA in Dovecot; a mail delivered over LMTP, handed by the plugin to the sender
//! service and batched by it to the receiver, becomes exactly one APNs push whose alert
//! shows the decoded subject and whose badge is the unseen count.
//!
//! Needs root, the Debian dovecot packages and the plugin built into the same target dir
//! (`cargo build -p dovepush-plugin`).

mod common;

use std::time::Duration;

use common::*;
use dovepush_receiver::config::Config;
use dovepush_receiver::transport::push::transports_from_config;
use dovepush_testkit::dovecot::{built_plugin, Dovecot, Options};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_delivery_reaches_apns_through_plugin_and_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // Dovecot with the dovepush plugin pointed at the receiver, taking the user from the
    // METADATA the receiver writes.
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let options = Options {
        delivery_plugins: "notify dovepush".into(),
        dovepush_module: Some(built_plugin()),
        plugin_settings: vec![
            (
                "dovepush_url".into(),
                format!("http://{NOTIFY_USER}:{NOTIFY_PASSWORD}@{addr}{NOTIFY_PATH}"),
            ),
            ("dovepush_user_from_metadata".into(), "yes".into()),
            // The sender service batches to this receiver (POST <url>/batch).
            ("dovepush_batch".into(), "yes".into()),
            ("dovepush_spool_dir".into(), spool.display().to_string()),
        ],
        ..Options::default()
    };
    let dovecot = tokio::task::spawn_blocking(move || Dovecot::start(options))
        .await
        .unwrap()
        .expect("private dovecot starts");

    // The mock APNs and the receiver's `[[apps]]` pointing at it.
    let (apns, app) = mock_apns_app(dir.path()).await;
    let text = with_dovecot_imap(&config_text(dir.path(), &app), dovecot.imap_port);
    let path = dir.path().join("receiver.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let transports = transports_from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(dovepush_receiver::run(
        listener,
        config,
        transports,
        async {
            let _ = stopped.await;
        },
    ));

    // Register alice's phone with her real IMAP password: Dovecot now holds the METADATA.
    let auth = basic("alice", "alice-secret");
    let reply = request(
        addr,
        "PUT",
        "/v1/devices",
        &[("authorization", auth.as_str())],
        r#"{"app":"mail","transport":"apns","token":"a1b2c3d4e5f6"}"#,
    )
    .await;
    assert_eq!(reply.status, 201, "{}\n{}", reply.text(), dovecot.log());
    assert_eq!(
        dovecot.subscription("alice").unwrap().as_deref(),
        Some("user=alice")
    );

    // A mail over LMTP: plugin → receiver → APNs.
    let message = dovepush_testkit::messages::simple(1);
    tokio::task::spawn_blocking({
        let mut lmtp = dovecot.lmtp().unwrap();
        move || lmtp.deliver(&["alice@example.com"], &message).unwrap()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while apns.request_count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no APNs push; Dovecot log:\n{}",
            dovecot.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing else arrives: the outbox is empty and one event came in (no duplicate
    // from the plugin or the outbox).
    let m = outbox_settled(addr).await;
    assert!(m.contains("dovepush_ingested_total 1\n"), "{m}");
    let requests = apns.requests();
    assert_eq!(requests.len(), 1, "exactly one push");
    let push = &requests[0];
    assert_eq!(push.device_token, "a1b2c3d4e5f6");
    assert_eq!(push.header("apns-topic"), Some("com.example.mail"));
    let body = push.json();
    assert_eq!(body["aps"]["alert"]["body"], "Test päivää 1", "{body:#}");
    assert_eq!(body["aps"]["alert"]["title"], "Jürgen", "{body:#}");
    assert_eq!(body["aps"]["badge"], 1, "{body:#}");
    assert_eq!(body["dovepush"]["folder"], "INBOX", "{body:#}");

    let metrics = admin_get(addr, "/metrics").await.text();
    assert!(
        metrics.contains("dovepush_push_sent_total{transport=\"apns\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dovepush_ingest_batches_total 1\n"),
        "the sender service batched: {metrics}"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(dovecot);
}
