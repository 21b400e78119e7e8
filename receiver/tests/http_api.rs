//! HTTP surface: authentication on every endpoint, user isolation, malformed and oversized
//! bodies, duplicate event ids, status and metrics.

mod common;

on_both_stores!(
    every_endpoint_requires_authentication,
    users_see_and_change_only_their_own_devices,
    malformed_and_oversized_bodies_get_json_reasons,
    duplicate_event_ids_are_committed_once,
    a_batch_is_committed_with_one_result_per_notification,
);

use common::*;
use dovepush_receiver::transport::Transports;

async fn start(dir: &std::path::Path, backend: Backend) -> (Running, std::sync::Arc<FakeMail>) {
    let mail = FakeMail::with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let running =
        Running::start(config_on(dir, "", backend), Transports::new(), mail.clone()).await;
    (running, mail)
}

async fn every_endpoint_requires_authentication(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (r, _mail) = start(dir.path(), backend).await;
    let wrong_notify = basic(NOTIFY_USER, "wrong");
    let wrong_user = basic("alice", "wrong");
    let unknown_user = basic("mallory", "x");
    let admin_as_basic = basic("admin", ADMIN_TOKEN);
    let body = notification("alice", 1, 1);
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        ("PUT", NOTIFY_PATH, vec![]),
        (
            "PUT",
            NOTIFY_PATH,
            vec![("authorization", wrong_notify.as_str())],
        ),
        (
            "POST",
            NOTIFY_PATH,
            vec![("authorization", "Bearer admin-token-0123456789")],
        ),
        (
            "PUT",
            NOTIFY_PATH,
            vec![("authorization", wrong_user.as_str())],
        ),
        ("PUT", "/v1/devices", vec![]),
        (
            "PUT",
            "/v1/devices",
            vec![("authorization", wrong_user.as_str())],
        ),
        (
            "PUT",
            "/v1/devices",
            vec![("authorization", unknown_user.as_str())],
        ),
        ("GET", "/v1/devices", vec![]),
        (
            "GET",
            "/v1/devices",
            vec![("authorization", wrong_user.as_str())],
        ),
        (
            "GET",
            "/v1/devices",
            vec![("authorization", "Basic !!notbase64")],
        ),
        ("DELETE", "/v1/devices/tok1", vec![]),
        (
            "DELETE",
            "/v1/devices/tok1",
            vec![("authorization", wrong_user.as_str())],
        ),
        ("GET", "/v1/apps/mail/vapid", vec![]),
        (
            "GET",
            "/v1/apps/mail/vapid",
            vec![("authorization", wrong_user.as_str())],
        ),
        // Whether an app has Web Push is no secret, but strangers learn nothing.
        ("GET", "/v1/apps/nope/vapid", vec![]),
        ("GET", "/v1/status/subscriptions", vec![]),
        (
            "GET",
            "/v1/status/subscriptions",
            vec![("authorization", "Bearer wrong")],
        ),
        (
            "GET",
            "/v1/status/subscriptions",
            vec![("authorization", admin_as_basic.as_str())],
        ),
        ("GET", "/metrics", vec![]),
        (
            "GET",
            "/metrics",
            vec![("authorization", "Bearer admin-token-012345678")],
        ),
    ];
    for (method, path, headers) in cases {
        let reply = request(r.addr, method, path, &headers, body.clone()).await;
        assert_eq!(
            reply.status,
            401,
            "{method} {path} {headers:?}: {}",
            reply.text()
        );
        assert!(
            reply.headers.contains_key("www-authenticate"),
            "{method} {path}"
        );
        assert!(reply.json()["error"].is_string());
    }
    // Healthz is open and says nothing else.
    let h = request(r.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json(), serde_json::json!({"status": "ok"}));
    // Nothing was accepted.
    let m = admin_get(r.addr, "/metrics").await;
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains("dovepush_ingested_total 0\n"),
        "{}",
        m.text()
    );
    assert!(
        m.text().contains("dovepush_ingest_rejected_total 4\n"),
        "{}",
        m.text()
    );
    r.stop().await;
}

