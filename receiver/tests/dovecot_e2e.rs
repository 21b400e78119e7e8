//! End to end with a real, private Dovecot (from `dovepush-testkit`): device registration
//! authenticated by a real IMAP login sets the subscription METADATA (checked with doveadm),
//! removing the last device sets it to NIL, and a delivery through Dovecot's stock ox
//! driver (with `user_from_metadata`) reaches the registered device. The client's address
//! reaches Dovecot (IMAP `ID`), so its failed-login penalty falls on the client.

mod common;

use common::*;
use dovepush_push::DeviceKind;
use dovepush_receiver::config::Config;
use dovepush_receiver::transport::Transports;
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
        // Dovecot believes the receiver's `ID ("x-originating-ip" …)`.
        extra_config: "login_trusted_networks = 127.0.0.0/8\n".into(),
        ..Options::default()
    };
    let dovecot = tokio::task::spawn_blocking(move || Dovecot::start(options))
        .await
        .unwrap()
        .expect("private dovecot starts");
    let text = with_dovecot_imap(&config_text(dir.path(), ""), dovecot.imap_port).replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1\"]",
    );
    let cfg = Config::parse(&text, &dir.path().join("receiver.toml")).unwrap();
    let transport = RecordingTransport::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(dovepush_receiver::run(
        listener,
        cfg,
        Transports::new().with_kind(DeviceKind::Apns, transport.clone()),
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

    // Behind a trusted proxy, Dovecot sees the client's address, not the receiver's.
    let listed = request(
        addr,
        "GET",
        "/v1/devices",
        &[
            ("authorization", &basic("bob", "bob-secret")),
            ("x-forwarded-for", "192.0.2.44"),
        ],
        "",
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    let log = dovecot.log();
    assert!(
        log.lines()
            .any(|l| l.contains("Login: user=<bob>") && l.contains("rip=192.0.2.44")),
        "{log}"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(dovecot);
}

/// `PUT /v1/devices` with the body for an APNs device `token` of app `mail`.
fn device_body(token: &str) -> String {
    format!(r#"{{"app":"mail","transport":"apns","token":"{token}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_judged_by_dovecots_oauth2_passdb() {
    use dovepush_receiver::config::OAuthMechanism;
    use dovepush_receiver::mailserver::{
        ImapMailServer, MailCredential, MailError, MailServer, SubscriptionChange,
    };
    use dovepush_testkit::oauth::{now, Issuer};

    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let issuer = Issuer::new("https://idp.dovepush.test", "dovepush-app");
    let options = Options {
        oauth2: Some(issuer.clone()),
        // Each refused token comes from a client address of its own (X-Forwarded-For,
        // passed on with IMAP `ID`), so Dovecot's growing delay after failed logins
        // (2 s, 6 s, 10 s, …) does not add up on one address.
        extra_config: "login_trusted_networks = 127.0.0.0/8\n".into(),
        ..Options::default()
    };
    let dovecot = tokio::task::spawn_blocking(move || Dovecot::start(options))
        .await
        .unwrap()
        .expect("private dovecot starts");
    let text = config_text(dir.path(), "")
        .replace(
            "[outbox]",
            &format!(
                "[dovecot]\nimap = \"127.0.0.1:{}\"\noauth_mechanism = \"oauthbearer\"\n[outbox]",
                dovecot.imap_port
            ),
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1\"]",
        );
    let cfg = Config::parse(&text, &dir.path().join("receiver.toml")).unwrap();
    let imap_cfg = cfg.dovecot.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(dovepush_receiver::run(
        listener,
        cfg,
        Transports::new().with_kind(DeviceKind::Apns, RecordingTransport::new()),
        async {
            let _ = stopped.await;
        },
    ));
    let clients = std::sync::atomic::AtomicU8::new(1);
    let put = |path: &'static str, auth: String, token: &'static str| {
        let client = format!(
            "192.0.2.{}",
            clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            request(
                addr,
                "PUT",
                path,
                &[("authorization", &auth), ("x-forwarded-for", &client)],
                device_body(token),
            )
            .await
        }
    };

    // A valid token: the user comes from its `email` claim, Dovecot accepts it, the
    // subscription is set in that session.
    let good = issuer.token("alice");
    let reply = put("/v1/devices", format!("Bearer {good}"), "tok-a").await;
    assert_eq!(reply.status, 201, "{}\n{}", reply.text(), dovecot.log());
    assert_eq!(
        dovecot.subscription("alice").unwrap().as_deref(),
        Some("user=alice")
    );
    // Named explicitly, the same token lists alice's device.
    let listed = request(
        addr,
        "GET",
        "/v1/devices?user=alice",
        &[("authorization", &format!("Bearer {good}"))],
        "",
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert!(listed.text().contains("tok-a"));

    // Tokens Dovecot refuses are 401 invalid_token, and store nothing.
    let now = now();
    let claims = |user: &str, aud: &str, exp: u64| {
        serde_json::json!({
            "iss": issuer.url, "aud": aud, "sub": user, "email": user,
            "iat": now - 7200, "nbf": now - 7200, "exp": exp,
        })
    };
    let forger = Issuer::new(&issuer.url, &issuer.audience);
    let bad = [
        (
            "expired",
            issuer.sign(&claims("alice", "dovepush-app", now - 3600)),
        ),
        (
            "wrong audience",
            issuer.sign(&claims("alice", "another-app", now + 3600)),
        ),
        ("wrong signature", forger.token("alice")),
    ];
    for (what, token) in bad {
        let reply = put("/v1/devices", format!("Bearer {token}"), "tok-bad").await;
        assert_eq!(reply.status, 401, "{what}: {}", reply.text());
        let challenge = reply.headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
    }
    // Alice's good token does not open bob's account.
    let reply = put("/v1/devices?user=bob", format!("Bearer {good}"), "tok-b").await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(dovecot.subscription("bob").unwrap(), None);

    // A password user works beside it.
    let reply = put("/v1/devices", basic("bob", "bob-secret"), "tok-b").await;
    assert_eq!(reply.status, 201, "{}", reply.text());

    // XOAUTH2 carries the same token to the same verdicts.
    let mut xoauth2 = imap_cfg;
    xoauth2.oauth_mechanism = OAuthMechanism::XOAuth2;
    let imap = ImapMailServer::new(&xoauth2).unwrap();
    let login = |user: &'static str, token: String| {
        let imap = &imap;
        let client = format!(
            "198.51.100.{}",
            clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            imap.login(
                user,
                &MailCredential::Bearer(token),
                SubscriptionChange::Keep,
                client.parse().ok(),
            )
            .await
        }
    };
    assert_eq!(login("alice", good.clone()).await, Ok(()));
    assert_eq!(login("bob", good).await, Err(MailError::Rejected));
    assert_eq!(
        login("alice", forger.token("alice")).await,
        Err(MailError::Rejected)
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(dovecot);
}

/// Issue 15, badges: the dovepush plugin in lmtp and imap, its sender service sending to
/// the receiver (which takes the badge events) and to a stock-ox-style endpoint (an ox
/// line: `messageNew` only); the receiver pushes to a mock APNs. An IMAP client marks 3
/// of 5 new mails `\Seen` in one `STORE`, expunges an unseen one and moves the last
/// unseen one out: one `messageRead` and two `messageExpunge` reach the receiver, the
/// APNs gets silent background pushes whose last badge is Dovecot's `STATUS INBOX
/// (UNSEEN)` (0: the badge is cleared), and the ox endpoint gets nothing but the 5
/// `messageNew`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_expunges_in_imap_become_silent_badge_pushes() {
    use dovepush_receiver::transport::push::transports_from_config;
    use dovepush_testkit::dovecot::built_plugin;
    use dovepush_testkit::imap::ImapClient;
    use dovepush_testkit::sink::Sink;

    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ox = Sink::start();
    let options = Options {
        delivery_plugins: "notify dovepush".into(),
        imap_plugins: "notify dovepush".into(),
        dovepush_module: Some(built_plugin()),
        plugin_settings: vec![
            // The stock ox receiver's endpoint: the default events (messageNew).
            ("dovepush".into(), format!("ox:url={}", ox.url(None))),
            (
                "dovepush_url".into(),
                format!("http://{NOTIFY_USER}:{NOTIFY_PASSWORD}@{addr}{NOTIFY_PATH}"),
            ),
            (
                "dovepush_events".into(),
                "messageNew messageRead messageExpunge".into(),
            ),
            ("dovepush_user_from_metadata".into(), "yes".into()),
        ],
        ..Options::default()
    };
    let dovecot = tokio::task::spawn_blocking(move || Dovecot::start(options))
        .await
        .unwrap()
        .expect("private dovecot starts");
    let (apns, app) = mock_apns_app(dir.path()).await;
    let text = with_dovecot_imap(&config_text(dir.path(), &app), dovecot.imap_port);
    let cfg = Config::parse(&text, &dir.path().join("receiver.toml")).unwrap();
    let transports = transports_from_config(&cfg).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(dovepush_receiver::run(listener, cfg, transports, async {
        let _ = stopped.await;
    }));
    let reply = register(addr, "alice", "alice-secret", "aa01").await;
    assert_eq!(reply.status, 201, "{}\n{}", reply.text(), dovecot.log());

    tokio::task::spawn_blocking({
        let mut lmtp = dovecot.lmtp().unwrap();
        move || {
            for n in 1..=5 {
                lmtp.deliver(
                    &["alice@example.com"],
                    &dovepush_testkit::messages::simple(n),
                )
                .unwrap();
            }
        }
    })
    .await
    .unwrap();
    let news = ox.wait_for(5, std::time::Duration::from_secs(20));
    assert_eq!(news.len(), 5, "{}", dovecot.log());
    // The service sends to both endpoints at once: the ox one having all 5 says nothing
    // about this one.
    settled_showing(
        addr,
        &["dovepush_ingested_events_total{event=\"messageNew\"} 5\n"],
    )
    .await;
    let alerts = apns.requests().len();
    assert!(alerts >= 1);

    let port = dovecot.imap_port;
    let unseen = tokio::task::spawn_blocking(move || {
        let mut imap = ImapClient::login(port, "alice", "alice-secret").unwrap();
        imap.command("SELECT INBOX").unwrap();
        imap.command("STORE 1:3 +FLAGS.SILENT (\\Seen)").unwrap();
        imap.command("STORE 4 +FLAGS.SILENT (\\Deleted)").unwrap();
        imap.command("EXPUNGE").unwrap();
        let after_expunge = imap.unseen("INBOX").unwrap();
        // Moving out is an expunge in INBOX (Archive is not watched).
        imap.command("CREATE Archive").unwrap();
        imap.command("MOVE 4 Archive").unwrap();
        let unseen = imap.unseen("INBOX").unwrap();
        imap.logout().unwrap();
        (after_expunge, unseen)
    })
    .await
    .unwrap();
    assert_eq!(
        unseen,
        (1, 0),
        "5 new, 3 read, 1 unread expunged, 1 unread moved out"
    );
    let unseen = unseen.1;

    let badge_of = |r: &dovepush_mocks::ApnsRequest| r.json()["aps"]["badge"].as_u64();
    eventually("a badge push with Dovecot's unseen count", || {
        apns.requests()
            .last()
            .is_some_and(|r| badge_of(r) == Some(u64::from(unseen)))
    })
    .await;
    // One IMAP command, one event: the STORE of 3 mails is one messageRead. (The last
    // badge says the MOVE's event is in; the others may arrive after it, as stale.)
    let metrics = settled_showing(
        addr,
        &[
            "dovepush_ingested_events_total{event=\"messageRead\"} 1\n",
            "dovepush_ingested_events_total{event=\"messageExpunge\"} 2\n",
        ],
    )
    .await;
    let requests = apns.requests();
    let badges = &requests[alerts..];
    assert!(!badges.is_empty());
    for r in badges {
        assert_eq!(r.header("apns-push-type"), Some("background"));
        assert_eq!(r.header("apns-priority"), Some("5"));
        let body = r.json();
        assert_eq!(body["aps"]["content-available"], 1, "{body}");
        assert!(body["aps"].get("alert").is_none(), "{body}");
    }
    assert_eq!(badge_of(requests.last().unwrap()), Some(u64::from(unseen)));
    assert!(metrics.contains(&format!(
        "dovepush_push_badge_sent_total{{transport=\"apns\"}} {}\n",
        badges.len()
    )));

    // The stock-ox-style endpoint got the 5 messageNew and nothing since.
    let seen_by_ox = ox.requests();
    assert_eq!(
        seen_by_ox.len(),
        5,
        "{:?}",
        seen_by_ox.iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    assert!(seen_by_ox.iter().all(|r| r.json()["event"] == "messageNew"));

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(dovecot);
}
