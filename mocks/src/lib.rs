//! dovepush-mocks: dev-only mock APNs, FCM and Web Push servers that speak the real
//! protocols on loopback (HTTP/2 over TLS with a test PKI made by rcgen, real status codes
//! and error bodies), for the push crate's tests, other crates' tests and the demo binary.
//!
//! * [`TestPki`]: CA + server certificate (+ client certificates for APNs certificate auth).
//! * [`MockApns`]: checks provider tokens / client certs, headers and payload size; scripted
//!   answers; records requests; counts connections, in-flight streams and distinct tokens.
//! * [`MockFcm`]: FCM v1 send + OAuth token endpoint verifying the RS256 assertion.
//! * [`MockWebPush`]: a Web Push service handing out browser-like subscriptions; verifies
//!   VAPID, decrypts each message (RFC 8291) as the browser would, scripted answers.
//! * [`TempDir`]: a directory removed on drop, for config files the tests write.

#![forbid(unsafe_code)]

mod apns;
mod fcm;
mod jwt;
mod pki;
mod server;
mod webpush;

pub use apns::{
    distinct_device_tokens, ApnsReply, ApnsRequest, MockApns, ProviderKey, APNS_MAX_PAYLOAD,
};
pub use fcm::{FcmReply, FcmRequest, MockFcm, TEST_CLIENT_EMAIL, TEST_ONLY_SERVICE_ACCOUNT_KEY};
pub use pki::{ClientCert, TestPki};
pub use webpush::{
    MockWebPush, Subscription as WebPushSubscription, VapidKeyPair, WebPushReply, WebPushRequest,
    WEBPUSH_MAX_BODY,
};

use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed (with its content) on drop: a
/// `tempfile::TempDir` with a label in its name and a helper to write files into it.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(label: &str) -> std::io::Result<Self> {
        tempfile::Builder::new()
            .prefix(&format!("dovepush-{label}-"))
            .tempdir()
            .map(TempDir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `content` to `name` inside the directory and returns the full path.
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, content).expect("write test file");
        path
    }
}
