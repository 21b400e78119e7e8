//! APNs provider API client: `POST /3/device/<token>` over one multiplexed HTTP/2 connection
//! per endpoint and credential, token (ES256) or certificate auth, and the mapping of APNs
//! replies to [`Outcome`]s.

mod payload;
mod token;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::config::{read_file, resolve, ApnsConfig, AppConfig, ConfigError};
use crate::config::{DEFAULT_REQUEST_TIMEOUT_SECS, DEFAULT_TTL_SECS};
use crate::http::{self, ClientIdentity, HttpClient, Protocols};
use crate::model::{Device, Notification, Privacy};
use crate::outcome::Outcome;

use token::{ProviderToken, ProviderTokens};

/// One HTTP/2 client plus the credentials it authenticates with. Apps that share an endpoint,
/// trust roots and Apple key share one of these (APNs binds a connection to one key).
struct ApnsConnection {
    client: HttpClient,
    /// `None` for certificate auth (the certificate is in the TLS config).
    tokens: Option<ProviderTokens>,
}

/// Connections built so far while reading the config, keyed by endpoint + roots + credential.
#[derive(Default)]
pub(crate) struct ApnsConnections {
    by_key: HashMap<String, Arc<ApnsConnection>>,
}

/// Sends to the APNs devices of one app.
pub(crate) struct ApnsSender {
    app_id: String,
    topic: HeaderValue,
    base: String,
    conn: Arc<ApnsConnection>,
    generic_text: String,
    ttl: Duration,
    timeout: Duration,
}

impl ApnsSender {
    pub(crate) fn from_config(
        app: &AppConfig,
        cfg: &ApnsConfig,
        base_dir: &Path,
        connections: &mut ApnsConnections,
    ) -> Result<Self, ConfigError> {
        let id = app.id.as_str();
        let topic = HeaderValue::from_str(cfg.topic.trim())
            .ok()
            .filter(|_| !cfg.topic.trim().is_empty())
            .ok_or_else(|| ConfigError::invalid(id, "apps.apns.topic", "must be a bundle id"))?;
        let base = match &cfg.endpoint {
            Some(url) => crate::config::parse_endpoint(id, "apps.apns.endpoint", url)?,
            None => cfg.environment.default_endpoint().to_owned(),
        };
        let extra_roots = match &cfg.ca_file {
            Some(path) => {
                let full = resolve(base_dir, path);
                http::read_ca_file(&full)
                    .map_err(|m| ConfigError::file(id, "apps.apns.ca_file", &full, m))?
            }
            None => Vec::new(),
        };
        let ca_key = cfg
            .ca_file
            .as_ref()
            .map(|p| resolve(base_dir, p).display().to_string())
            .unwrap_or_default();

        let token_auth = cfg.team_id.is_some() || cfg.key_id.is_some() || cfg.key_file.is_some();
        let cert_auth = cfg.cert_file.is_some();
        let conn =
            match (token_auth, cert_auth) {
                (true, true) => {
                    return Err(ConfigError::invalid(
                        id,
                        "apps.apns.cert_file",
                        "set either token auth (team_id, key_id, key_file) or cert_file, not both",
                    ))
                }
                (false, false) => return Err(ConfigError::invalid(
                    id,
                    "apps.apns.key_file",
                    "no credentials: set team_id, key_id and key_file (token auth) or cert_file",
                )),
                (true, false) => {
                    let team_id = required(id, "apps.apns.team_id", cfg.team_id.as_deref())?;
                    let key_id = required(id, "apps.apns.key_id", cfg.key_id.as_deref())?;
                    let key_path = cfg.key_file.as_deref().ok_or_else(|| {
                        ConfigError::invalid(id, "apps.apns.key_file", "missing (the .p8 key file)")
                    })?;
                    let (full, pem) = read_file(id, "apps.apns.key_file", base_dir, key_path)?;
                    let cache_key = format!("token|{base}|{ca_key}|{team_id}|{key_id}");
                    if let Some(conn) = connections.by_key.get(&cache_key) {
                        conn.clone()
                    } else {
                        let tokens = ProviderTokens::new(&pem, key_id, team_id)
                            .map_err(|m| ConfigError::file(id, "apps.apns.key_file", &full, m))?;
                        let tls = http::tls_config(&extra_roots, None)
                            .map_err(|m| ConfigError::invalid(id, "apps.apns.ca_file", m))?;
                        let conn = Arc::new(ApnsConnection {
                            client: http::client(tls, Protocols::Http2Only),
                            tokens: Some(tokens),
                        });
                        connections.by_key.insert(cache_key, conn.clone());
                        conn
                    }
                }
                (false, true) => {
                    let identity = read_identity(id, cfg, base_dir)?;
                    let tls = http::tls_config(&extra_roots, Some(identity))
                        .map_err(|m| ConfigError::invalid(id, "apps.apns.cert_file", m))?;
                    // Certificates are per topic: never shared.
                    Arc::new(ApnsConnection {
                        client: http::client(tls, Protocols::Http2Only),
                        tokens: None,
                    })
                }
            };
        Ok(ApnsSender {
            app_id: app.id.clone(),
            topic,
            base,
            conn,
            generic_text: app.generic_text.clone(),
            ttl: Duration::from_secs(app.ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
            timeout: Duration::from_secs(
                cfg.request_timeout_secs
                    .unwrap_or(DEFAULT_REQUEST_TIMEOUT_SECS),
            ),
        })
    }

    /// Sends one push; on a rejected provider token, renews it once and tries again.
    pub(crate) async fn send(
        &self,
        device: &Device,
        n: &Notification,
        privacy: Privacy,
    ) -> Outcome {
        if device.token.is_empty()
            || !device
                .token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Outcome::delete("BadDeviceToken", None);
        }
        let body = match payload::build(n, privacy, &self.generic_text) {
            Ok(body) => Bytes::from(body),
            Err(payload::TooLarge) => {
                tracing::warn!(app = %self.app_id, "APNs payload too large even after cutting texts; dropped");
                return Outcome::drop("payload_too_large");
            }
        };
        let mut token = match self.provider_token() {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let mut renewed = false;
        loop {
            let req = self.request(device, n, privacy, token.as_deref(), body.clone());
            let reply = match http::exchange(&self.conn.client, req, self.timeout).await {
                Ok(reply) => reply,
                Err(err) => {
                    tracing::debug!(app = %self.app_id, error = %err, "APNs exchange failed");
                    return Outcome::retry(err.label(), None);
                }
            };
            let outcome = classify(reply.status, &reply.headers, &reply.body, device);
            if let (Outcome::CredentialsRejected { reason }, Some(tokens), Some(rejected), false) =
                (&outcome, &self.conn.tokens, &token, renewed)
            {
                if renewable(reason) {
                    renewed = true;
                    match tokens.renew_after_rejection(rejected) {
                        Ok(Some(fresh)) => {
                            tracing::info!(app = %self.app_id, reason = %reason, "APNs rejected the provider token; renewed it");
                            token = Some(fresh);
                            continue;
                        }
                        Ok(None) => {}
                        Err(err) => {
                            tracing::error!(app = %self.app_id, error = %err, "minting APNs provider token failed")
                        }
                    }
                }
            }
            http::log_outcome("APNs", &self.app_id, device, &outcome);
            return outcome;
        }
    }

    fn provider_token(&self) -> Result<Option<Arc<ProviderToken>>, Outcome> {
        match &self.conn.tokens {
            None => Ok(None),
            Some(tokens) => tokens.current().map(Some).map_err(|err| {
                tracing::error!(app = %self.app_id, error = %err, "minting APNs provider token failed");
                Outcome::credentials("provider_token_signing")
            }),
        }
    }

    fn request(
        &self,
        device: &Device,
        n: &Notification,
        privacy: Privacy,
        token: Option<&ProviderToken>,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let expiration = SystemTime::now()
            .checked_add(self.ttl)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let (push_type, priority) = match privacy {
            Privacy::Silent => ("background", "5"),
            Privacy::Full | Privacy::Generic => ("alert", "10"),
        };
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/3/device/{}", self.base, device.token))
            .header("apns-topic", self.topic.clone())
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-expiration", expiration)
            .header(CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, token.header.clone());
        }
        if let Some(collapse) = collapse_id(n, privacy) {
            builder = builder.header("apns-collapse-id", collapse);
        }
        // Every part was checked (token charset, topic header value, numeric headers).
        builder
            .body(Full::new(body))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }

