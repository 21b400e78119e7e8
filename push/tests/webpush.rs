//! Web Push transport against the mock push service: the message the browser decrypts
//! (RFC 8291), the VAPID token the service verifies, the RFC 8030 headers, the outcomes
//! (410/404 delete, 413 cut and sent once more, 429/5xx retry with Retry-After, 403 on a
//! VAPID key the subscription is not bound to) and the SSRF guard at send time.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovepush_mocks::{MockWebPush, VapidKeyPair, WebPushReply, WebPushSubscription};
use dovepush_push::webpush::{AddressPolicy, Resolve, Subscription, WebPushOptions};
use dovepush_push::{read_ca_file, DeviceKind, Outcome, Privacy, Pusher, WebPushConfig};
use futures_util::future::BoxFuture;

struct Setup {
    env: Env,
    mock: MockWebPush,
    vapid: VapidKeyPair,
    pusher: Pusher,
}

/// DNS as a table: `push.test` → 127.0.0.1, `inside.test` → 10.0.0.7 and 127.0.0.1,
/// anything else does not resolve.
struct TableResolver;

impl Resolve for TableResolver {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        let found: Vec<IpAddr> = match host {
            "push.test" => vec!["127.0.0.1".parse().unwrap()],
            "inside.test" => vec!["10.0.0.7".parse().unwrap(), "127.0.0.1".parse().unwrap()],
            _ => vec![],
        };
        Box::pin(async move {
            if found.is_empty() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "NXDOMAIN",
                ))
            } else {
                Ok(found)
            }
        })
    }
}

/// A pusher for app `mail` whose `[webpush]` trusts the mock's CA and lists
/// `allow_hosts` (`deny_private` as given).
async fn setup_with(privacy: Privacy, allow_hosts: &[&str], deny_private: bool) -> Setup {
    setup_resolving(privacy, allow_hosts, deny_private, None).await
}

async fn setup_resolving(
    privacy: Privacy,
    allow_hosts: &[&str],
    deny_private: bool,
    resolver: Option<Arc<dyn Resolve>>,
) -> Setup {
    let env = Env::new();
    let mock = MockWebPush::start(&env.pki).await.unwrap();
    let vapid = VapidKeyPair::generate();
    let key_file = env.dir.write("vapid.pem", &vapid.private_pem);
    let mut app = app("mail", privacy);
    app.webpush = Some(WebPushConfig {
        vapid_private_key_file: key_file,
        subject: "mailto:ops@example.org".to_owned(),
    });
    let mut options = WebPushOptions {
        policy: AddressPolicy::new(allow_hosts.iter().copied(), deny_private),
        extra_roots: read_ca_file(&env.ca_file).unwrap(),
        timeout: Duration::from_secs(10),
        ..WebPushOptions::default()
    };
    if let Some(resolver) = resolver {
        options.resolver = resolver;
    }
    let pusher = Pusher::from_config_with(&[app], env.dir.path(), &options).unwrap();
    Setup {
        env,
        mock,
        vapid,
        pusher,
    }
}

async fn setup(privacy: Privacy) -> Setup {
    setup_with(privacy, &["127.0.0.1"], true).await
}

/// The device a browser's subscription becomes.
/// `(class, reason)` of an outcome.
fn cr(o: &Outcome) -> (&'static str, String) {
    (o.class(), o.reason().to_owned())
}

fn expect(class: &'static str, reason: &str) -> (&'static str, String) {
    (class, reason.to_owned())
}

fn browser(sub: &WebPushSubscription) -> dovepush_push::Device {
    let token = Subscription::new(&sub.endpoint, &sub.p256dh, &sub.auth)
        .unwrap()
        .token();
    device("mail", DeviceKind::WebPush, &token)
}

