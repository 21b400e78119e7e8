//! FCM HTTP v1 transport against the mock FCM and its OAuth token endpoint: message shape,
//! privacy modes, outcome classes, token caching, renewal and token-endpoint failures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovepush_mocks::{FcmReply, MockFcm};
use dovepush_push::{DeviceKind, Outcome, Privacy, Pusher};

async fn setup_with(privacy: Privacy, tls: bool) -> (Env, MockFcm, Pusher) {
    let env = Env::new();
    let mock = MockFcm::start(tls.then_some(&env.pki), "mock-project")
        .await
        .unwrap();
    let mut app = app("mail", privacy);
    app.fcm = Some(env.fcm(&mock, "mail"));
    let pusher = Pusher::from_config(&[app], env.dir.path()).unwrap();
    (env, mock, pusher)
}

async fn setup(privacy: Privacy) -> (Env, MockFcm, Pusher) {
    setup_with(privacy, true).await
}

fn fcm(token: &str) -> dovepush_push::Device {
    device("mail", DeviceKind::Fcm, token)
}

#[tokio::test]
async fn full_mode_message_with_cached_oauth_token() {
    let (_env, mock, pusher) = setup(Privacy::Full).await;
    for i in 0..5 {
        let outcome = pusher.send(&fcm(&format!("tok{i}")), &note()).await;
        let Outcome::Delivered { id: Some(id) } = &outcome else {
            panic!("{outcome:?}")
        };
        assert!(id.starts_with("projects/mock-project/messages/"));
    }
    assert_eq!(mock.token_mints(), 1);
    assert_eq!(pusher.credential_mints("mail", DeviceKind::Fcm), 1);

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 5);
    let auth = reqs[0].headers["authorization"].to_str().unwrap();
    assert_eq!(auth, "Bearer ya29.mock-access-token-1");
    let m = reqs[0].message();
    assert_eq!(m["token"], "tok0");
    assert_eq!(m["notification"]["title"], DECODED_FROM);
    assert_eq!(m["notification"]["body"], DECODED_SUBJECT);
    assert_eq!(m["data"]["event"], "messageNew");
    assert_eq!(m["data"]["folder"], "INBOX");
    assert_eq!(m["data"]["uid"], "42");
    assert_eq!(m["data"]["uidvalidity"], "1655200000");
    assert_eq!(m["data"]["unseen"], "5");
    assert_eq!(m["data"]["event_id"], "ev-0001");
    assert_eq!(m["data"]["from"], DECODED_FROM);
    assert_eq!(m["android"]["priority"], "HIGH");
    assert_eq!(m["android"]["ttl"], "3600s");
}

