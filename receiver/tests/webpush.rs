//! Web Push through the receiver. With a real, private Dovecot (credentials checked by IMAP
//! LOGIN, the stock ox driver delivering) and the mock push service over TLS: a page gets
//! the VAPID key with the user's mail password, registers its subscription as the browser
//! gives it, a mail delivered over LMTP reaches the push service encrypted, where the
//! subscription's private key decrypts it, and a 410 from the service removes the device.
//! Without Dovecot: endpoints on refused addresses (loopback, metadata, a name resolving
//! to loopback, …) are 400 naming the rule, and nothing is stored.
//!
//! The mock listens on 127.0.0.1, so the config lists that host in `[webpush] allow_hosts`
//! and trusts the mock's CA with `ca_file`, exactly as an operator would for a push service
//! in their own network.

mod common;

use std::time::Duration;

use common::*;
use dovepush_mocks::{MockWebPush, TestPki, VapidKeyPair, WebPushSubscription};
use dovepush_receiver::config::Config;
use dovepush_receiver::transport::push::transports_from_config;
use dovepush_testkit::dovecot::{Dovecot, Options};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// `[apps.webpush]` for app `mail` (full privacy) with the key in `vapid.pem`.
const WEBPUSH_APP: &str = "privacy = \"full\"\n[apps.webpush]\n\
                           vapid_private_key_file = \"vapid.pem\"\n\
                           subject = \"mailto:postmaster@example.com\"\n";