#[tokio::test]
async fn the_browser_decrypts_the_message_and_the_service_accepts_vapid() {
    let s = setup(Privacy::Full).await;
    assert_eq!(
        s.pusher.vapid_public_key("mail"),
        Some(s.vapid.public_key.as_str())
    );
    let sub = s.mock.subscribe(&s.vapid.public_key);
    for _ in 0..2 {
        let outcome = s.pusher.send(&browser(&sub), &note()).await;
        let Outcome::Delivered { id: Some(id) } = &outcome else {
            panic!("{outcome:?}")
        };
        assert!(id.starts_with(&format!("{}/message/", s.mock.origin())));
    }
    // One VAPID token per push service origin, reused.
    assert_eq!(s.pusher.credential_mints("mail", DeviceKind::WebPush), 1);

    let reqs = s.mock.requests();
    assert_eq!(reqs.len(), 2);
    let r = &reqs[0];
    let m = r.json();
    assert_eq!(m["event"], "messageNew", "{m}");
    assert_eq!(m["user"], "alice@example.org");
    assert_eq!(m["folder"], "INBOX");
    assert_eq!(m["uid"], 42);
    assert_eq!(m["uidvalidity"], 1_655_200_000u32);
    assert_eq!(m["unseen"], 5);
    assert_eq!(m["event_id"], "ev-0001");
    assert_eq!(m["notification"]["title"], DECODED_FROM);
    assert_eq!(m["notification"]["body"], DECODED_SUBJECT);
    assert_eq!(m["snippet"], "secret snippet");
    assert_eq!(r.header("ttl"), Some("3600"));
    assert_eq!(r.header("urgency"), Some("normal"));
    assert_eq!(r.header("content-encoding"), Some("aes128gcm"));
    let topic = r.header("topic").unwrap();
    assert_eq!(topic.len(), 32);
    assert_eq!(reqs[1].header("topic"), Some(topic), "one topic per folder");
    assert_eq!(r.vapid_claims["aud"], s.mock.origin());
    assert_eq!(r.vapid_claims["sub"], "mailto:ops@example.org");
    let exp = r.vapid_claims["exp"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(exp > now + 3600 && exp <= now + 24 * 3600, "{exp} vs {now}");
    assert!(r.body_len <= 4096);
}

#[tokio::test]
async fn privacy_modes_shape_the_message() {
    let s = setup(Privacy::Generic).await;
    let sub = s.mock.subscribe(&s.vapid.public_key);
    let mut generic = browser(&sub);
    assert!(s.pusher.send(&generic, &note()).await.class() == "delivered");
    generic.privacy = Some(Privacy::Silent);
    assert!(s.pusher.send(&generic, &note()).await.class() == "delivered");
    let reqs = s.mock.requests();
    let m = reqs[0].json();
    assert_eq!(m["notification"]["title"], "New mail", "{m}");
    for hidden in ["user", "snippet"] {
        assert!(m.get(hidden).is_none(), "{hidden}: {m}");
    }
    assert!(!String::from_utf8_lossy(&reqs[0].plaintext).contains("Party"));
    assert_eq!(
        reqs[1].json(),
        serde_json::json!({"event": "messageNew", "unseen": 5})
    );
    assert_eq!(reqs[1].header("urgency"), Some("low"));
}

#[tokio::test]
async fn replies_become_outcomes() {
    let s = setup(Privacy::Full).await;
    let sub = s.mock.subscribe(&s.vapid.public_key);
    let dev = browser(&sub);
    s.mock.script([
        WebPushReply::gone(),
        WebPushReply::status(404),
        WebPushReply::too_many(7),
        WebPushReply::status(503),
        WebPushReply::status(400),
    ]);
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.push(s.pusher.send(&dev, &note()).await);
    }
    assert_eq!(
        outcomes.iter().map(cr).collect::<Vec<_>>(),
        vec![
            expect("delete_device", "SubscriptionGone"),
            expect("delete_device", "SubscriptionNotFound"),
            expect("retry", "TooManyRequests"),
            expect("retry", "http_503"),
            expect("drop", "http_400"),
        ]
    );
    assert!(matches!(
        outcomes[2],
        Outcome::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(7)
    ));
    // An unsubscribed browser: the service says 410.
    s.mock.unsubscribe(&sub.endpoint);
    assert_eq!(
        cr(&s.pusher.send(&dev, &note()).await),
        expect("delete_device", "SubscriptionGone")
    );
    // A subscription made for another application server key: 403, our credentials.
    let other = s.mock.subscribe(&VapidKeyPair::generate().public_key);
    let outcome = s.pusher.send(&browser(&other), &note()).await;
    assert_eq!(
        cr(&outcome),
        expect("credentials_rejected", "VapidForbidden")
    );
}

