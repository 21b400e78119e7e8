//! VAPID (RFC 8292): the application server's P-256 key, its public half as browsers need
//! it (`applicationServerKey`), and the `Authorization: vapid t=<JWT>, k=<key>` header:
//! an ES256 JWT with `aud` = the push service's origin, `exp` 12 hours ahead (RFC 8292
//! allows 24) and `sub` = the operator's contact. Signed with the shared ring signer; one
//! token per origin is reused for [`TOKEN_REUSE`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::header::HeaderValue;
use tokio::time::Instant;

use crate::config::{read_file, AppConfig, ConfigError, WebPushConfig};
use crate::jwt::Es256Signer;

/// How far ahead a token's `exp` lies.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long a token is reused for one origin (well inside its lifetime).
pub(crate) const TOKEN_REUSE: Duration = Duration::from_secs(3600);
/// Origins whose tokens are kept at once; beyond, the cache starts over.
const MAX_CACHED_ORIGINS: usize = 1024;

/// One app's VAPID key and contact, with the tokens minted so far.
pub struct VapidKey {
    signer: Es256Signer,
    public_key: String,
    subject: String,
    tokens: Mutex<HashMap<String, (HeaderValue, Instant)>>,
    mints: AtomicU64,
}

impl VapidKey {
    /// Reads `[apps.webpush]`: the key file (PKCS#8 or SEC1 PEM, or the raw private key in
    /// base64url) and the subject (`mailto:` or `https:`).
    pub fn from_config(
        app: &AppConfig,
        cfg: &WebPushConfig,
        base_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let id = app.id.as_str();
        let subject = cfg.subject.trim();
        let valid_subject = (subject.starts_with("mailto:") && subject.len() > "mailto:".len())
            || (subject.starts_with("https://") && subject.len() > "https://".len());
        if !valid_subject || subject.chars().any(|c| c.is_control() || c == '"') {
            return Err(ConfigError::invalid(
                id,
                "apps.webpush.subject",
                "the operator's contact for push services: \"mailto:…\" or \"https://…\"",
            ));
        }
        let key = "apps.webpush.vapid_private_key_file";
        let (full, content) = read_file(id, key, base_dir, &cfg.vapid_private_key_file)?;
        let signer = Es256Signer::from_pem_or_raw(&content)
            .map_err(|m| ConfigError::file(id, key, &full, m))?;
        Ok(VapidKey {
            public_key: URL_SAFE_NO_PAD.encode(signer.public_key()),
            signer,
            subject: subject.to_owned(),
            tokens: Mutex::default(),
            mints: AtomicU64::new(0),
        })
    }

    /// The public key as browsers take it for `applicationServerKey`: the uncompressed
    /// point in unpadded base64url.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Tokens minted so far.
    pub(crate) fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The `Authorization` header for a push service at `origin`.
    pub(crate) fn authorization(&self, origin: &str) -> Result<HeaderValue, String> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((header, minted)) = tokens.get(origin) {
            if now.duration_since(*minted) < TOKEN_REUSE {
                return Ok(header.clone());
            }
        }
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "system clock before 1970".to_owned())?
            .as_secs();
        let jwt = self.mint(origin, unix_now)?;
        let mut header = HeaderValue::from_str(&format!("vapid t={jwt}, k={}", self.public_key))
            .map_err(|_| "VAPID token is not a header value".to_owned())?;
        header.set_sensitive(true);
        if tokens.len() >= MAX_CACHED_ORIGINS {
            tokens.clear();
        }
        tokens.insert(origin.to_owned(), (header.clone(), now));
        Ok(header)
    }

    /// A signed JWT for `audience` at `unix_now`.
    fn mint(&self, audience: &str, unix_now: u64) -> Result<String, String> {
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256"});
        let claims = serde_json::json!({
            "aud": audience,
            "exp": unix_now + TOKEN_LIFETIME.as_secs(),
            "sub": self.subject,
        });
        let jwt = self.signer.sign(&header, &claims)?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        Ok(jwt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::{pem, pkcs8_der, verify};

    fn key(dir: &Path, subject: &str) -> Result<VapidKey, ConfigError> {
        std::fs::write(dir.join("vapid.pem"), pem("PRIVATE KEY", &pkcs8_der())).unwrap();
        let app: AppConfig = serde_json::from_str(r#"{"id":"mail"}"#).unwrap();
        let cfg = WebPushConfig {
            vapid_private_key_file: "vapid.pem".into(),
            subject: subject.to_owned(),
        };
        VapidKey::from_config(&app, &cfg, dir)
    }

    #[test]
    fn claims_are_audience_expiry_and_subject() {
        let dir = tempfile::tempdir().unwrap();
        let vapid = key(dir.path(), "mailto:ops@example.org").unwrap();
        let public = URL_SAFE_NO_PAD.decode(vapid.public_key()).unwrap();
        assert_eq!(public.len(), 65);
        assert_eq!(public[0], 4);
        let jwt = vapid
            .mint("https://push.example:8443", 1_800_000_000)
            .unwrap();
        let (head, claims) = verify(&jwt, &public);
        assert_eq!(head, serde_json::json!({"typ": "JWT", "alg": "ES256"}));
        assert_eq!(claims["aud"], "https://push.example:8443");
        assert_eq!(claims["exp"], 1_800_000_000u64 + 12 * 3600);
        assert_eq!(claims["sub"], "mailto:ops@example.org");
    }

    #[tokio::test(start_paused = true)]
    async fn header_is_reused_per_origin_then_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let vapid = key(dir.path(), "https://example.org/contact").unwrap();
        let a = vapid.authorization("https://a.example").unwrap();
        assert!(a.is_sensitive());
        let text = a.to_str().unwrap();
        let (t, k) = text
            .strip_prefix("vapid t=")
            .unwrap()
            .split_once(", k=")
            .unwrap();
        assert_eq!(k, vapid.public_key());
        let (_, claims) = verify(t, &URL_SAFE_NO_PAD.decode(k).unwrap());
        assert_eq!(claims["aud"], "https://a.example");
        assert_eq!(vapid.authorization("https://a.example").unwrap(), a);
        assert_eq!(vapid.mints(), 1);
        vapid.authorization("https://b.example").unwrap();
        assert_eq!(vapid.mints(), 2);
        tokio::time::advance(TOKEN_REUSE).await;
        vapid.authorization("https://a.example").unwrap();
        assert_eq!(vapid.mints(), 3);
    }

    #[test]
    fn bad_subject_or_key_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for subject in ["ops@example.org", "mailto:", "http://example.org", ""] {
            let err = key(dir.path(), subject).err().unwrap();
            assert_eq!(err.key(), "apps.webpush.subject", "{subject}");
        }
        std::fs::write(dir.path().join("bad.pem"), "garbage").unwrap();
        let app: AppConfig = serde_json::from_str(r#"{"id":"mail"}"#).unwrap();
        let cfg = WebPushConfig {
            vapid_private_key_file: "bad.pem".into(),
            subject: "mailto:a@b".into(),
        };
        let err = VapidKey::from_config(&app, &cfg, dir.path()).err().unwrap();
        assert_eq!(err.key(), "apps.webpush.vapid_private_key_file");
        assert!(err.to_string().contains("bad.pem"), "{err}");
    }
}