/// Writes the VAPID key and a receiver config with `extra` after the app into `dir`.
fn write_config(dir: &std::path::Path, vapid: &VapidKeyPair, extra: &str) -> Config {
    std::fs::write(dir.join("vapid.pem"), &vapid.private_pem).unwrap();
    let path = dir.join("receiver.toml");
    std::fs::write(&path, config_text(dir, &format!("{WEBPUSH_APP}{extra}"))).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// `PUT /v1/devices` with the subscription as `PushSubscription.toJSON()` gives it.
async fn register_browser(
    addr: std::net::SocketAddr,
    auth: &str,
    subscription: &WebPushSubscription,
) -> Reply {
    let mut body = subscription.to_json();
    body["app"] = "mail".into();
    body["transport"] = "webpush".into();
    request(
        addr,
        "PUT",
        "/v1/devices",
        &[("authorization", auth)],
        body.to_string(),
    )
    .await
}

/// A subscription as a browser would hand it over, for any endpoint (keys of RFC 8291).
fn subscription_at(endpoint: &str) -> WebPushSubscription {
    WebPushSubscription {
        endpoint: endpoint.to_owned(),
        p256dh: "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
            .to_owned(),
        auth: "BTBZMqHH6r4Tts7J_aSIgg".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoints_are_400_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let vapid = VapidKeyPair::generate();
    // The default `[webpush]`: public addresses only.
    let config = write_config(dir.path(), &vapid, "");
    let transports = transports_from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let mail = FakeMail::with_users(&[("alice", "alice-pw")]);
    let r = Running::start(config, transports, mail.clone()).await;
    let alice = basic("alice", "alice-pw");

    // The key a page subscribes with, for the user's own password only.
    let key = request(
        r.addr,
        "GET",
        "/v1/apps/mail/vapid",
        &[("authorization", &alice)],
        "",
    )
    .await;
    assert_eq!(key.status, 200, "{}", key.text());
    assert_eq!(
        key.json(),
        json!({"app": "mail", "public_key": vapid.public_key})
    );
    let wrong = basic("alice", "nope");
    for (path, auth, status) in [
        ("/v1/apps/mail/vapid", wrong.as_str(), 401),
        ("/v1/apps/other/vapid", alice.as_str(), 404),
    ] {
        let reply = request(r.addr, "GET", path, &[("authorization", auth)], "").await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
    }

    for (endpoint, rule) in [
        ("https://127.0.0.1/push/1", "loopback"),
        ("https://127.1.2.3:8443/push/1", "loopback"),
        ("https://[::1]/push/1", "loopback"),
        // A name resolving to loopback (the system resolver; `localhost` is in every
        // hosts file).
        ("https://localhost/push/1", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://[fd00:ec2::254]/", "metadata"),
        ("https://[::ffff:169.254.169.254]/", "metadata"),
        ("https://10.0.0.1/push/1", "private"),
        ("https://[::ffff:192.168.1.1]/push/1", "private"),
        ("https://[64:ff9b::10.0.0.1]/push/1", "private"),
        ("https://[fd12:3456::1]/push/1", "private"),
        ("https://[fe80::1]/push/1", "link-local"),
        ("https://100.64.0.1/push/1", "cgnat"),
        ("https://0.0.0.0/push/1", "unspecified"),
        ("https://224.0.0.1/push/1", "multicast"),
    ] {
        let reply = register_browser(r.addr, &alice, &subscription_at(endpoint)).await;
        assert_eq!(reply.status, 400, "{endpoint}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["field"], "endpoint", "{endpoint}: {body}");
        assert_eq!(body["rule"], rule, "{endpoint}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("may not use"),
            "{body}"
        );
    }
    // Only https.
    let reply = register_browser(r.addr, &alice, &subscription_at("http://push.example/1")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json(),
        json!({"error": "must be an https URL", "field": "endpoint"})
    );
    // A wrong password learns nothing about the endpoint.
    let reply = register_browser(r.addr, &wrong, &subscription_at("https://127.0.0.1/")).await;
    assert_eq!(reply.status, 401);
    // Nothing was stored and no METADATA set.
    let list = request(
        r.addr,
        "GET",
        "/v1/devices",
        &[("authorization", &alice)],
        "",
    )
    .await;
    assert_eq!(list.json(), json!({"devices": []}));
    assert!(mail.changes.lock().unwrap().is_empty());

    // A public address is accepted (registration connects to nothing); the API names the
    // device by its `wp-…` id and shows its endpoint, never its keys.
    let public = subscription_at("https://142.250.1.1/fcm/send/abc");
    let reply = register_browser(r.addr, &alice, &public).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let id = reply.json()["token"].as_str().unwrap().to_owned();
    assert!(id.starts_with("wp-"), "{id}");
    assert_eq!(reply.json()["endpoint"], public.endpoint);
    let list = request(
        r.addr,
        "GET",
        "/v1/devices",
        &[("authorization", &alice)],
        "",
    )
    .await;
    let device = &list.json()["devices"][0];
    assert_eq!(device["token"], id.as_str());
    assert_eq!(device["transport"], "webpush");
    assert!(!list.text().contains(&public.auth), "{}", list.text());
    let status = admin_get(r.addr, "/v1/status/subscriptions").await.json();
    assert_eq!(
        status[0]["devices"][0]["token"],
        format!("{id}@142.250.1.1")
    );
    let del = request(
        r.addr,
        "DELETE",
        &format!("/v1/devices/{id}"),
        &[("authorization", &alice)],
        "",
    )
    .await;
    assert_eq!(del.status, 204, "{}", del.text());
    r.stop().await;
}

/// The subscriptions listing entry of `user` once `check` holds.
async fn eventually_status(
    addr: std::net::SocketAddr,
    user: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = admin_get(addr, &format!("/v1/status/subscriptions?user={user}"))
            .await
            .json();
        if check(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never matched: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_registered_with_the_mail_password_gets_the_mail_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // Dovecot's stock ox driver, taking the user from the METADATA the receiver writes.
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

    // The mock push service on 127.0.0.1, allowed and trusted by the receiver's config.
    let pki = TestPki::new();
    pki.write_ca(&dir.path().join("ca.pem")).unwrap();
    let push_service = MockWebPush::start(&pki).await.unwrap();
    let vapid = VapidKeyPair::generate();
    let extra = format!(
        "[webpush]\nallow_hosts = [\"127.0.0.1\"]\nca_file = \"ca.pem\"\n\
         [dovecot]\nimap = \"127.0.0.1:{}\"\ntls = \"none\"\n",
        dovecot.imap_port
    );
    let config = write_config(dir.path(), &vapid, &extra);
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

    // The page: the app's VAPID key with alice's real password, then subscribe.
    let alice = basic("alice", "alice-secret");
    let key = request(
        addr,
        "GET",
        "/v1/apps/mail/vapid",
        &[("authorization", &alice)],
        "",
    )
    .await;
    assert_eq!(key.status, 200, "{}\n{}", key.text(), dovecot.log());
    let application_server_key = key.json()["public_key"].as_str().unwrap().to_owned();
    assert_eq!(application_server_key, vapid.public_key);
    let subscription = push_service.subscribe(&application_server_key);
    let wrong = register_browser(addr, &basic("alice", "wrong"), &subscription).await;
    assert_eq!(wrong.status, 401);
    let reply = register_browser(addr, &alice, &subscription).await;
    assert_eq!(reply.status, 201, "{}\n{}", reply.text(), dovecot.log());
    assert_eq!(reply.json()["transport"], "webpush");
    assert_eq!(
        dovecot.subscription("alice").unwrap().as_deref(),
        Some("user=alice")
    );

    // A mail over LMTP: ox driver → receiver → push service, which decrypts it.
    let message = dovepush_testkit::messages::simple(1);
    tokio::task::spawn_blocking({
        let mut lmtp = dovecot.lmtp().unwrap();
        move || lmtp.deliver(&["alice"], &message).unwrap()
    })
    .await
    .unwrap();
    eventually("one Web Push message", || {
        !push_service.requests().is_empty()
    })
    .await;
    let m = outbox_settled(addr).await;
    assert!(
        m.contains("dovepush_push_sent_total{transport=\"webpush\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains(
            "dovepush_push_outcomes_total{app=\"mail\",transport=\"webpush\",outcome=\"delivered\",reason=\"ok\"} 1\n"
        ),
        "{m}"
    );
    let pushes = push_service.requests();
    assert_eq!(pushes.len(), 1, "exactly one push");
    let push = &pushes[0];
    let body = push.json();
    assert_eq!(body["event"], "messageNew", "{body:#}");
    assert_eq!(body["user"], "alice", "{body:#}");
    assert_eq!(body["folder"], "INBOX", "{body:#}");
    assert_eq!(body["unseen"], 1, "{body:#}");
    assert_eq!(body["notification"]["title"], "Jürgen", "{body:#}");
    assert_eq!(body["notification"]["body"], "Test päivää 1", "{body:#}");
    assert!(
        body["snippet"].as_str().unwrap().starts_with("Hello Alice"),
        "{body:#}"
    );
    assert_eq!(push.vapid_claims["aud"], push_service.origin());
    assert_eq!(push.vapid_claims["sub"], "mailto:postmaster@example.com");
    assert_eq!(push.header("ttl"), Some("86400"));
    assert_eq!(push.header("urgency"), Some("normal"));
    let listed = eventually_status(addr, "alice", |s| {
        !s[0]["devices"][0]["last_success"].is_null()
    })
    .await;
    assert_eq!(listed[0]["devices"][0]["transport"], "webpush");

    // The mail is read in another client: the plugin in imap would send a badge event.
    // The browser gets the count alone, encrypted as well.
    let reply = notify_badge(addr, "alice", "messageRead", 0, None, "read-1").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    eventually("a Web Push badge update", || {
        push_service.requests().len() >= 2
    })
    .await;
    let m = outbox_settled(addr).await;
    assert_eq!(
        push_service.requests()[1].json(),
        json!({"event": "badge", "unseen": 0})
    );
    assert!(
        m.contains("dovepush_push_badge_sent_total{transport=\"webpush\"} 1\n"),
        "{m}"
    );

    // The browser unsubscribes: the next push gets 410 and the device is removed, with
    // the push service's reason as the user's last error.
    push_service.unsubscribe(&subscription.endpoint);
    let message = dovepush_testkit::messages::simple(2);
    tokio::task::spawn_blocking({
        let mut lmtp = dovecot.lmtp().unwrap();
        move || lmtp.deliver(&["alice"], &message).unwrap()
    })
    .await
    .unwrap();
    let status = eventually_status(addr, "alice", |s| {
        s[0]["devices"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert_eq!(status[0]["last_error"], "SubscriptionGone", "{status}");
    let list = request(addr, "GET", "/v1/devices", &[("authorization", &alice)], "").await;
    assert_eq!(list.json(), json!({"devices": []}));
    let m = admin_get(addr, "/metrics").await.text();
    assert!(
        m.contains(
            "dovepush_push_failed_total{transport=\"webpush\",reason=\"delete_device\"} 1\n"
        ),
        "{m}"
    );
    assert_eq!(
        push_service.requests().len(),
        2,
        "the 410 delivered nothing"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(dovecot);
}