async fn users_see_and_change_only_their_own_devices(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (r, mail) = start(dir.path(), backend).await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "alice-token-1")
            .await
            .status,
        201
    );
    assert_eq!(
        register(r.addr, "bob", "bob-pw", "bob-token-1")
            .await
            .status,
        201
    );
    // Same token again: an update.
    assert_eq!(
        register(r.addr, "bob", "bob-pw", "bob-token-1")
            .await
            .status,
        200
    );

    let alice = basic("alice", "alice-pw");
    let bob = basic("bob", "bob-pw");
    let list = request(
        r.addr,
        "GET",
        "/v1/devices",
        &[("authorization", &alice)],
        "",
    )
    .await;
    assert_eq!(list.status, 200);
    let devices = list.json()["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["token"], "alice-token-1");

    // Alice cannot delete Bob's device: it does not exist for her.
    let del = request(
        r.addr,
        "DELETE",
        "/v1/devices/bob-token-1",
        &[("authorization", &alice)],
        "",
    )
    .await;
    assert_eq!(del.status, 404);
    assert_eq!(del.json()["error"], "no such device");
    // Alice's password does not work for Bob.
    let cross = basic("bob", "alice-pw");
    let del = request(
        r.addr,
        "DELETE",
        "/v1/devices/bob-token-1",
        &[("authorization", &cross)],
        "",
    )
    .await;
    assert_eq!(del.status, 401);
    let list = request(r.addr, "GET", "/v1/devices", &[("authorization", &bob)], "").await;
    assert_eq!(list.json()["devices"].as_array().unwrap().len(), 1);

    // Bob removes his own device: 204, and the METADATA is cleared for him only.
    let del = request(
        r.addr,
        "DELETE",
        "/v1/devices/bob-token-1",
        &[("authorization", &bob)],
        "",
    )
    .await;
    assert_eq!(del.status, 204);
    let list = request(r.addr, "GET", "/v1/devices", &[("authorization", &bob)], "").await;
    assert!(list.json()["devices"].as_array().unwrap().is_empty());
    use dovepush_receiver::mailserver::SubscriptionChange::*;
    assert_eq!(
        mail.changes.lock().unwrap().clone(),
        vec![
            ("alice".to_string(), Set("user=alice".into())),
            ("bob".to_string(), Set("user=bob".into())),
            ("bob".to_string(), Clear),
        ]
    );

    // The admin view shows Alice with a shortened token.
    let s = admin_get(r.addr, "/v1/status/subscriptions").await;
    assert_eq!(s.status, 200);
    let users = s.json();
    let users = users.as_array().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["user"], "alice");
    let token = users[0]["devices"][0]["token"].as_str().unwrap();
    assert!(token.contains('…') && token != "alice-token-1", "{token}");
    let s = admin_get(r.addr, "/v1/status/subscriptions?user=bob").await;
    assert!(s.json().as_array().unwrap().is_empty());
    r.stop().await;
}