#[tokio::test]
async fn generic_and_silent_modes() {
    let (_env, mock, pusher) = setup(Privacy::Generic).await;
    assert_eq!(pusher.send(&fcm("g"), &note()).await.class(), "delivered");
    let mut silent = fcm("s");
    silent.privacy = Some(Privacy::Silent);
    assert_eq!(pusher.send(&silent, &note()).await.class(), "delivered");

    let reqs = mock.requests();
    let generic = reqs[0].message();
    assert_eq!(generic["notification"]["title"], "New mail");
    assert_eq!(generic["android"]["priority"], "HIGH");
    let silent = reqs[1].message();
    assert!(silent.get("notification").is_none());
    assert_eq!(silent["android"]["priority"], "NORMAL");
    for r in &reqs {
        let text = r.body.to_string();
        for secret in ["André", "Party", "snippet", "alice"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(r.message()["data"]["unseen"], "5");
    }
}

#[tokio::test]
async fn outcome_classes_from_google_errors() {
    let (_env, mock, pusher) = setup(Privacy::Full).await;
    let n = note();
    let check = |o: Outcome, class: &str, reason: &str| {
        assert_eq!((o.class(), o.reason()), (class, reason), "{o:?}");
    };
    check(
        pusher.send(&fcm("unregistered1"), &n).await,
        "delete_device",
        "UNREGISTERED",
    );
    check(
        pusher.send(&fcm("invalid1"), &n).await,
        "delete_device",
        "INVALID_ARGUMENT_token",
    );
    check(
        pusher.send(&fcm("mismatch1"), &n).await,
        "delete_device",
        "SENDER_ID_MISMATCH",
    );
    assert_eq!(
        pusher.send(&fcm("quota1"), &n).await,
        Outcome::Retry {
            reason: "QUOTA_EXCEEDED".into(),
            retry_after: Some(Duration::from_secs(9))
        }
    );
    check(
        pusher.send(&fcm("unavailable1"), &n).await,
        "retry",
        "UNAVAILABLE",
    );
    check(
        pusher.send(&fcm("internal1"), &n).await,
        "retry",
        "INTERNAL",
    );
    check(pusher.send(&fcm("cut1"), &n).await, "retry", "connection");
    check(
        pusher.send(&fcm("thirdparty1"), &n).await,
        "credentials_rejected",
        "THIRD_PARTY_AUTH_ERROR",
    );
    // INVALID_ARGUMENT about the payload, not the token: drop the item, keep the device.
    mock.script([FcmReply::error(
        400,
        "INVALID_ARGUMENT",
        None,
        "Invalid value at 'message.android.ttl'",
    )]);
    check(
        pusher.send(&fcm("ok"), &n).await,
        "drop",
        "INVALID_ARGUMENT",
    );
    // A 404 without an FCM errorCode (e.g. a wrong project path).
    mock.script([FcmReply::error(404, "NOT_FOUND", None, "x")]);
    check(pusher.send(&fcm("ok"), &n).await, "drop", "NOT_FOUND");
}

#[tokio::test]
async fn expired_access_token_is_renewed_once() {
    let (_env, mock, pusher) = setup(Privacy::Full).await;
    assert_eq!(pusher.send(&fcm("a"), &note()).await.class(), "delivered");
    mock.revoke_access_tokens();
    assert_eq!(pusher.send(&fcm("b"), &note()).await.class(), "delivered");
    assert_eq!(mock.token_mints(), 2);

    // Every token refused: one more renewal at most, then alert; nothing deleted.
    mock.reject_access_tokens(true);
    let outcome = pusher.send(&fcm("c"), &note()).await;
    assert_eq!(
        outcome,
        Outcome::CredentialsRejected {
            reason: "UNAUTHENTICATED".into()
        }
    );
    assert!(mock.token_mints() <= 3);
}

#[tokio::test]
async fn token_endpoint_failures() {
    let (_env, mock, pusher) = setup(Privacy::Full).await;
    mock.fail_token_endpoint(Some((400, "invalid_grant")));
    let outcome = pusher.send(&fcm("a"), &note()).await;
    assert_eq!(
        (outcome.class(), outcome.reason()),
        ("credentials_rejected", "oauth_rejected")
    );
    // The failure is held for a moment: a fan-out does not hammer the token endpoint.
    let hits = mock.request_count();
    let outcome = pusher.send(&fcm("b"), &note()).await;
    assert_eq!(outcome.reason(), "oauth_rejected");
    assert_eq!(mock.request_count(), hits);

    // After the hold the endpoint is asked again; it recovers. The hold is on tokio's
    // clock: move it past the hold instead of waiting (nothing is in flight meanwhile).
    mock.fail_token_endpoint(None);
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(2100)).await;
    tokio::time::resume();
    assert_eq!(pusher.send(&fcm("c"), &note()).await.class(), "delivered");
    assert_eq!(mock.requests().len(), 1);

    let (_env, mock, pusher) = setup(Privacy::Full).await;
    mock.fail_token_endpoint(Some((503, "backend_error")));
    let outcome = pusher.send(&fcm("a"), &note()).await;
    assert_eq!(
        (outcome.class(), outcome.reason()),
        ("retry", "oauth_unavailable")
    );
}

#[tokio::test]
async fn concurrent_cold_start_fetches_one_token_over_one_connection() {
    let (_env, mock, pusher) = setup(Privacy::Generic).await;
    let pusher = Arc::new(pusher);
    let n = Arc::new(note());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let pusher = pusher.clone();
        let n = n.clone();
        tasks.spawn(async move { pusher.send(&fcm(&format!("t{i}")), &n).await });
    }
    while let Some(outcome) = tasks.join_next().await {
        assert_eq!(outcome.unwrap().class(), "delivered");
    }
    assert_eq!(mock.token_mints(), 1);
    assert_eq!(mock.connections(), 1, "h2 via ALPN multiplexes");
}

#[tokio::test]
async fn plain_http_endpoint_and_long_subjects() {
    let (_env, mock, pusher) = setup_with(Privacy::Full, false).await;
    assert!(mock.url().starts_with("http://"));
    let mut n = note();
    n.subject = Some("ü😀".repeat(3000));
    assert_eq!(pusher.send(&fcm("a"), &n).await.class(), "delivered");
    let m = mock.requests()[0].message().clone();
    assert!(m["notification"]["body"].as_str().unwrap().ends_with('…'));
}
