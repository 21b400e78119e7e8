//! Shared fixtures for the integration tests: mock servers, config builders and inputs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::SystemTime;

use dovepush_mocks::{MockApns, MockFcm, ProviderKey, TempDir, TestPki};
use dovepush_push::{
    ApnsConfig, ApnsEnvironment, AppConfig, Device, DeviceKind, FcmConfig, Notification, Privacy,
};

/// A test PKI, a temp dir holding the CA file, and helpers to write key files.
pub struct Env {
    pub pki: TestPki,
    pub dir: TempDir,
    pub ca_file: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let pki = TestPki::new();
        let dir = TempDir::new("push-test").unwrap();
        let ca_file = dir.write("ca.pem", pki.ca_pem());
        Env { pki, dir, ca_file }
    }

    /// `[apps.apns]` with token auth against `mock`.
    pub fn apns_token(&self, mock: &MockApns, key: &ProviderKey, topic: &str) -> ApnsConfig {
        let key_file = self
            .dir
            .write(&format!("AuthKey_{}.p8", key.key_id), &key.p8_pem);
        ApnsConfig {
            topic: topic.to_owned(),
            environment: ApnsEnvironment::Sandbox,
            team_id: Some(key.team_id.clone()),
            key_id: Some(key.key_id.clone()),
            key_file: Some(key_file),
            cert_file: None,
            cert_key_file: None,
            cert_password_file: None,
            endpoint: Some(mock.url()),
            ca_file: Some(self.ca_file.clone()),
            request_timeout_secs: Some(10),
        }
    }

    /// `[apps.apns]` with certificate auth (one PEM file with certificate and key).
    pub fn apns_cert(&self, mock: &MockApns, topic: &str) -> ApnsConfig {
        let cert = self
            .pki
            .issue_client_cert(&format!("Apple Push Services: {topic}"));
        let cert_file = self.dir.write(
            &format!("{topic}.pem"),
            format!("{}{}", cert.cert_pem, cert.key_pem),
        );
        ApnsConfig {
            topic: topic.to_owned(),
            environment: ApnsEnvironment::Production,
            team_id: None,
            key_id: None,
            key_file: None,
            cert_file: Some(cert_file),
            cert_key_file: None,
            cert_password_file: None,
            endpoint: Some(mock.url()),
            ca_file: Some(self.ca_file.clone()),
            request_timeout_secs: Some(10),
        }
    }

    /// `[apps.fcm]` against `mock`.
    pub fn fcm(&self, mock: &MockFcm, name: &str) -> FcmConfig {
        let file = self.dir.write(
            &format!("{name}-firebase.json"),
            mock.service_account_json(),
        );
        FcmConfig {
            service_account_file: file,
            endpoint: Some(mock.url()),
            ca_file: Some(self.ca_file.clone()),
            request_timeout_secs: Some(10),
        }
    }
}

pub fn app(id: &str, privacy: Privacy) -> AppConfig {
    AppConfig {
        id: id.to_owned(),
        privacy,
        generic_text: "New mail".to_owned(),
        ttl_secs: Some(3600),
        apns: None,
        fcm: None,
        webpush: None,
    }
}

pub fn device(app: &str, kind: DeviceKind, token: &str) -> Device {
    Device {
        app_id: app.to_owned(),
        kind,
        token: token.to_owned(),
        privacy: None,
        registered_at: Some(SystemTime::now() - std::time::Duration::from_secs(86_400)),
    }
}

/// A new-mail event with RFC 2047 encoded sender and subject.
pub fn note() -> Notification {
    Notification {
        user: "alice@example.org".to_owned(),
        folder: "INBOX".to_owned(),
        uidvalidity: 1_655_200_000,
        uid: 42,
        from: Some("=?ISO-8859-1?Q?Andr=E9?= Pirard <pirard@example.org>".to_owned()),
        subject: Some("=?UTF-8?B?8J+OiQ==?= Party =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?=".to_owned()),
        snippet: Some("secret snippet".to_owned()),
        unseen: Some(5),
        event_id: Some("ev-0001".to_owned()),
        coalesced: 0,
        badge_only: false,
    }
}

pub const DECODED_FROM: &str = "André Pirard";
pub const DECODED_SUBJECT: &str = "🎉 Party päivää";
