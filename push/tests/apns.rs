//! APNs transport against the mock APNs: payloads, privacy modes, outcome classes, provider
//! token reuse and renewal, certificate auth, the 4096-byte limit and HTTP/2 multiplexing.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use dovepush_mocks::{ApnsReply, MockApns, ProviderKey};
use dovepush_push::{DeviceKind, Outcome, Privacy, Pusher};

const TOPIC: &str = "com.example.mail";

async fn setup(privacy: Privacy) -> (Env, MockApns, ProviderKey, Pusher) {
    let env = Env::new();
    let key = ProviderKey::generate("TEAM123456", "KEY1234567");
    let mock = MockApns::start(&env.pki, std::slice::from_ref(&key))
        .await
        .unwrap();
    let mut app = app("mail", privacy);
    app.apns = Some(env.apns_token(&mock, &key, TOPIC));
    let pusher = Pusher::from_config(&[app], env.dir.path()).unwrap();
    (env, mock, key, pusher)
}

fn apns(token: &str) -> dovepush_push::Device {
    device("mail", DeviceKind::Apns, token)
}

#[tokio::test]
async fn full_mode_sends_decoded_sender_and_subject_with_all_headers() {
    let (_env, mock, _key, pusher) = setup(Privacy::Full).await;
    let outcome = pusher.send(&apns("a1b2c3"), &note()).await;
    let Outcome::Delivered { id: Some(id) } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(id.starts_with("00000000-"));

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.device_token, "a1b2c3");
    assert_eq!(r.header("apns-topic"), Some(TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some("ev-0001"));
    let exp: u64 = r.header("apns-expiration").unwrap().parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 3590..=now + 3610).contains(&exp), "expiration {exp}");
    assert!(r.header("authorization").unwrap().starts_with("bearer "));

    let v = r.json();
    assert_eq!(v["aps"]["alert"]["title"], DECODED_FROM);
    assert_eq!(v["aps"]["alert"]["body"], DECODED_SUBJECT);
    assert_eq!(v["aps"]["badge"], 5);
    assert_eq!(v["aps"]["thread-id"], "INBOX");
    assert_eq!(v["aps"]["mutable-content"], 1);
    assert_eq!(v["dovepush"]["folder"], "INBOX");
    assert_eq!(v["dovepush"]["uid"], 42);
    assert_eq!(v["dovepush"]["uidvalidity"], 1_655_200_000u64);
}

