//! OAuth2 access tokens for a Google service account (JWT-bearer grant, RFC 7523): an RS256
//! assertion signed with ring, one form POST to the account's `token_uri` on the shared
//! client, and a single-flight cache that renews five minutes before expiry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// tokio's clock: the real one, except in a test that pauses it.
use tokio::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde::Deserialize;

use crate::http::{self, HttpClient};

/// The scope FCM HTTP v1 needs.
pub(crate) const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Renew this long before the token expires.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// After a rejection, a new token is fetched at most this often.
const FORCED_RENEWAL_COOLDOWN: Duration = Duration::from_secs(60);
/// After a failed fetch, callers get the same error without a new request for this long
/// (so a fan-out during an outage does not queue one token request per message).
const FAILURE_HOLD: Duration = Duration::from_secs(2);

/// The fields of a service-account JSON file that this crate uses.
#[derive(Deserialize)]
pub(crate) struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    pub private_key: String,
    pub private_key_id: Option<String>,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".to_owned()
}

/// One access token.
pub(crate) struct AccessToken {
    /// `Bearer <token>` for the `authorization` header.
    pub header: HeaderValue,
    pub generation: u64,
    renew_at: Instant,
}

/// Why no token could be had.
#[derive(Debug, Clone)]
pub(crate) enum TokenError {
    /// The token endpoint refused the assertion (bad key, disabled account…).
    Rejected(String),
    /// The token endpoint could not be reached or failed; try later.
    Unavailable(String),
}

/// Guarded by the single-flight lock.
#[derive(Default)]
struct RefreshState {
    last_forced: Option<Instant>,
    last_failure: Option<(Instant, TokenError)>,
}

/// Fetches and caches the access token of one service account.
pub(crate) struct AccessTokens {
    client_email: String,
    key_id: Option<String>,
    token_uri: hyper::Uri,
    /// The `aud` claim: `token_uri` exactly as the account file spells it.
    audience: String,
    key: RsaKeyPair,
    rng: SystemRandom,
    client: HttpClient,
    timeout: Duration,
    current: RwLock<Option<Arc<AccessToken>>>,
    refresh: tokio::sync::Mutex<RefreshState>,
    mints: AtomicU64,
}

impl AccessTokens {
    pub(crate) fn new(
        account: &ServiceAccount,
        client: HttpClient,
        timeout: Duration,
    ) -> Result<Self, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(account.private_key.as_bytes())
            .map_err(|e| format!("private_key is not a PKCS#8 PEM key: {e}"))?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("private_key is not a usable RSA key: {e}"))?;
        let token_uri: hyper::Uri = account
            .token_uri
            .parse()
            .map_err(|e| format!("token_uri {:?} is not a URL: {e}", account.token_uri))?;
        if !matches!(token_uri.scheme_str(), Some("https") | Some("http")) {
            return Err(format!("token_uri {:?} must be https", account.token_uri));
        }
        Ok(AccessTokens {
            client_email: account.client_email.clone(),
            key_id: account.private_key_id.clone(),
            token_uri,
            audience: account.token_uri.clone(),
            key,
            rng: SystemRandom::new(),
            client,
            timeout,
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
            mints: AtomicU64::new(0),
        })
    }

    /// A valid token, fetching one (once, however many callers wait) when needed.
    pub(crate) async fn current(&self) -> Result<Arc<AccessToken>, TokenError> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let mut flight = self.refresh.lock().await;
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        if let Some((at, err)) = &flight.last_failure {
            if at.elapsed() < FAILURE_HOLD {
                return Err(err.clone());
            }
        }
        self.fetch_and_store(&mut flight).await
    }

    /// FCM rejected `rejected`: fetch a new token unless someone already did, or one was
    /// forced within the cooldown (then `Ok(None)`).
    pub(crate) async fn renew_after_rejection(
        &self,
        rejected: &AccessToken,
    ) -> Result<Option<Arc<AccessToken>>, TokenError> {
        let mut flight = self.refresh.lock().await;
        if let Some(token) = self.read() {
            if token.generation != rejected.generation {
                return Ok(Some(token));
            }
        }
        if flight
            .last_forced
            .is_some_and(|t| t.elapsed() < FORCED_RENEWAL_COOLDOWN)
        {
            return Ok(None);
        }
        flight.last_forced = Some(Instant::now());
        self.fetch_and_store(&mut flight).await.map(Some)
    }

    /// Tokens fetched so far.
    pub(crate) fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    fn read(&self) -> Option<Arc<AccessToken>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fresh(&self) -> Option<Arc<AccessToken>> {
        self.read().filter(|t| Instant::now() < t.renew_at)
    }

    async fn fetch_and_store(
        &self,
        flight: &mut RefreshState,
    ) -> Result<Arc<AccessToken>, TokenError> {
        match self.fetch().await {
            Ok(token) => {
                let token = Arc::new(token);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
                flight.last_failure = None;
                Ok(token)
            }
            Err(err) => {
                flight.last_failure = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    fn assertion(&self) -> Result<String, TokenError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| TokenError::Unavailable("system clock before 1970".into()))?
            .as_secs();
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = serde_json::Value::String(kid.clone());
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.audience,
            "iat": iat,
            "exp": iat + 3600,
        });
        let mut jwt = URL_SAFE_NO_PAD.encode(header.to_string());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, jwt.as_bytes(), &mut signature)
            .map_err(|_| TokenError::Rejected("RS256 signing failed".into()))?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }

    async fn fetch(&self) -> Result<AccessToken, TokenError> {
        let assertion = self.assertion()?;
        // The assertion is base64url and dots only: nothing to percent-encode.
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.token_uri.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| TokenError::Rejected(format!("token request: {e}")))?;
        let reply = http::exchange(&self.client, req, self.timeout)
            .await
            .map_err(|e| TokenError::Unavailable(format!("token endpoint: {}", e.label())))?;
        let status = reply.status.as_u16();
        if status != 200 {
            let detail = error_text(&reply.body);
            return Err(if (400..500).contains(&status) && status != 429 {
                TokenError::Rejected(format!("token endpoint answered {status}: {detail}"))
            } else {
                TokenError::Unavailable(format!("token endpoint answered {status}: {detail}"))
            });
        }
        #[derive(Deserialize)]
        struct Grant {
            access_token: String,
            expires_in: Option<u64>,
        }
        let grant: Grant = serde_json::from_slice(&reply.body)
            .map_err(|e| TokenError::Unavailable(format!("token endpoint reply: {e}")))?;
        let lifetime = Duration::from_secs(grant.expires_in.unwrap_or(3600));
        let mut header = HeaderValue::from_str(&format!("Bearer {}", grant.access_token))
            .map_err(|_| TokenError::Unavailable("access token is not a header value".into()))?;
        header.set_sensitive(true);
        let generation = self.mints.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(AccessToken {
            header,
            generation,
            renew_at: Instant::now() + lifetime.saturating_sub(RENEW_BEFORE_EXPIRY),
        })
    }
}

/// The OAuth error code of a token-endpoint reply, never the whole body.
fn error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: String,
    }
    serde_json::from_slice::<OAuthError>(body)
        .map(|e| crate::outcome::label(&e.error))
        .unwrap_or_else(|_| "unparsable body".to_owned())
}
