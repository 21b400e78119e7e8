//! The outbox through the real server with a test transport: coalescing, restart with
//! pending items, and what each transport outcome does; each test on both stores
//! (`name::sqlite`, `name::postgres`).

mod common;

on_both_stores!(
    pending_events_for_one_device_are_coalesced,
    a_burst_of_badge_updates_is_one_silent_push_with_the_latest_count,
    pending_outbox_survives_a_restart,
    transport_outcomes_are_acted_on,
    items_past_the_deadline_are_dropped_and_counted,
    pushes_without_a_transport_stay_queued,
);

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovepush_push::{DeviceKind, Outcome};
use dovepush_receiver::config::Config;
use dovepush_receiver::mailserver::SubscriptionChange;
use dovepush_receiver::transport::Transports;

fn config_with(dir: &std::path::Path, outbox: &[(&str, &str)], backend: Backend) -> Config {
    let mut text = config_text_on(dir, "", backend);
    for (key, value) in outbox {
        let line = format!("{key} = {value}");
        if text.contains(&format!("{key} = ")) {
            let start = text.find(&format!("{key} = ")).unwrap();
            let end = start + text[start..].find('\n').unwrap();
            text.replace_range(start..end, &line);
        } else {
            text = text.replace("[outbox]\n", &format!("[outbox]\n{line}\n"));
        }
    }
    Config::parse(&text, &dir.join("receiver.toml")).unwrap()
}

fn users() -> Arc<FakeMail> {
    FakeMail::with_users(&[
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
    ])
}

async fn metrics(r: &Running) -> String {
    admin_get(r.addr, "/metrics").await.text()
}

async fn pending_events_for_one_device_are_coalesced(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let transport = RecordingTransport::new();
    let transports = Transports::new().with_kind(DeviceKind::Apns, transport.clone());
    let cfg = config_with(dir.path(), &[("coalesce_milliseconds", "1500")], backend);
    let r = Running::start(cfg, transports, users()).await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "alice-tok")
            .await
            .status,
        201
    );
    assert_eq!(
        register(r.addr, "bob", "bob-pw", "bob-tok").await.status,
        201
    );
    for uid in 1..=5 {
        assert_eq!(
            notify(r.addr, "alice", uid, uid, Some(&format!("a{uid}")))
                .await
                .status,
            200
        );
    }
    assert_eq!(notify(r.addr, "bob", 1, 1, Some("b1")).await.status, 200);
    eventually("two pushes", || transport.pushes().len() >= 2).await;
    outbox_settled(r.addr).await;
    let pushes = transport.pushes();
    assert_eq!(pushes.len(), 2, "{pushes:#?}");
    let alice = pushes.iter().find(|p| p.user == "alice").unwrap();
    assert_eq!(alice.uid, 5);
    assert_eq!(alice.unseen, Some(5));
    assert_eq!(alice.subject.as_deref(), Some("Message 5"));
    assert_eq!(alice.event_id.as_deref(), Some("a5"));
    assert_eq!(alice.coalesced, 4);
    assert_eq!(alice.token, "alice-tok");
    let bob = pushes.iter().find(|p| p.user == "bob").unwrap();
    assert_eq!(bob.coalesced, 0);
    let m = metrics(&r).await;
    assert!(m.contains("dovepush_outbox_coalesced_total 4\n"), "{m}");
    assert!(
        m.contains("dovepush_push_sent_total{transport=\"apns\"} 2\n"),
        "{m}"
    );
    assert!(m.contains("dovepush_outbox_depth 0\n"), "{m}");
    r.stop().await;
}

