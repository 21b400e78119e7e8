//! The receiver with its real push transports (dovepush-push), built from a TOML config
//! whose `[[apps]]` point at the mock APNs and mock FCM (only `endpoint` and `ca_file`
//! differ from production): decoded subjects and badges reach the providers, dead tokens
//! remove devices with the provider's reason, an APNs 410 older than a re-registration
//! keeps the device, two apps use their own keys, the three privacy modes, and badge
//! updates as silent pushes on both providers.

mod common;

on_both_stores!(
    multi_thread;
    one_push_per_device_with_decoded_subject_and_unseen_badge,
    dead_tokens_remove_the_device_with_the_provider_reason,
    a_410_older_than_the_re_registration_keeps_the_device,
    two_apps_in_one_instance_use_their_own_keys,
    privacy_modes_reach_the_providers_as_specified,
    badge_updates_reach_both_providers_as_silent_pushes_with_the_count,
);

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use dovepush_mocks::{ApnsReply, MockApns, MockFcm, ProviderKey, TestPki};
use dovepush_receiver::config::Config;
use dovepush_receiver::mailserver::SubscriptionChange;
use dovepush_receiver::transport::push::transports_from_config;
use serde_json::{json, Value};

/// Mock providers and the files a config needs to reach them.
struct Providers {
    dir: tempfile::TempDir,
    apns: MockApns,
    fcm: MockFcm,
    key_a: ProviderKey,
    key_b: ProviderKey,
    mail: Arc<FakeMail>,
    backend: Backend,
}

impl Providers {
    async fn start(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new();
        pki.write_ca(&dir.path().join("ca.pem")).unwrap();
        let key_a = ProviderKey::generate("TEAMAAAAAA", "KEYAAAAAAA");
        let key_b = ProviderKey::generate("TEAMBBBBBB", "KEYBBBBBBB");
        let apns = MockApns::start(&pki, &[key_a.clone(), key_b.clone()])
            .await
            .unwrap();
        let fcm = MockFcm::start(Some(&pki), "mock-project").await.unwrap();
        std::fs::write(dir.path().join("AuthKey_A.p8"), &key_a.p8_pem).unwrap();
        std::fs::write(dir.path().join("AuthKey_B.p8"), &key_b.p8_pem).unwrap();
        std::fs::write(dir.path().join("firebase.json"), fcm.service_account_json()).unwrap();
        Providers {
            dir,
            apns,
            fcm,
            key_a,
            key_b,
            mail: FakeMail::with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]),
            backend,
        }
    }

    /// `[apps.apns]` (token auth with key A or B) with relative file paths.
    fn apns_table(&self, topic: &str, key: &ProviderKey, file: &str) -> String {
        format!(
            "[apps.apns]\ntopic = \"{topic}\"\nteam_id = \"{}\"\nkey_id = \"{}\"\n\
             key_file = \"{file}\"\nendpoint = \"{}\"\nca_file = \"ca.pem\"\n\
             request_timeout_secs = 10\n",
            key.team_id,
            key.key_id,
            self.apns.url()
        )
    }

    fn fcm_table(&self) -> String {
        format!(
            "[apps.fcm]\nservice_account_file = \"firebase.json\"\nendpoint = \"{}\"\n\
             ca_file = \"ca.pem\"\nrequest_timeout_secs = 10\n",
            self.fcm.url()
        )
    }

    /// A receiver config in the providers' dir; `app` continues the `[[apps]] id = "mail"`
    /// entry (and may add more apps).
    fn config(&self, app: &str) -> Config {
        let path = self.dir.path().join("receiver.toml");
        // A badge burst sent one request at a time must fall within one badge wait, also
        // on a slow machine.
        let text = config_text_on(self.dir.path(), app, self.backend)
            .replace("[outbox]\n", "[outbox]\nbadge_wait_milliseconds = 3000\n");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn receiver(&self, app: &str) -> Running {
        let config = self.config(app);
        let transports = transports_from_config(&config).unwrap_or_else(|e| panic!("{e}"));
        Running::start(config, transports, self.mail.clone()).await
    }
}