#[tokio::test]
async fn a_413_is_answered_by_one_shorter_message() {
    let s = setup(Privacy::Full).await;
    let sub = s.mock.subscribe(&s.vapid.public_key);
    let dev = browser(&sub);
    let mut big = note();
    big.snippet = Some("x".repeat(6000));
    s.mock.script([WebPushReply::too_large()]);
    assert!(s.pusher.send(&dev, &big).await.class() == "delivered");
    let reqs = s.mock.requests();
    assert_eq!(reqs.len(), 2, "the 413 and the shorter retry");
    assert!(reqs[0].body_len <= 4096 && reqs[0].body_len > 3900);
    assert!(reqs[1].body_len <= 2048, "{}", reqs[1].body_len);
    assert!(reqs[1].json()["snippet"].as_str().unwrap().ends_with('…'));

    // A service that takes even less: one retry, then the push is dropped.
    s.mock.set_max_body(1000);
    let before = s.mock.request_count();
    assert_eq!(
        cr(&s.pusher.send(&dev, &big).await),
        expect("drop", "PayloadTooLarge")
    );
    assert_eq!(s.mock.request_count() - before, 2);
}

#[tokio::test]
async fn refused_addresses_are_never_connected_to() {
    // No allow_hosts: the mock's 127.0.0.1 is a loopback address.
    let s = setup_with(Privacy::Full, &[], true).await;
    let sub = s.mock.subscribe(&s.vapid.public_key);
    assert_eq!(
        cr(&s.pusher.send(&browser(&sub), &note()).await),
        expect("delete_device", "endpoint_refused")
    );
    // A name resolving to loopback (the system resolver: `localhost`) is refused after
    // resolution, inside the connector.
    let by_name = WebPushSubscription {
        endpoint: sub.endpoint.replace("127.0.0.1", "localhost"),
        ..sub.clone()
    };
    assert_eq!(
        cr(&s.pusher.send(&browser(&by_name), &note()).await),
        expect("delete_device", "endpoint_refused")
    );
    assert_eq!(s.mock.request_count(), 0);
    assert_eq!(s.mock.connections(), 0);
    drop(s.env);

    // deny_private = false (labs): loopback is fine, by name too…
    let lab = setup_with(Privacy::Full, &[], false).await;
    let sub = lab.mock.subscribe(&lab.vapid.public_key);
    let by_name = WebPushSubscription {
        endpoint: sub.endpoint.replace("127.0.0.1", "localhost"),
        ..sub.clone()
    };
    assert!(lab.pusher.send(&browser(&by_name), &note()).await.class() == "delivered");
    assert_eq!(
        lab.mock.requests()[0].vapid_claims["aud"],
        format!("https://localhost:{}", lab.mock.port())
    );
    // …but cloud metadata never is.
    let metadata = WebPushSubscription {
        endpoint: "https://169.254.169.254/latest/meta-data".into(),
        ..sub
    };
    assert_eq!(
        cr(&lab.pusher.send(&browser(&metadata), &note()).await),
        expect("delete_device", "endpoint_refused")
    );
}

#[tokio::test]
async fn names_are_checked_after_resolution_and_dns_failures_retry() {
    // `push.test` is allowed by name: the mock on 127.0.0.1 is reached through it (the
    // certificate does not name it, so the TLS handshake fails: a retry, not a refusal).
    let s = setup_resolving(
        Privacy::Full,
        &["push.test"],
        true,
        Some(Arc::new(TableResolver)),
    )
    .await;
    let sub = s.mock.subscribe(&s.vapid.public_key);
    let at = |host: &str| WebPushSubscription {
        endpoint: sub.endpoint.replace("127.0.0.1", host),
        ..sub.clone()
    };
    let allowed = s.pusher.send(&browser(&at("push.test")), &note()).await;
    assert_eq!(cr(&allowed), expect("retry", "connect"), "{allowed:?}");
    assert_eq!(s.mock.connections(), 1, "the allowed name was connected to");
    // A name resolving only to refused addresses: deleted, never connected to.
    assert_eq!(
        cr(&s.pusher.send(&browser(&at("inside.test")), &note()).await),
        expect("delete_device", "endpoint_refused")
    );
    // A name that does not resolve (now): retried, the subscription is kept.
    assert_eq!(
        cr(&s.pusher.send(&browser(&at("gone.test")), &note()).await),
        expect("retry", "dns")
    );
    assert_eq!(s.mock.connections(), 1);
}