async fn a_burst_of_badge_updates_is_one_silent_push_with_the_latest_count(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let transport = RecordingTransport::new();
    let transports = Transports::new().with_kind(DeviceKind::Apns, transport.clone());
    // coalesce_milliseconds 0: badge updates wait their own time (3 s here, so that the
    // four requests fall within it also on a slow machine).
    let cfg = config_with(dir.path(), &[("badge_wait_milliseconds", "3000")], backend);
    let r = Running::start(cfg, transports, users()).await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "alice-tok")
            .await
            .status,
        201
    );
    // Four changes of one IMAP session; the last two crossed on the way, so the last to
    // arrive has the older count (and is dropped as stale).
    for (id, event, unseen, at) in [
        ("r1", "messageRead", 4, 1_764_000_000_001u64),
        ("r2", "messageRead", 3, 1_764_000_000_002),
        ("r4", "messageRead", 1, 1_764_000_000_004),
        ("r3", "messageExpunge", 2, 1_764_000_000_003),
    ] {
        let reply = notify_badge(r.addr, "alice", event, unseen, Some(at), id).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    eventually("a badge push", || !transport.pushes().is_empty()).await;
    let m = outbox_settled(r.addr).await;
    let pushes = transport.pushes();
    assert_eq!(pushes.len(), 1, "{pushes:#?}");
    let push = &pushes[0];
    assert!(push.badge_only);
    assert_eq!(push.unseen, Some(1));
    // r2 and r4 folded into r1's item; r3 came after r4 and was known as stale.
    assert_eq!(push.coalesced, 2);
    assert!(m.contains("dovepush_ingest_stale_badges_total 1\n"), "{m}");
    assert!(
        m.contains("dovepush_ingested_events_total{event=\"messageRead\"} 3\n")
            && m.contains("dovepush_ingested_events_total{event=\"messageExpunge\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("dovepush_push_badge_sent_total{transport=\"apns\"} 1\n"),
        "{m}"
    );
    r.stop().await;
}

async fn pending_outbox_survives_a_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let failing = RecordingTransport::always(Outcome::Retry {
        reason: "503 ServiceUnavailable".into(),
        retry_after: Some(Duration::from_millis(300)),
    });
    let mail = users();
    let r = Running::start(
        config_on(dir.path(), "", backend),
        Transports::new().with_kind(DeviceKind::Apns, failing.clone()),
        mail.clone(),
    )
    .await;
    for (u, p) in [
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
    ] {
        assert_eq!(
            register(r.addr, u, p, &format!("{u}-tok")).await.status,
            201
        );
    }
    for (i, u) in ["alice", "bob", "carol"].iter().enumerate() {
        let id = format!("ev-{u}");
        assert_eq!(
            notify(r.addr, u, i as u32 + 10, 3, Some(&id)).await.status,
            200
        );
    }
    eventually("a failed attempt each", || failing.pushes().len() >= 3).await;
    r.stop().await;

    // Status through the CLI's view of the store: three pending items.
    let delivering = RecordingTransport::new();
    let r = Running::start(
        config_on(dir.path(), "", backend),
        Transports::new().with_kind(DeviceKind::Apns, delivering.clone()),
        mail,
    )
    .await;
    eventually("three deliveries", || delivering.pushes().len() >= 3).await;
    // Their outcomes are recorded once the outbox is empty (a push is seen by the
    // transport before its outcome is committed).
    outbox_settled(r.addr).await;
    let mut got: Vec<_> = delivering
        .pushes()
        .iter()
        .map(|p| (p.user.clone(), p.event_id.clone().unwrap()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("alice".to_string(), "ev-alice".to_string()),
            ("bob".to_string(), "ev-bob".to_string()),
            ("carol".to_string(), "ev-carol".to_string()),
        ]
    );
    let s = admin_get(r.addr, "/v1/status/subscriptions?user=alice")
        .await
        .json();
    let device = &s[0]["devices"][0];
    assert!(device["last_success"].is_string(), "{s}");
    assert_eq!(device["last_error"], "503 ServiceUnavailable");
    assert_eq!(device["pending"], 0);
    r.stop().await;
}