const ENCODED_FROM: &str = "=?utf-8?q?J=C3=BCrgen?= <juergen@example.net>";
const ENCODED_SUBJECT: &str = "Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?= 1";
const DECODED_FROM: &str = "Jürgen";
const DECODED_SUBJECT: &str = "Test päivää 1";

/// Registers a device with an explicit app, transport and optional privacy.
async fn register_device(
    r: &Running,
    user: &str,
    password: &str,
    app: &str,
    transport: &str,
    token: &str,
    privacy: Option<&str>,
) {
    let mut body = json!({"app": app, "transport": transport, "token": token});
    if let Some(p) = privacy {
        body["privacy"] = p.into();
    }
    let auth = basic(user, password);
    let reply = request(
        r.addr,
        "PUT",
        "/v1/devices",
        &[("authorization", auth.as_str())],
        body.to_string(),
    )
    .await;
    assert!(
        reply.status == 201 || reply.status == 200,
        "{}",
        reply.text()
    );
}

/// An ox notification with RFC 2047 encoded sender and subject.
async fn notify_encoded(r: &Running, user: &str, uid: u32, unseen: u32) {
    let body = json!({
        "user": user,
        "event": "messageNew",
        "folder": "INBOX",
        "imap-uidvalidity": 1655200000u32,
        "imap-uid": uid,
        "from": ENCODED_FROM,
        "subject": ENCODED_SUBJECT,
        "snippet": "Hello Alice",
        "unseen": unseen,
    });
    let auth = notify_auth();
    let reply = request(
        r.addr,
        "PUT",
        NOTIFY_PATH,
        &[
            ("authorization", auth.as_str()),
            ("x-dovepush-event-id", &format!("{user}-{uid}")),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

async fn metrics(r: &Running) -> String {
    admin_get(r.addr, "/metrics").await.text()
}

async fn subscriptions(r: &Running) -> Value {
    admin_get(r.addr, "/v1/status/subscriptions").await.json()
}

fn user_entry<'a>(subs: &'a Value, user: &str) -> Option<&'a Value> {
    subs.as_array()?.iter().find(|u| u["user"] == user)
}

/// Polls the subscriptions until `check` holds (bounded).
async fn eventually_subscriptions(r: &Running, what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let subs = subscriptions(r).await;
        if check(&subs) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {subs:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A receiver whose app `mail` (privacy `full`) has APNs (key A) and FCM, where alice
/// has one device of each: `a1b2c3d4` and `fcm-alice-1`.
async fn alice_on_apns_and_fcm(p: &Providers) -> Running {
    let r = p
        .receiver(&format!(
            "privacy = \"full\"\n{}{}",
            p.apns_table("com.example.mail", &p.key_a, "AuthKey_A.p8"),
            p.fcm_table()
        ))
        .await;
    register_device(&r, "alice", "alice-pw", "mail", "apns", "a1b2c3d4", None).await;
    register_device(&r, "alice", "alice-pw", "mail", "fcm", "fcm-alice-1", None).await;
    r
}

async fn one_push_per_device_with_decoded_subject_and_unseen_badge(backend: Backend) {
    let p = Providers::start(backend).await;
    let r = alice_on_apns_and_fcm(&p).await;
    notify_encoded(&r, "alice", 1, 3).await;

    eventually("one APNs and one FCM push", || {
        p.apns.request_count() >= 1 && p.fcm.request_count() >= 1
    })
    .await;
    eventually_subscriptions(&r, "both deliveries recorded", |subs| {
        user_entry(subs, "alice").is_some_and(|u| {
            u["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| !d["last_success"].is_null() && d["pending"] == 0)
        })
    })
    .await;
    outbox_settled(r.addr).await;

    let apns = p.apns.requests();
    assert_eq!(apns.len(), 1, "exactly one APNs push");
    assert_eq!(apns[0].device_token, "a1b2c3d4");
    assert_eq!(apns[0].header("apns-topic"), Some("com.example.mail"));
    let body = apns[0].json();
    assert_eq!(body["aps"]["alert"]["body"], DECODED_SUBJECT, "{body:#}");
    assert_eq!(body["aps"]["alert"]["title"], DECODED_FROM, "{body:#}");
    assert_eq!(body["aps"]["badge"], 3, "{body:#}");

    let fcm = p.fcm.requests();
    assert_eq!(fcm.len(), 1, "exactly one FCM push");
    let message = fcm[0].message();
    assert_eq!(message["token"], "fcm-alice-1");
    assert_eq!(
        message["notification"]["body"], DECODED_SUBJECT,
        "{message:#}"
    );
    assert_eq!(message["data"]["unseen"], "3", "{message:#}");
    assert_eq!(message["data"]["subject"], DECODED_SUBJECT, "{message:#}");

    let m = metrics(&r).await;
    assert!(
        m.contains("dovepush_push_sent_total{transport=\"apns\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("dovepush_push_sent_total{transport=\"fcm\"} 1\n"),
        "{m}"
    );
    assert!(m.contains(
        "dovepush_push_outcomes_total{app=\"mail\",transport=\"apns\",outcome=\"delivered\",reason=\"ok\"} 1\n"
    ), "{m}");
    r.stop().await;
}

async fn dead_tokens_remove_the_device_with_the_provider_reason(backend: Backend) {
    let p = Providers::start(backend).await;
    let r = p
        .receiver(&format!(
            "{}{}",
            p.apns_table("com.example.mail", &p.key_a, "AuthKey_A.p8"),
            p.fcm_table()
        ))
        .await;
    // alice: APNs 410 Unregistered; bob: APNs 400 BadDeviceToken and a live FCM device.
    register_device(&r, "alice", "alice-pw", "mail", "apns", "gone0001", None).await;
    register_device(&r, "bob", "bob-pw", "mail", "apns", "badtoken01", None).await;
    register_device(&r, "bob", "bob-pw", "mail", "fcm", "bob-live-1", None).await;
    // APNs dates a 410 in milliseconds; the mock's `gone…` rule only has seconds, which
    // could predate this registration, so alice's answer is scripted, a millisecond after
    // the registration at the latest.
    p.apns.script([ApnsReply::unregistered(now_ms() + 1)]);
    notify_encoded(&r, "alice", 1, 1).await;
    eventually("alice's push", || p.apns.request_count() >= 1).await;
    notify_encoded(&r, "bob", 1, 1).await;

    eventually_subscriptions(&r, "dead devices removed", |subs| {
        let alice_gone = user_entry(subs, "alice").is_some_and(|u| {
            u["devices"].as_array().unwrap().is_empty() && u["last_error"] == "Unregistered"
        });
        let bob_left = user_entry(subs, "bob").is_some_and(|u| {
            let devices = u["devices"].as_array().unwrap();
            devices.len() == 1 && devices[0]["transport"] == "fcm"
        });
        alice_gone && bob_left
    })
    .await;
    let subs = subscriptions(&r).await;
    assert_eq!(
        user_entry(&subs, "bob").unwrap()["last_error"],
        "BadDeviceToken",
        "{subs:#}"
    );
    // alice's last device went: the METADATA is cleared (through the master user).
    eventually("alice's subscription cleared", || {
        p.mail
            .changes
            .lock()
            .unwrap()
            .contains(&("alice".to_string(), SubscriptionChange::Clear))
    })
    .await;

    let m = metrics(&r).await;
    assert!(
        m.contains("dovepush_push_failed_total{transport=\"apns\",reason=\"delete_device\"} 2\n"),
        "{m}"
    );
    for reason in ["Unregistered", "BadDeviceToken"] {
        assert!(m.contains(&format!(
            "dovepush_push_outcomes_total{{app=\"mail\",transport=\"apns\",outcome=\"delete_device\",reason=\"{reason}\"}} 1\n"
        )), "{m}");
    }
    r.stop().await;
}

async fn a_410_older_than_the_re_registration_keeps_the_device(backend: Backend) {
    let p = Providers::start(backend).await;
    let r = p
        .receiver(&p.apns_table("com.example.mail", &p.key_a, "AuthKey_A.p8"))
        .await;
    register_device(&r, "alice", "alice-pw", "mail", "apns", "a1b2c3d4", None).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let unregistered_at = now_ms();
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The app registers the same token again (an update, not a new device).
    register_device(&r, "alice", "alice-pw", "mail", "apns", "a1b2c3d4", None).await;
    p.apns.script([ApnsReply::unregistered(unregistered_at)]);
    notify_encoded(&r, "alice", 1, 1).await;

    eventually("the push", || p.apns.request_count() >= 1).await;
    eventually_subscriptions(&r, "the item dropped", |subs| {
        user_entry(subs, "alice").is_some_and(|u| u["devices"][0]["pending"] == 0)
    })
    .await;
    let subs = subscriptions(&r).await;
    let alice = user_entry(&subs, "alice").unwrap();
    assert_eq!(alice["devices"].as_array().unwrap().len(), 1, "{subs:#}");
    assert!(alice["last_error"].is_null(), "{subs:#}");
    let m = metrics(&r).await;
    assert!(
        m.contains("outcome=\"drop\",reason=\"Unregistered_before_reregistration\"} 1\n"),
        "{m}"
    );
    r.stop().await;
}

async fn two_apps_in_one_instance_use_their_own_keys(backend: Backend) {
    let p = Providers::start(backend).await;
    let r = p
        .receiver(&format!(
            "privacy = \"full\"\n{}\n[[apps]]\nid = \"other\"\nprivacy = \"generic\"\n\
             generic_text = \"Other app: new mail\"\n{}",
            p.apns_table("com.example.mail", &p.key_a, "AuthKey_A.p8"),
            p.apns_table("org.example.other", &p.key_b, "AuthKey_B.p8"),
        ))
        .await;
    register_device(&r, "alice", "alice-pw", "mail", "apns", "aaaa1111", None).await;
    register_device(&r, "alice", "alice-pw", "other", "apns", "bbbb2222", None).await;
    // "other" has no [apps.fcm]: an FCM device is refused rather than queued forever.
    let auth = basic("alice", "alice-pw");
    let refused = request(
        r.addr,
        "PUT",
        "/v1/devices",
        &[("authorization", auth.as_str())],
        r#"{"app":"other","transport":"fcm","token":"fcm-x"}"#,
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.json()["field"], "transport");
    notify_encoded(&r, "alice", 1, 2).await;

    eventually("two APNs pushes", || p.apns.request_count() >= 2).await;
    outbox_settled(r.addr).await;
    let reqs = p.apns.requests();
    assert_eq!(reqs.len(), 2);
    let mail = reqs.iter().find(|q| q.device_token == "aaaa1111").unwrap();
    let other = reqs.iter().find(|q| q.device_token == "bbbb2222").unwrap();
    assert_eq!(mail.header("apns-topic"), Some("com.example.mail"));
    assert_eq!(other.header("apns-topic"), Some("org.example.other"));
    assert_eq!(mail.json()["aps"]["alert"]["body"], DECODED_SUBJECT);
    assert_eq!(other.json()["aps"]["alert"], "Other app: new mail");
    // Each app signed with its own Apple key.
    assert_eq!(p.apns.distinct_provider_tokens(), 2);
    assert_ne!(mail.header("authorization"), other.header("authorization"));
    let m = metrics(&r).await;
    assert!(
        m.contains("app=\"other\",transport=\"apns\",outcome=\"delivered\""),
        "{m}"
    );
    r.stop().await;
}

async fn privacy_modes_reach_the_providers_as_specified(backend: Backend) {
    let p = Providers::start(backend).await;
    // The app's default is generic; devices may choose full or silent.
    let r = p
        .receiver(&format!(
            "privacy = \"generic\"\ngeneric_text = \"You have mail\"\n{}{}",
            p.apns_table("com.example.mail", &p.key_a, "AuthKey_A.p8"),
            p.fcm_table()
        ))
        .await;
    for (transport, token, privacy) in [
        ("apns", "full0001", Some("full")),
        ("apns", "generic01", None),
        ("apns", "silent01", Some("silent")),
        ("fcm", "fcm-full", Some("full")),
        ("fcm", "fcm-generic", None),
        ("fcm", "fcm-silent", Some("silent")),
    ] {
        register_device(&r, "alice", "alice-pw", "mail", transport, token, privacy).await;
    }
    notify_encoded(&r, "alice", 1, 5).await;
    eventually("six pushes", || {
        p.apns.request_count() >= 3 && p.fcm.requests().len() >= 3
    })
    .await;

    let apns = p.apns.requests();
    let apns_for = |token: &str| apns.iter().find(|q| q.device_token == token).unwrap();
    let full = apns_for("full0001");
    assert_eq!(full.json()["aps"]["alert"]["body"], DECODED_SUBJECT);
    assert_eq!(full.header("apns-push-type"), Some("alert"));
    let generic = apns_for("generic01");
    assert_eq!(generic.json()["aps"]["alert"], "You have mail");
    assert_eq!(generic.json()["aps"]["badge"], 5);
    let silent = apns_for("silent01");
    assert_eq!(silent.json()["aps"]["content-available"], 1);
    assert!(silent.json()["aps"]["alert"].is_null());
    assert_eq!(silent.header("apns-push-type"), Some("background"));
    for q in [generic, silent] {
        let text = String::from_utf8_lossy(&q.body);
        assert!(
            !text.contains("päivää") && !text.contains("Jürgen"),
            "{text}"
        );
    }

    let fcm = p.fcm.requests();
    let fcm_for = |token: &str| {
        fcm.iter()
            .map(|q| q.message().clone())
            .find(|m| m["token"] == token)
            .unwrap()
    };
    let full = fcm_for("fcm-full");
    assert_eq!(full["notification"]["body"], DECODED_SUBJECT);
    let generic = fcm_for("fcm-generic");
    assert_eq!(generic["notification"]["title"], "You have mail");
    let silent = fcm_for("fcm-silent");
    assert!(silent["notification"].is_null(), "{silent:#}");
    for m in [generic, silent] {
        let text = m.to_string();
        assert!(
            !text.contains("päivää") && !text.contains("Jürgen"),
            "{text}"
        );
        assert_eq!(m["data"]["unseen"], "5");
    }
    r.stop().await;
}

/// Badge events through the real APNs and FCM transports: each device gets one silent
/// push with the latest count, whatever its privacy mode, with nothing to display.
async fn badge_updates_reach_both_providers_as_silent_pushes_with_the_count(backend: Backend) {
    let p = Providers::start(backend).await;
    let r = alice_on_apns_and_fcm(&p).await;
    // A burst, as one IMAP session gives it: within the badge wait (3 s here), one push
    // per device.
    let at = now_ms();
    for (id, event, unseen, at) in [
        ("b1", "messageRead", 4, at),
        ("b2", "messageExpunge", 3, at + 1),
        ("b3", "messageAppend", 5, at + 2),
    ] {
        let reply = notify_badge(r.addr, "alice", event, unseen, Some(at), id).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    eventually("one APNs and one FCM badge push", || {
        p.apns.request_count() >= 1 && p.fcm.request_count() >= 1
    })
    .await;
    let m = outbox_settled(r.addr).await;

    let apns = p.apns.requests();
    assert_eq!(apns.len(), 1, "one APNs push for the burst");
    assert_eq!(apns[0].header("apns-push-type"), Some("background"));
    assert_eq!(apns[0].header("apns-priority"), Some("5"));
    let body = apns[0].json();
    assert_eq!(body["aps"]["badge"], 5, "{body:#}");
    assert_eq!(body["aps"]["content-available"], 1, "{body:#}");
    assert!(body["aps"].get("alert").is_none(), "{body:#}");

    let fcm = p.fcm.requests();
    assert_eq!(fcm.len(), 1, "one FCM push for the burst");
    let message = fcm[0].message();
    assert_eq!(message["token"], "fcm-alice-1");
    assert!(message.get("notification").is_none(), "{message:#}");
    assert_eq!(message["data"]["event"], "badge", "{message:#}");
    assert_eq!(message["data"]["unseen"], "5", "{message:#}");
    assert_eq!(message["android"]["collapse_key"], "badge", "{message:#}");

    for line in [
        "dovepush_push_badge_sent_total{transport=\"apns\"} 1\n",
        "dovepush_push_badge_sent_total{transport=\"fcm\"} 1\n",
        "dovepush_ingested_events_total{event=\"messageAppend\"} 1\n",
    ] {
        assert!(m.contains(line), "{line}{m}");
    }
    r.stop().await;
}
