//! Several apps in one instance, routing by app id and device kind, and config errors.

mod common;

use common::*;
use dovepush_mocks::{MockApns, MockFcm, ProviderKey};
use dovepush_push::{AppConfig, DeviceKind, Privacy, Pusher, Transport};
use std::sync::Arc;

#[tokio::test]
async fn two_apps_each_with_their_own_keys() {
    let env = Env::new();
    let key_a = ProviderKey::generate("TEAMAAAAAA", "KEYAAAAAAA");
    let key_b = ProviderKey::generate("TEAMBBBBBB", "KEYBBBBBBB");
    let apns = MockApns::start(&env.pki, &[key_a.clone(), key_b.clone()])
        .await
        .unwrap();
    let fcm = MockFcm::start(Some(&env.pki), "mock-project")
        .await
        .unwrap();

    let mut mail = app("com.example.mail", Privacy::Full);
    mail.apns = Some(env.apns_token(&apns, &key_a, "com.example.mail"));
    mail.fcm = Some(env.fcm(&fcm, "mail"));
    let mut other = app("org.example.other", Privacy::Generic);
    other.generic_text = "You have mail".into();
    other.apns = Some(env.apns_token(&apns, &key_b, "org.example.other"));

    let pusher = Arc::new(Pusher::from_config(&[mail, other], env.dir.path()).unwrap());
    let transport: Arc<dyn Transport> = pusher.clone();
    assert!(pusher.supports("com.example.mail", DeviceKind::Fcm));
    assert!(!pusher.supports("org.example.other", DeviceKind::Fcm));
    assert!(!pusher.supports("nope", DeviceKind::Apns));

    let n = note();
    for (app, kind, token) in [
        ("com.example.mail", DeviceKind::Apns, "aaaa"),
        ("org.example.other", DeviceKind::Apns, "bbbb"),
        ("com.example.mail", DeviceKind::Fcm, "fcm-token-1"),
    ] {
        let outcome = transport.send(&device(app, kind, token), &n).await;
        assert_eq!(outcome.class(), "delivered", "{app} {kind}: {outcome:?}");
    }
    let unknown = pusher
        .send(&device("nope", DeviceKind::Apns, "x"), &n)
        .await;
    assert_eq!((unknown.class(), unknown.reason()), ("drop", "unknown_app"));
    let no_fcm = pusher
        .send(&device("org.example.other", DeviceKind::Fcm, "x"), &n)
        .await;
    assert_eq!(no_fcm.reason(), "unsupported_device_kind");

    let reqs = apns.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("apns-topic"), Some("com.example.mail"));
    assert_eq!(reqs[1].header("apns-topic"), Some("org.example.other"));
    assert_eq!(reqs[1].json()["aps"]["alert"], "You have mail");
    // Each app authenticated with its own key, on its own connection.
    assert_eq!(apns.distinct_provider_tokens(), 2);
    assert_ne!(reqs[0].connection, reqs[1].connection);
    assert_ne!(
        reqs[0].header("authorization"),
        reqs[1].header("authorization")
    );
    assert_eq!(fcm.requests().len(), 1);
}

#[test]
fn documented_config_parses() {
    #[derive(serde::Deserialize)]
    struct File {
        apps: Vec<AppConfig>,
    }
    let text = r#"
[[apps]]
id = "com.example.mail"
privacy = "full"
generic_text = "New mail"
[apps.apns]
topic = "com.example.mail"
environment = "production"
team_id = "ABCDE12345"
key_id = "KEY1234567"
key_file = "AuthKey.p8"
endpoint = "https://127.0.0.1:9443"
ca_file = "ca.pem"
[apps.fcm]
service_account_file = "firebase.json"
endpoint = "https://127.0.0.1:9444"
ca_file = "ca.pem"

[[apps]]
id = "org.example.other"
privacy = "silent"
[apps.apns]
topic = "org.example.other"
environment = "sandbox"
cert_file = "push.pem"
"#;
    let file: File = toml::from_str(text).unwrap();
    assert_eq!(file.apps.len(), 2);
    assert_eq!(file.apps[0].privacy, Privacy::Full);
    assert_eq!(file.apps[1].privacy, Privacy::Silent);
    assert!(file.apps[1].apns.as_ref().unwrap().cert_file.is_some());

    let typo = "[[apps]]\nid = \"x\"\nprivcy = \"full\"\n";
    assert!(toml::from_str::<File>(typo).is_err());
}

#[tokio::test]
async fn config_errors_name_the_key_and_the_file() {
    let env = Env::new();
    let apns = MockApns::start(&env.pki, &[]).await.unwrap();

    // .p12 is refused with the openssl conversion hint.
    let mut cfg = env.apns_cert(&apns, "com.example.mail");
    cfg.cert_file = Some(env.dir.write("push.p12", b"\x30\x82"));
    let mut a = app("mail", Privacy::Full);
    a.apns = Some(cfg);
    let err = Pusher::from_config(&[a], env.dir.path()).err().unwrap();
    assert_eq!(err.key(), "apps.apns.cert_file");
    let text = err.to_string();
    assert!(
        text.contains("push.p12") && text.contains("openssl pkcs12"),
        "{text}"
    );

    // A missing .p8 names the key and the resolved path.
    let key = ProviderKey::generate("T", "K");
    let mut cfg = env.apns_token(&apns, &key, "com.example.mail");
    cfg.key_file = Some("missing.p8".into());
    let mut a = app("mail", Privacy::Full);
    a.apns = Some(cfg);
    let err = Pusher::from_config(&[a], env.dir.path()).err().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("apps.apns.key_file") && text.contains("missing.p8"),
        "{text}"
    );

    // A .p8 that is not an EC key.
    let mut cfg = env.apns_token(&apns, &key, "com.example.mail");
    cfg.key_file = Some(env.dir.write(
        "bad.p8",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ));
    let mut a = app("mail", Privacy::Full);
    a.apns = Some(cfg);
    assert_eq!(
        Pusher::from_config(&[a], env.dir.path())
            .err()
            .unwrap()
            .key(),
        "apps.apns.key_file"
    );

    // Duplicate ids and apps without transports.
    let a = app("dup", Privacy::Full);
    let err = Pusher::from_config(std::slice::from_ref(&a), env.dir.path())
        .err()
        .unwrap();
    assert!(err.to_string().contains("none of"), "{err}");
    let mut with = a.clone();
    with.apns = Some(env.apns_token(&apns, &key, "t"));
    let err = Pusher::from_config(&[with.clone(), with], env.dir.path())
        .err()
        .unwrap();
    assert!(err.to_string().contains("twice"), "{err}");

    // A service-account file that is not one.
    let mut a = app("f", Privacy::Full);
    a.fcm = Some(dovepush_push::FcmConfig {
        service_account_file: env.dir.write("sa.json", "{}"),
        endpoint: None,
        ca_file: None,
        request_timeout_secs: None,
    });
    let err = Pusher::from_config(&[a], env.dir.path()).err().unwrap();
    assert_eq!(err.key(), "apps.fcm.service_account_file");
}
