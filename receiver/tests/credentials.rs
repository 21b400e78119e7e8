//! Credential expiry and rejection, with the real push transports and the mock APNs: an
//! APNs client certificate that expires in 5 days (made by the test) shows in
//! `GET /v1/status/credentials` and in `dovepush_credential_expiry_timestamp_seconds`, and
//! the log warns at start; a mock APNs answering 403 `ExpiredProviderToken` sets
//! `dovepush_credential_rejected` and the status's `rejected`, until a push succeeds.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use dovepush_mocks::{MockApns, ProviderKey, TestPki};
use dovepush_receiver::config::Config;
use dovepush_receiver::transport::push::transports_from_config;
use serde_json::Value;

/// Log lines written by the receiver while the test runs (on this thread's runtime).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn metric(text: &str, name_and_labels: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
}

// One thread: the capturing subscriber below sees every task of the receiver.
#[tokio::test(flavor = "current_thread")]
async fn expiring_and_rejected_credentials_show_in_status_metrics_and_log() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    pki.write_ca(&dir.path().join("ca.pem")).unwrap();
    let key = ProviderKey::generate("TEAMAAAAAA", "KEYAAAAAAA");
    let apns = MockApns::start(&pki, std::slice::from_ref(&key))
        .await
        .unwrap();
    std::fs::write(dir.path().join("AuthKey.p8"), &key.p8_pem).unwrap();
    let cert = pki.issue_client_cert_expiring(
        "Apple Push Services: com.example.cert",
        Duration::from_secs(5 * 86_400),
    );
    std::fs::write(
        dir.path().join("apns-cert.pem"),
        format!("{}{}", cert.cert_pem, cert.key_pem),
    )
    .unwrap();
    let apps = format!(
        "[apps.apns]\ntopic = \"com.example.mail\"\nteam_id = \"{team}\"\nkey_id = \"{kid}\"\n\
         key_file = \"AuthKey.p8\"\nendpoint = \"{url}\"\nca_file = \"ca.pem\"\n\
         [[apps]]\nid = \"certapp\"\n[apps.apns]\ntopic = \"com.example.cert\"\n\
         cert_file = \"apns-cert.pem\"\nendpoint = \"{url}\"\nca_file = \"ca.pem\"\n",
        team = key.team_id,
        kid = key.key_id,
        url = apns.url(),
    );
    let path = dir.path().join("receiver.toml");
    let text = config_text(dir.path(), &apps).replace(
        "[outbox]",
        "[dovecot]\nimap = \"127.0.0.1:143\"\nca_file = \"ca.pem\"\n[outbox]",
    );
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let transports = transports_from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let mail = FakeMail::with_users(&[("alice", "alice-pw")]);
    let r = Running::start(config, transports, mail).await;

    // The certificate's expiry: in the status, the metric and the log.
    let status = admin_get(r.addr, "/v1/status/credentials").await;
    assert_eq!(status.status, 200, "{}", status.text());
    let status = status.json();
    let entries = status["credentials"].as_array().unwrap();
    let find = |app: Option<&str>, kind: &str| -> Value {
        entries
            .iter()
            .find(|e| e["app"].as_str() == app && e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {app:?} {kind} in {status}"))
            .clone()
    };
    let expiring = find(Some("certapp"), "apns_certificate");
    let days = expiring["expires_in_days"].as_f64().unwrap();
    assert!((4.9..=5.0).contains(&days), "{expiring}");
    assert!(expiring["rejected"].is_null());
    assert!(find(Some("mail"), "apns_token")["expires"].is_null());
    assert!(find(None, "imap_ca")["expires_in_days"].as_f64().unwrap() > 365.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let metrics = admin_get(r.addr, "/metrics").await.text();
    let expiry = metric(
        &metrics,
        "dovepush_credential_expiry_timestamp_seconds{app=\"certapp\",kind=\"apns_certificate\"}",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!((now + 5 * 86_400 - 120..=now + 5 * 86_400).contains(&expiry));
    let log = logs.text();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("expires within 7 days")
            && l.contains("certapp")),
        "{log}"
    );

    // APNs rejects the provider token: the credential is flagged until a push succeeds.
    let rejected = "dovepush_credential_rejected{app=\"mail\",kind=\"apns_token\"}";
    assert_eq!(metric(&metrics, rejected), Some(0), "{metrics}");
    apns.reject_all_tokens(Some("ExpiredProviderToken"));
    assert_eq!(
        register(r.addr, "alice", "alice-pw", "devtoken1")
            .await
            .status,
        201
    );
    assert_eq!(notify(r.addr, "alice", 1, 1, Some("e1")).await.status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = admin_get(r.addr, "/metrics").await.text();
        if metric(&metrics, rejected) == Some(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = admin_get(r.addr, "/v1/status/credentials").await.json();
    let token = status["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["app"] == "mail")
        .unwrap()
        .clone();
    assert_eq!(
        token["rejected"]["reason"], "ExpiredProviderToken",
        "{token}"
    );

    // Apple takes the token again: the retry is delivered and the flag drops.
    apns.reject_all_tokens(None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = admin_get(r.addr, "/metrics").await.text();
        if metric(&metrics, rejected) == Some(0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!apns.requests().is_empty());
    r.stop().await;
}
