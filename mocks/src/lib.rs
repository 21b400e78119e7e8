//! dovepush-mocks: dev-only mock APNs and FCM servers that speak the real protocols on
//! loopback (HTTP/2 over TLS with a test PKI made by rcgen, real status codes and error
//! bodies), for the push crate's tests, other crates' tests and the demo binary.
//!
//! * [`TestPki`]: CA + server certificate (+ client certificates for APNs certificate auth).
//! * [`MockApns`]: checks provider tokens / client certs, headers and payload size; scripted
//!   answers; records requests; counts connections, in-flight streams and distinct tokens.
//! * [`MockFcm`]: FCM v1 send + OAuth token endpoint verifying the RS256 assertion.
//! * [`TempDir`]: a directory removed on drop, for config files the tests write.

mod apns;
mod fcm;
mod jwt;
mod pki;
mod server;

pub use apns::{
    distinct_device_tokens, ApnsReply, ApnsRequest, MockApns, ProviderKey, APNS_MAX_PAYLOAD,
};
pub use fcm::{FcmReply, FcmRequest, MockFcm, TEST_CLIENT_EMAIL, TEST_ONLY_SERVICE_ACCOUNT_KEY};
pub use pki::{ClientCert, TestPki};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system temp dir, removed (with its content) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "dovepush-{label}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `content` to `name` inside the directory and returns the full path.
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