async fn malformed_and_oversized_bodies_get_json_reasons(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (r, _mail) = start(dir.path(), backend).await;
    let auth = notify_auth();
    let h = [("authorization", auth.as_str())];
    let cases: Vec<(String, &str)> = vec![
        ("{".into(), "body"),
        ("[]".into(), "body"),
        (r#"{"event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1}"#.into(), "user"),
        (r#"{"user":"a","event":"flagsSet","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1}"#.into(), "event"),
        // A badge event is nothing without its count.
        (r#"{"user":"a","event":"messageRead","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1}"#.into(), "unseen"),
        (r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":"1","imap-uid":1}"#.into(), "imap-uidvalidity"),
        (r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":1}"#.into(), "imap-uid"),
        (r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1,"unseen":-2}"#.into(), "unseen"),
    ];
    for (body, field) in cases {
        let reply = request(r.addr, "PUT", NOTIFY_PATH, &h, body.clone()).await;
        assert_eq!(reply.status, 400, "{body}");
        assert_eq!(reply.json()["field"], field, "{body}");
        assert!(reply.json()["error"].as_str().unwrap().len() > 3);
    }
    let bad_id = request(
        r.addr,
        "PUT",
        NOTIFY_PATH,
        &[
            ("authorization", auth.as_str()),
            ("x-dovepush-event-id", "has space"),
        ],
        notification("alice", 1, 1),
    )
    .await;
    assert_eq!(bad_id.status, 400);
    assert_eq!(bad_id.json()["field"], "X-Dovepush-Event-Id");

    // 64 KiB + 1 is refused; 64 KiB of valid JSON is accepted.
    let mut big = notification("alice", 1, 1);
    big.pop();
    let pad = 64 * 1024 - big.len() - ",\"x\":\"\"}".len();
    let exact = format!("{big},\"x\":\"{}\"}}", "a".repeat(pad));
    assert_eq!(exact.len(), 64 * 1024);
    assert_eq!(
        request(r.addr, "PUT", NOTIFY_PATH, &h, exact.clone())
            .await
            .status,
        200
    );
    let over = format!("{big},\"x\":\"{}\"}}", "a".repeat(pad + 1));
    let reply = request(r.addr, "PUT", NOTIFY_PATH, &h, over).await;
    assert_eq!(reply.status, 413);
    assert!(reply.json()["error"].as_str().unwrap().contains("65536"));

    // Device API: bad bodies from an authenticated user name the field.
    let alice = basic("alice", "alice-pw");
    let reply = request(
        r.addr,
        "PUT",
        "/v1/devices",
        &[("authorization", &alice)],
        r#"{"app":"nope","transport":"apns","token":"t"}"#,
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["field"], "app");
    let reply = request(
        r.addr,
        "PUT",
        "/v1/devices",
        &[("authorization", &alice)],
        r#"{"app":"mail","transport":"apns","token":"t","privacy":"loud"}"#,
    )
    .await;
    assert_eq!(reply.json()["field"], "privacy");
    let reply = request(
        r.addr,
        "PUT",
        "/v1/devices",
        &[("authorization", &alice)],
        vec![b'x'; 17 * 1024],
    )
    .await;
    assert_eq!(reply.status, 413);

    // Unknown paths and methods.
    assert_eq!(request(r.addr, "GET", "/nope", &[], "").await.status, 404);
    let reply = request(r.addr, "GET", NOTIFY_PATH, &h, "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers["allow"], "PUT, POST");
    r.stop().await;
}

async fn duplicate_event_ids_are_committed_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (r, _mail) = start(dir.path(), backend).await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "tok-a").await.status,
        201
    );
    for _ in 0..3 {
        let reply = notify(r.addr, "alice", 7, 1, Some("event-7")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json(), serde_json::json!({"success": true}));
    }
    // Without an id (stock ox driver) every request counts; both event spellings work.
    let auth = notify_auth();
    let body = notification("bob", 1, 1).replace("messageNew", "MessageNew");
    assert_eq!(
        request(
            r.addr,
            "POST",
            NOTIFY_PATH,
            &[("authorization", &auth)],
            body
        )
        .await
        .status,
        200
    );
    let m = admin_get(r.addr, "/metrics").await.text();
    assert!(m.contains("dovepush_ingested_total 2\n"), "{m}");
    assert!(m.contains("dovepush_ingest_duplicates_total 2\n"), "{m}");
    assert!(
        m.contains("dovepush_ingest_dropped_no_device_total 1\n"),
        "{m}"
    );
    assert!(m.contains("dovepush_outbox_queued_total 1\n"), "{m}");
    assert!(
        m.contains("dovepush_ingest_latency_seconds_count 4\n"),
        "{m}"
    );
    r.stop().await;
    let ids = committed_event_ids(dir.path(), backend);
    assert_eq!(ids.len(), 1);
}

async fn a_batch_is_committed_with_one_result_per_notification(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (r, _mail) = start(dir.path(), backend).await;
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "tok-a").await.status,
        201
    );
    let item = |id: &str, body: String| {
        serde_json::json!({
            "event_id": id,
            "notification": serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        })
    };
    let batch = serde_json::json!({
        "notifications": [
            item("b-1", notification("alice", 1, 1)),
            item("b-2", notification("alice", 2, 2).replace("\"INBOX\"", "3")),
            item("has space", notification("alice", 3, 3)),
            item("b-4", notification("alice", 4, 4)),
            item("b-1", notification("alice", 1, 1)),
        ]
    })
    .to_string();
    let auth = notify_auth();
    for path in [
        "/v1/notify/batch",
        "/preliminary/http-notify/v1/notify/batch",
    ] {
        let reply = request(
            r.addr,
            "POST",
            path,
            &[("authorization", &auth)],
            batch.clone(),
        )
        .await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        let results = reply.json()["results"].clone();
        let statuses: Vec<(String, u64)> = results
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["event_id"].as_str().unwrap().to_string(),
                    r["status"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            statuses,
            [
                ("b-1".to_string(), 200),
                ("b-2".to_string(), 400),
                ("has space".to_string(), 400),
                ("b-4".to_string(), 200),
                ("b-1".to_string(), 200),
            ],
            "{path}"
        );
        assert!(results[1]["error"].as_str().unwrap().starts_with("folder:"));
        assert!(results[2]["error"]
            .as_str()
            .unwrap()
            .starts_with("X-Dovepush-Event-Id:"));
    }
    // Twice the same batch: the first b-1 and b-4 are new, every other accepted one a
    // repeat.
    let m = admin_get(r.addr, "/metrics").await.text();
    assert!(m.contains("dovepush_ingested_total 2\n"), "{m}");
    assert!(m.contains("dovepush_ingest_duplicates_total 4\n"), "{m}");
    assert!(m.contains("dovepush_ingest_batches_total 2\n"), "{m}");
    // Refused as a whole: not a batch, too many, wrong credentials, wrong method.
    let not_a_batch = request(
        r.addr,
        "POST",
        "/v1/notify/batch",
        &[("authorization", &auth)],
        "{\"x\":1}".to_string(),
    )
    .await;
    assert_eq!(not_a_batch.status, 400);
    assert_eq!(not_a_batch.json()["field"], "body");
    let many = serde_json::json!({
        "notifications": (0..501).map(|i| item(&format!("m{i}"), notification("alice", 9, 9))).collect::<Vec<_>>()
    });
    let too_many = request(
        r.addr,
        "POST",
        "/v1/notify/batch",
        &[("authorization", &auth)],
        many.to_string(),
    )
    .await;
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.json()["field"], "notifications");
    let wrong = basic(NOTIFY_USER, "wrong");
    let denied = request(
        r.addr,
        "POST",
        "/v1/notify/batch",
        &[("authorization", &wrong)],
        batch.clone(),
    )
    .await;
    assert_eq!(denied.status, 401);
    let put = request(
        r.addr,
        "PUT",
        "/v1/notify/batch",
        &[("authorization", &auth)],
        batch,
    )
    .await;
    assert_eq!(put.status, 405);
    r.stop().await;
}