    /// Provider tokens minted so far by this app's key (0 for certificate auth).
    pub(crate) fn token_mints(&self) -> u64 {
        self.conn.tokens.as_ref().map_or(0, |t| t.mints())
    }
}

fn required<'a>(
    app: &str,
    key: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, ConfigError> {
    match value.map(str::trim) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ConfigError::invalid(
            app,
            key,
            "missing (needed for token auth)",
        )),
    }
}

fn read_identity(
    app: &str,
    cfg: &ApnsConfig,
    base_dir: &Path,
) -> Result<ClientIdentity, ConfigError> {
    let cert_path = cfg.cert_file.as_deref().unwrap_or(Path::new(""));
    let full = resolve(base_dir, cert_path);
    let is_p12 = full
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("p12") || e.eq_ignore_ascii_case("pfx"));
    if is_p12 {
        return Err(ConfigError::file(
            app,
            "apps.apns.cert_file",
            &full,
            "PKCS#12 (.p12) is not supported; convert it to PEM with \
             `openssl pkcs12 -in push.p12 -out push.pem -nodes` and set cert_file to the .pem",
        ));
    }
    if cfg.cert_password_file.is_some() {
        return Err(ConfigError::invalid(
            app,
            "apps.apns.cert_password_file",
            "only used for .p12 files, which are not supported; give an unencrypted PEM key \
             (`openssl pkcs12 -in push.p12 -out push.pem -nodes`)",
        ));
    }
    let (full, pem) = read_file(app, "apps.apns.cert_file", base_dir, cert_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ConfigError::file(app, "apps.apns.cert_file", &full, format!("bad PEM: {e}"))
        })?;
    if chain.is_empty() {
        return Err(ConfigError::file(
            app,
            "apps.apns.cert_file",
            &full,
            "no certificate (BEGIN CERTIFICATE) in file",
        ));
    }
    let key = match &cfg.cert_key_file {
        Some(key_path) => {
            let (key_full, key_pem) =
                read_file(app, "apps.apns.cert_key_file", base_dir, key_path)?;
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                ConfigError::file(
                    app,
                    "apps.apns.cert_key_file",
                    &key_full,
                    format!("no usable private key: {e}"),
                )
            })?
        }
        None => PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            ConfigError::file(
                app,
                "apps.apns.cert_file",
                &full,
                format!("no unencrypted private key in the file (or set cert_key_file): {e}"),
            )
        })?,
    };
    Ok(ClientIdentity { chain, key })
}

