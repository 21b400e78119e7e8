//! End to end with a real, private Dovecot (from `dovepush-testkit`): device registration
//! authenticated by a real IMAP login sets the subscription METADATA (checked with doveadm),
//! removing the last device sets it to NIL, and a delivery through Dovecot's stock ox
//! driver (with `user_from_metadata`) reaches the registered device.

mod common;

use common::*;
use dovepush_receiver::config::Config;
use dovepush_receiver::transport::{TransportKind, Transports};
use dovepush_testkit::dovecot::{Dovecot, Options};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_sets_and_clears_metadata_and_deliveries_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = Options {
        delivery_plugins: "notify push_notification".into(),
        plugin_settings: vec![(
            "push_notification_driver".into(),
            format!(
                "ox:url=http://{NOTIFY_USER}:{NOTIFY_PASSWORD}@{addr}{NOTIFY_PATH} user_from_metadata"
            ),
        )],
        ..Options::default()
    };
    let dovecot = tokio::task::spawn_blocking(move || Dovecot::start(options))
        .await
        .unwrap()
        .expect("private dovecot starts");
    let text = config_text(dir.path(), "").replace(
        "[outbox]",
        &format!(
            "[dovecot]\nimap = \"127.0.0.1:{}\"\ntls = \"none\"\n[outbox]",
            dovecot.imap_port
        ),
    );
    let cfg = Config::parse(&text, &dir.path().join("receiver.toml")).unwrap();
    let transport = RecordingTransport::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(dovepush_receiver::run(
        listener,
        cfg,
        Transports::new().with_kind(TransportKind::Apns, transport.clone()),
        async {
            let _ = stopped.await;
        },
    ));

    // Wrong password: refused by Dovecot, nothing stored, no METADATA.
    assert_eq!(register(addr, "alice", "wrong", "tok-1").await.status, 401);
    assert_eq!(dovecot.subscription("alice").unwrap(), None);

    // First device: the METADATA is set in the same IMAP session.
    let reply = register(addr, "alice", "alice-secret", "tok-1").await;
    assert_eq!(reply.status, 201, "{}\n{}", reply.text(), dovecot.log());
    assert_eq!(
        dovecot.subscription("alice").unwrap().as_deref(),
        Some("user=alice")
    );
    assert_eq!(
        register(addr, "alice", "alice-secret", "tok-2")
            .await
            .status,
        201
    );
    assert_eq!(dovecot.subscription("bob").unwrap(), None);

    // A delivery over LMTP goes through the stock ox driver to the receiver, then to
    // both devices. The LMTP recipient may carry a domain; the event names the login.
    let message = dovepush_testkit::messages::simple(1);
    tokio::task::spawn_blocking({
        let mut lmtp = dovecot.lmtp().unwrap();
        move || lmtp.deliver(&["alice"], &message).unwrap()
    })
    .await
    .unwrap();
    eventually("two pushes", || transport.pushes().len() >= 2).await;
    let pushes = transport.pushes();
    assert!(pushes
        .iter()
        .all(|p| p.user == "alice" && p.folder == "INBOX"));
    assert!(pushes.iter().all(|p| p.unseen == Some(1)), "{pushes:#?}");
    let mut tokens: Vec<_> = pushes.iter().map(|p| p.token.clone()).collect();
    tokens.sort();
    assert_eq!(tokens, vec!["tok-1", "tok-2"]);

    // Removing one device keeps the subscription; removing the last sets NIL.
    let auth = basic("alice", "alice-secret");
    let del = request(
        addr,
        "DELETE",
        "/v1/devices/tok-1",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(del.status, 204);
    assert_eq!(
        dovecot.subscription("alice").unwrap().as_deref(),
        Some("user=alice")
    );
    let del = request(
        addr,
        "DELETE",
        "/v1/devices/tok-2",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(del.status, 204, "{}", del.text());
    assert_eq!(dovecot.subscription("alice").unwrap(), None);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(dovecot);
}