async fn transport_outcomes_are_acted_on(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let transport = RecordingTransport::new();
    let mail = users();
    let r = Running::start(
        config_on(dir.path(), "", backend),
        Transports::new().with_app("mail", DeviceKind::Apns, transport.clone()),
        mail.clone(),
    )
    .await;
    for (u, p) in [
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
    ] {
        assert_eq!(
            register(r.addr, u, p, &format!("{u}-tok")).await.status,
            201
        );
    }
    {
        let mut script = transport.script.lock().unwrap();
        script.push_back(Outcome::DeleteDevice {
            reason: "Unregistered".into(),
            unregistered_at: None,
        });
    }
    assert_eq!(notify(r.addr, "alice", 1, 1, None).await.status, 200);
    eventually("alice's push", || transport.pushes().len() == 1).await;
    transport.script.lock().unwrap().push_back(Outcome::Drop {
        reason: "PayloadTooLarge".into(),
    });
    assert_eq!(notify(r.addr, "bob", 1, 1, None).await.status, 200);
    eventually("bob's push", || transport.pushes().len() == 2).await;
    transport
        .script
        .lock()
        .unwrap()
        .push_back(Outcome::CredentialsRejected {
            reason: "InvalidProviderToken".into(),
        });
    assert_eq!(notify(r.addr, "carol", 1, 1, None).await.status, 200);
    // Carol's push is rejected once, then retried (after ~0.5-1 s) and delivered.
    eventually("carol's retry", || {
        transport
            .pushes()
            .iter()
            .filter(|p| p.user == "carol")
            .count()
            == 2
    })
    .await;
    outbox_settled(r.addr).await;
    // The last device of alice went away: METADATA cleared via the master user (a task
    // of its own, after the outcome was recorded).
    eventually("alice's subscription cleared", || {
        mail.changes
            .lock()
            .unwrap()
            .contains(&("alice".to_string(), SubscriptionChange::Clear))
    })
    .await;

    let s = admin_get(r.addr, "/v1/status/subscriptions").await.json();
    let by_user = |u: &str| {
        s.as_array()
            .unwrap()
            .iter()
            .find(|x| x["user"] == u)
            .cloned()
            .unwrap()
    };
    let alice = by_user("alice");
    assert!(alice["devices"].as_array().unwrap().is_empty(), "{alice}");
    assert_eq!(alice["last_error"], "Unregistered");
    let bob = by_user("bob");
    assert_eq!(bob["devices"][0]["last_error"], "PayloadTooLarge");
    assert_eq!(bob["devices"][0]["pending"], 0);
    let carol = by_user("carol");
    assert!(carol["devices"][0]["last_success"].is_string(), "{carol}");
    // The last device of alice went away: METADATA cleared via the master user.
    assert!(mail
        .changes
        .lock()
        .unwrap()
        .contains(&("alice".to_string(), SubscriptionChange::Clear)));
    let m = metrics(&r).await;
    for line in [
        "dovepush_push_failed_total{transport=\"apns\",reason=\"delete_device\"} 1\n",
        "dovepush_push_failed_total{transport=\"apns\",reason=\"drop\"} 1\n",
        "dovepush_push_failed_total{transport=\"apns\",reason=\"credentials_rejected\"} 1\n",
        "dovepush_push_sent_total{transport=\"apns\"} 1\n",
        "dovepush_outbox_depth 0\n",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
    r.stop().await;
}

async fn items_past_the_deadline_are_dropped_and_counted(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let transport = RecordingTransport::always(Outcome::Retry {
        reason: "503".into(),
        retry_after: None,
    });
    // A deadline must be longer than the badge wait (default 1 s).
    let cfg = config_with(
        dir.path(),
        &[
            ("deadline_seconds", "1"),
            ("badge_wait_milliseconds", "500"),
        ],
        backend,
    );
    let r = Running::start(
        cfg,
        Transports::new().with_kind(DeviceKind::Apns, transport.clone()),
        users(),
    )
    .await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "alice-tok")
            .await
            .status,
        201
    );
    assert_eq!(notify(r.addr, "alice", 1, 1, None).await.status, 200);
    // The failure is counted when the dispatcher decides, the depth when the store has
    // removed the item: wait for both.
    settled_showing(
        r.addr,
        &["dovepush_push_failed_total{transport=\"apns\",reason=\"deadline\"} 1\n"],
    )
    .await;
    r.stop().await;
}

async fn pushes_without_a_transport_stay_queued(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(
        config_on(dir.path(), "", backend),
        Transports::new(),
        users(),
    )
    .await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "alice-tok")
            .await
            .status,
        201
    );
    assert_eq!(notify(r.addr, "alice", 1, 1, None).await.status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&r).await;
        if m.contains("reason=\"no_transport\"}") {
            assert!(m.contains("dovepush_outbox_depth 1\n"), "{m}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.stop().await;
}