#[tokio::test]
async fn generic_and_silent_modes_reveal_no_content() {
    let (_env, mock, _key, pusher) = setup(Privacy::Generic).await;
    assert_eq!(
        pusher.send(&apns("generic1"), &note()).await.class(),
        "delivered"
    );
    let mut silent = apns("silent1");
    silent.privacy = Some(Privacy::Silent);
    assert_eq!(pusher.send(&silent, &note()).await.class(), "delivered");
    let mut full = apns("full1");
    full.privacy = Some(Privacy::Full);
    assert_eq!(pusher.send(&full, &note()).await.class(), "delivered");

    let reqs = mock.requests();
    let generic = &reqs[0];
    assert_eq!(generic.header("apns-push-type"), Some("alert"));
    assert_eq!(generic.header("apns-priority"), Some("10"));
    assert_eq!(generic.json()["aps"]["alert"], "New mail");
    assert_eq!(generic.json()["aps"]["badge"], 5);

    let silent = &reqs[1];
    assert_eq!(silent.header("apns-push-type"), Some("background"));
    assert_eq!(silent.header("apns-priority"), Some("5"));
    assert_eq!(silent.json()["aps"]["content-available"], 1);
    assert_eq!(silent.json()["aps"]["badge"], 5);
    assert!(silent.json()["aps"].get("alert").is_none());

    for r in &reqs[..2] {
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        for secret in ["André", "Party", "päivää", "snippet", "INBOX", "alice"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
    // The per-device override to full shows content even though the app default is generic.
    assert_eq!(reqs[2].json()["aps"]["alert"]["title"], DECODED_FROM);
}

#[tokio::test]
async fn dead_tokens_are_deleted_unless_reregistered_after_the_410() {
    let (_env, mock, _key, pusher) = setup(Privacy::Full).await;
    let n = note();

    let outcome = pusher.send(&apns("gone1"), &n).await;
    let Outcome::DeleteDevice {
        reason,
        unregistered_at: Some(at),
    } = &outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(reason, "Unregistered");
    assert!(at.elapsed().unwrap_or_default() < Duration::from_secs(60));

    // The device registered again after Apple's timestamp: keep it.
    let ts = 1_700_000_000_000u64;
    mock.script([ApnsReply::unregistered(ts)]);
    let mut back = apns("tok2");
    back.registered_at = Some(UNIX_EPOCH + Duration::from_millis(ts + 1000));
    let outcome = pusher.send(&back, &n).await;
    assert_eq!(outcome.class(), "drop", "{outcome:?}");

    mock.script([ApnsReply::unregistered(ts)]);
    back.registered_at = Some(UNIX_EPOCH + Duration::from_millis(ts - 1000));
    assert_eq!(
        pusher.send(&back, &n).await,
        Outcome::DeleteDevice {
            reason: "Unregistered".into(),
            unregistered_at: Some(UNIX_EPOCH + Duration::from_millis(ts)),
        }
    );

    for (token, reason) in [
        ("badtoken1", "BadDeviceToken"),
        ("wrongtopic1", "DeviceTokenNotForTopic"),
    ] {
        let outcome = pusher.send(&apns(token), &n).await;
        assert_eq!(outcome.class(), "delete_device", "{outcome:?}");
        assert_eq!(outcome.reason(), reason);
    }
}

#[tokio::test]
async fn temporary_failures_are_retried_honouring_retry_after() {
    let (_env, mock, _key, pusher) = setup(Privacy::Full).await;
    let n = note();
    assert_eq!(
        pusher.send(&apns("busy1"), &n).await,
        Outcome::Retry {
            reason: "TooManyRequests".into(),
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(
        pusher.send(&apns("down1"), &n).await,
        Outcome::Retry {
            reason: "ServiceUnavailable".into(),
            retry_after: Some(Duration::from_secs(3))
        }
    );
    let crash = pusher.send(&apns("crash1"), &n).await;
    assert_eq!(
        (crash.class(), crash.reason()),
        ("retry", "InternalServerError")
    );

    // Connection loss mid-request.
    let cut = pusher.send(&apns("cut1"), &n).await;
    assert_eq!(cut.class(), "retry", "{cut:?}");
    assert_eq!(cut.reason(), "connection");
    // The client reconnects by itself afterwards.
    assert_eq!(pusher.send(&apns("ok1"), &n).await.class(), "delivered");
    assert_eq!(mock.connections(), 2);
}

#[tokio::test]
async fn other_client_errors_and_oversized_payloads_are_dropped() {
    let (_env, mock, _key, pusher) = setup(Privacy::Full).await;
    let outcome = pusher.send(&apns("badmsg1"), &note()).await;
    assert_eq!(
        (outcome.class(), outcome.reason()),
        ("drop", "BadMessageId")
    );

    mock.script([ApnsReply::error(413, "PayloadTooLarge")]);
    let outcome = pusher.send(&apns("tok"), &note()).await;
    assert_eq!(
        (outcome.class(), outcome.reason()),
        ("drop", "PayloadTooLarge")
    );

    // A payload that cannot be cut to size (the folder name alone is too long) never leaves.
    let before = mock.request_count();
    let mut n = note();
    n.folder = "F".repeat(5000);
    let outcome = pusher.send(&apns("tok"), &n).await;
    assert_eq!(
        (outcome.class(), outcome.reason()),
        ("drop", "payload_too_large")
    );
    assert_eq!(mock.request_count(), before);
}

#[tokio::test]
async fn multibyte_subjects_are_cut_at_character_boundaries_to_4096_bytes() {
    let (_env, mock, _key, pusher) = setup(Privacy::Full).await;
    let mut n = note();
    // 3-byte and 4-byte characters, raw and RFC 2047 encoded (decoded before cutting).
    n.subject = Some("件名😀".repeat(700));
    assert_eq!(pusher.send(&apns("t1"), &n).await.class(), "delivered");
    n.subject = Some("=?UTF-8?B?8J+YgOS7tuWQjQ==?= ".repeat(300));
    n.from = Some(format!("\"{}\" <x@example.org>", "送信者".repeat(600)));
    assert_eq!(pusher.send(&apns("t2"), &n).await.class(), "delivered");

    for r in mock.requests() {
        assert!(r.body.len() <= 4096, "{} bytes", r.body.len());
        assert!(r.body.len() > 4000, "cut too much: {} bytes", r.body.len());
        let v = r.json();
        let body = v["aps"]["alert"]["body"].as_str().unwrap();
        let title = v["aps"]["alert"]["title"].as_str().unwrap();
        assert!(body.is_empty() || body.ends_with('…'), "{body}");
        assert!(!title.is_empty());
    }
    // The second one had its subject cut away entirely and then the long sender name.
    let second = mock.requests()[1].json();
    assert!(second["aps"]["alert"]["title"]
        .as_str()
        .unwrap()
        .ends_with('…'));
}

#[tokio::test]
async fn one_provider_token_serves_a_thousand_sends() {
    let (_env, mock, _key, pusher) = setup(Privacy::Generic).await;
    mock.set_recording(false);
    let pusher = Arc::new(pusher);
    let n = Arc::new(note());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let pusher = pusher.clone();
        let n = n.clone();
        tasks.spawn(async move { pusher.send(&apns(&format!("dev{i:04}")), &n).await });
    }
    while let Some(outcome) = tasks.join_next().await {
        assert_eq!(outcome.unwrap().class(), "delivered");
    }
    assert_eq!(mock.request_count(), 1000);
    assert_eq!(mock.distinct_provider_tokens(), 1);
    assert_eq!(pusher.credential_mints("mail", DeviceKind::Apns), 1);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn rejected_provider_token_is_renewed_once() {
    let (_env, mock, _key, pusher) = setup(Privacy::Generic).await;
    // An expired token: renewed, then delivered.
    mock.script([ApnsReply::error(403, "ExpiredProviderToken")]);
    assert_eq!(pusher.send(&apns("t1"), &note()).await.class(), "delivered");
    assert_eq!(mock.distinct_provider_tokens(), 2);
    assert_eq!(pusher.credential_mints("mail", DeviceKind::Apns), 2);

    // A revoked key: one more renewal attempt (after the cooldown it would be one per
    // minute), then CredentialsRejected; the device is not deleted.
    mock.reject_all_tokens(Some("InvalidProviderToken"));
    let outcome = pusher.send(&apns("t2"), &note()).await;
    assert_eq!(
        outcome,
        Outcome::CredentialsRejected {
            reason: "InvalidProviderToken".into()
        }
    );
    let outcome = pusher.send(&apns("t3"), &note()).await;
    assert_eq!(outcome.class(), "credentials_rejected");
    assert!(pusher.credential_mints("mail", DeviceKind::Apns) <= 3);
}

#[tokio::test]
async fn certificate_auth_sends_without_provider_token() {
    let env = Env::new();
    let mock = MockApns::start(&env.pki, &[]).await.unwrap();
    let mut app = app("certapp", Privacy::Full);
    app.apns = Some(env.apns_cert(&mock, TOPIC));
    let pusher = Pusher::from_config(&[app], env.dir.path()).unwrap();
    let outcome = pusher
        .send(&device("certapp", DeviceKind::Apns, "c0ffee"), &note())
        .await;
    assert_eq!(outcome.class(), "delivered", "{outcome:?}");
    let r = &mock.requests()[0];
    assert!(r.client_cert);
    assert!(r.header("authorization").is_none());
    assert_eq!(pusher.credential_mints("certapp", DeviceKind::Apns), 0);

    // Without the certificate the same mock refuses: proves the mock checks it.
    let key = ProviderKey::generate("T", "K");
    let mut bare = env.apns_cert(&mock, TOPIC);
    bare.cert_file = None;
    bare.team_id = Some(key.team_id.clone());
    bare.key_id = Some(key.key_id.clone());
    bare.key_file = Some(env.dir.write("other.p8", &key.p8_pem));
    let mut app = common::app("unknownkey", Privacy::Full);
    app.apns = Some(bare);
    let pusher = Pusher::from_config(&[app], env.dir.path()).unwrap();
    let outcome = pusher
        .send(&device("unknownkey", DeviceKind::Apns, "c0ffee"), &note())
        .await;
    assert_eq!(outcome.class(), "credentials_rejected");
}

#[tokio::test]
async fn one_connection_multiplexes_many_concurrent_sends() {
    let (_env, mock, _key, pusher) = setup(Privacy::Full).await;
    mock.set_delay(Duration::from_millis(200));
    let pusher = Arc::new(pusher);
    let n = Arc::new(note());
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let pusher = pusher.clone();
        let n = n.clone();
        tasks.spawn(async move { pusher.send(&apns(&format!("m{i}")), &n).await });
    }
    while let Some(outcome) = tasks.join_next().await {
        assert_eq!(outcome.unwrap().class(), "delivered");
    }
    assert_eq!(mock.connections(), 1);
    assert!(
        mock.max_in_flight() >= 100,
        "max in flight {}",
        mock.max_in_flight()
    );
    // 300 sends of 200 ms each in far less than 300 × 200 ms.
    assert!(started.elapsed() < Duration::from_secs(10));
    let conns: std::collections::HashSet<u64> =
        mock.requests().iter().map(|r| r.connection).collect();
    assert_eq!(conns.len(), 1);
}