/// Only a token problem that a new token can fix is worth one renewal.
fn renewable(reason: &str) -> bool {
    matches!(
        reason,
        "ExpiredProviderToken" | "InvalidProviderToken" | "MissingProviderToken"
    )
}

/// Full mode collapses retries of the same event; generic mode keeps one "new mail" alert.
fn collapse_id(n: &Notification, privacy: Privacy) -> Option<HeaderValue> {
    match privacy {
        Privacy::Full => n
            .event_id
            .as_deref()
            .filter(|id| id.len() <= 64)
            .and_then(|id| HeaderValue::from_str(id).ok()),
        Privacy::Generic => Some(HeaderValue::from_static("new-mail")),
        Privacy::Silent => None,
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: Option<String>,
    /// Milliseconds since the epoch (410 only).
    timestamp: Option<u64>,
}

/// Maps one APNs reply to an outcome.
pub(crate) fn classify(
    status: StatusCode,
    headers: &hyper::HeaderMap,
    body: &[u8],
    device: &Device,
) -> Outcome {
    if status == StatusCode::OK {
        let id = headers
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Outcome::Delivered { id };
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let reason = parsed
        .as_ref()
        .and_then(|b| b.reason.clone())
        .unwrap_or_else(|| format!("http_{}", status.as_u16()));
    match status.as_u16() {
        410 => {
            let at = parsed
                .and_then(|b| b.timestamp)
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            match (at, device.registered_at) {
                (Some(at), Some(registered)) if registered > at => {
                    Outcome::drop("Unregistered_before_reregistration")
                }
                _ => Outcome::delete(&reason, at),
            }
        }
        400 if reason == "BadDeviceToken" || reason == "DeviceTokenNotForTopic" => {
            Outcome::delete(&reason, None)
        }
        403 => Outcome::credentials(&reason),
        429 => Outcome::retry(&reason, http::retry_after(headers)),
        s if s >= 500 => Outcome::retry(&reason, http::retry_after(headers)),
        _ => Outcome::drop(&reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(registered_at: Option<SystemTime>) -> Device {
        Device {
            app_id: "a".into(),
            kind: crate::DeviceKind::Apns,
            token: "abcd".into(),
            privacy: None,
            registered_at,
        }
    }

    fn classify_json(status: u16, body: &str) -> Outcome {
        classify(
            StatusCode::from_u16(status).unwrap(),
            &hyper::HeaderMap::new(),
            body.as_bytes(),
            &device(None),
        )
    }

    #[test]
    fn classification_table() {
        assert_eq!(
            classify_json(400, r#"{"reason":"BadDeviceToken"}"#).class(),
            "delete_device"
        );
        assert_eq!(
            classify_json(400, r#"{"reason":"DeviceTokenNotForTopic"}"#).class(),
            "delete_device"
        );
        assert_eq!(
            classify_json(400, r#"{"reason":"BadPriority"}"#).class(),
            "drop"
        );
        assert_eq!(
            classify_json(403, r#"{"reason":"ExpiredProviderToken"}"#).class(),
            "credentials_rejected"
        );
        assert_eq!(
            classify_json(413, r#"{"reason":"PayloadTooLarge"}"#).class(),
            "drop"
        );
        assert_eq!(
            classify_json(429, r#"{"reason":"TooManyRequests"}"#).class(),
            "retry"
        );
        assert_eq!(
            classify_json(500, r#"{"reason":"InternalServerError"}"#).class(),
            "retry"
        );
        assert_eq!(
            classify_json(502, "<html>bad gateway</html>").reason(),
            "http_502"
        );
        assert_eq!(
            classify_json(410, r#"{"reason":"ExpiredToken"}"#).class(),
            "delete_device"
        );
    }

    #[test]
    fn unregistered_respects_reregistration() {
        let body = br#"{"reason":"Unregistered","timestamp":1700000000000}"#;
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let h = hyper::HeaderMap::new();
        let gone = classify(
            StatusCode::GONE,
            &h,
            body,
            &device(Some(at - Duration::from_secs(60))),
        );
        assert_eq!(
            gone,
            Outcome::DeleteDevice {
                reason: "Unregistered".into(),
                unregistered_at: Some(at)
            }
        );
        let back = classify(
            StatusCode::GONE,
            &h,
            body,
            &device(Some(at + Duration::from_secs(60))),
        );
        assert_eq!(back.class(), "drop");
    }
}
