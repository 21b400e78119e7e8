//! FCM HTTP v1 client: `POST /v1/projects/<project>/messages:send` with a service-account
//! OAuth bearer, and the mapping of Google's error replies to [`Outcome`]s.

mod message;
mod oauth;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use crate::config::{read_file, resolve, AppConfig, ConfigError, FcmConfig};
use crate::config::{DEFAULT_REQUEST_TIMEOUT_SECS, DEFAULT_TTL_SECS};
use crate::http::{self, HttpClient, Protocols};
use crate::model::{Device, Notification, Privacy};
use crate::outcome::Outcome;

use oauth::{AccessToken, AccessTokens, ServiceAccount, TokenError};

/// Sends to the FCM devices of one app.
pub(crate) struct FcmSender {
    app_id: String,
    send_uri: hyper::Uri,
    client: HttpClient,
    tokens: Arc<AccessTokens>,
    generic_text: String,
    ttl: Duration,
    timeout: Duration,
}

impl FcmSender {
    pub(crate) fn from_config(
        app: &AppConfig,
        cfg: &FcmConfig,
        base_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let id = app.id.as_str();
        let key = "apps.fcm.service_account_file";
        let (full, json) = read_file(id, key, base_dir, &cfg.service_account_file)?;
        let account: ServiceAccount = serde_json::from_slice(&json).map_err(|e| {
            ConfigError::file(
                id,
                key,
                &full,
                format!("not a service-account JSON (project_id, client_email, private_key): {e}"),
            )
        })?;
        let base = match &cfg.endpoint {
            Some(url) => crate::config::parse_endpoint(id, "apps.fcm.endpoint", url)?,
            None => "https://fcm.googleapis.com".to_owned(),
        };
        if account.project_id.is_empty()
            || !account.project_id.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b':'
            })
        {
            return Err(ConfigError::file(
                id,
                key,
                &full,
                "project_id is missing or not a project id",
            ));
        }
        let send_uri: hyper::Uri =
            format!("{base}/v1/projects/{}/messages:send", account.project_id)
                .parse()
                .map_err(|e| ConfigError::invalid(id, "apps.fcm.endpoint", format!("{e}")))?;
        let extra_roots = match &cfg.ca_file {
            Some(path) => {
                let ca = resolve(base_dir, path);
                http::read_ca_file(&ca)
                    .map_err(|m| ConfigError::file(id, "apps.fcm.ca_file", &ca, m))?
            }
            None => Vec::new(),
        };
        let tls = http::tls_config(&extra_roots, None)
            .map_err(|m| ConfigError::invalid(id, "apps.fcm.ca_file", m))?;
        let client = http::client(tls, Protocols::Http1And2);
        let timeout = Duration::from_secs(
            cfg.request_timeout_secs
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT_SECS),
        );
        let tokens = AccessTokens::new(&account, client.clone(), timeout)
            .map_err(|m| ConfigError::file(id, key, &full, m))?;
        Ok(FcmSender {
            app_id: app.id.clone(),
            send_uri,
            client,
            tokens: Arc::new(tokens),
            generic_text: app.generic_text.clone(),
            ttl: Duration::from_secs(app.ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
            timeout,
        })
    }

    /// Sends one message; on 401 renews the OAuth token once and tries again.
    pub(crate) async fn send(
        &self,
        device: &Device,
        n: &Notification,
        privacy: Privacy,
    ) -> Outcome {
        if device.token.is_empty() {
            return Outcome::delete("INVALID_ARGUMENT_token", None);
        }
        let body = match message::build(&device.token, n, privacy, &self.generic_text, self.ttl) {
            Ok(body) => Bytes::from(body),
            Err(message::TooLarge) => {
                tracing::warn!(app = %self.app_id, "FCM message too large even after cutting texts; dropped");
                return Outcome::drop("payload_too_large");
            }
        };
        let mut token = match self.tokens.current().await {
            Ok(token) => token,
            Err(err) => return self.token_failure(err),
        };
        let mut renewed = false;
        loop {
            let req = self.request(&token, body.clone());
            let reply = match http::exchange(&self.client, req, self.timeout).await {
                Ok(reply) => reply,
                Err(err) => {
                    tracing::debug!(app = %self.app_id, error = %err, "FCM exchange failed");
                    return Outcome::retry(err.label(), None);
                }
            };
            let outcome = classify(reply.status, &reply.headers, &reply.body);
            if let Outcome::CredentialsRejected { reason } = &outcome {
                if !renewed && matches!(reason.as_str(), "UNAUTHENTICATED" | "PERMISSION_DENIED") {
                    renewed = true;
                    match self.tokens.renew_after_rejection(&token).await {
                        Ok(Some(fresh)) => {
                            tracing::info!(app = %self.app_id, "FCM rejected the access token; renewed it");
                            token = fresh;
                            continue;
                        }
                        Ok(None) => {}
                        Err(err) => return self.token_failure(err),
                    }
                }
            }
            http::log_outcome("FCM", &self.app_id, device, &outcome);
            return outcome;
        }
    }

    fn request(&self, token: &AccessToken, body: Bytes) -> Request<Full<Bytes>> {
        Request::builder()
            .method(Method::POST)
            .uri(self.send_uri.clone())
            .header(AUTHORIZATION, token.header.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }

    fn token_failure(&self, err: TokenError) -> Outcome {
        match err {
            TokenError::Rejected(msg) => {
                tracing::error!(app = %self.app_id, error = %msg, "OAuth token endpoint rejected the service account");
                Outcome::credentials("oauth_rejected")
            }
            TokenError::Unavailable(msg) => {
                tracing::warn!(app = %self.app_id, error = %msg, "OAuth token endpoint unavailable");
                Outcome::retry("oauth_unavailable", None)
            }
        }
    }

    /// OAuth access tokens fetched so far for this app's service account.
    pub(crate) fn token_mints(&self) -> u64 {
        self.tokens.mints()
    }
}

#[derive(Deserialize)]
struct ErrorReply {
    error: GoogleError,
}

#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    #[serde(rename = "fieldViolations", default)]
    field_violations: Vec<FieldViolation>,
}

#[derive(Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
    #[serde(default)]
    description: String,
}

/// Maps one FCM reply to an outcome: `details[].errorCode` first, then `status`, then HTTP.
pub(crate) fn classify(status: StatusCode, headers: &hyper::HeaderMap, body: &[u8]) -> Outcome {
    if status == StatusCode::OK {
        #[derive(Deserialize)]
        struct Sent {
            name: Option<String>,
        }
        let id = serde_json::from_slice::<Sent>(body)
            .ok()
            .and_then(|s| s.name);
        return Outcome::Delivered { id };
    }
    let parsed = serde_json::from_slice::<ErrorReply>(body)
        .ok()
        .map(|r| r.error);
    let code = parsed.as_ref().and_then(|e| {
        e.details
            .iter()
            .find_map(|d| d.error_code.clone())
            .or_else(|| (!e.status.is_empty()).then(|| e.status.clone()))
    });
    let retry_after = http::retry_after(headers);
    let http_label = format!("http_{}", status.as_u16());
    match (status.as_u16(), code.as_deref()) {
        (_, Some("UNREGISTERED")) => Outcome::delete("UNREGISTERED", None),
        (_, Some("SENDER_ID_MISMATCH")) => Outcome::delete("SENDER_ID_MISMATCH", None),
        (_, Some("INVALID_ARGUMENT")) => {
            if parsed.as_ref().is_some_and(names_the_token) {
                Outcome::delete("INVALID_ARGUMENT_token", None)
            } else {
                Outcome::drop("INVALID_ARGUMENT")
            }
        }
        (_, Some(c @ ("QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" | "RESOURCE_EXHAUSTED"))) => {
            Outcome::retry(c, retry_after)
        }
        (_, Some("THIRD_PARTY_AUTH_ERROR")) => Outcome::credentials("THIRD_PARTY_AUTH_ERROR"),
        (401, _) => Outcome::credentials("UNAUTHENTICATED"),
        (403, c) => Outcome::credentials(c.unwrap_or("PERMISSION_DENIED")),
        (429, c) => Outcome::retry(c.unwrap_or("QUOTA_EXCEEDED"), retry_after),
        (s, c) if s >= 500 => Outcome::retry(c.unwrap_or(&http_label), retry_after),
        (_, c) => Outcome::drop(c.unwrap_or(&http_label)),
    }
}

/// Whether an INVALID_ARGUMENT error is about the registration token (then the device goes).
fn names_the_token(e: &GoogleError) -> bool {
    let violation = e.details.iter().flat_map(|d| &d.field_violations).any(|v| {
        v.field.ends_with("token")
            || v.description
                .to_ascii_lowercase()
                .contains("registration token")
    });
    violation
        || e.message
            .to_ascii_lowercase()
            .contains("registration token")
        || e.message.contains("message.token")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, body: &str) -> Outcome {
        classify(
            StatusCode::from_u16(status).unwrap(),
            &hyper::HeaderMap::new(),
            body.as_bytes(),
        )
    }

    fn fcm_body(code: u16, status: &str, error_code: Option<&str>, message: &str) -> String {
        let details = match error_code {
            Some(c) => format!(
                r#"[{{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"{c}"}}]"#
            ),
            None => "[]".to_owned(),
        };
        format!(
            r#"{{"error":{{"code":{code},"message":"{message}","status":"{status}","details":{details}}}}}"#
        )
    }

    #[test]
    fn classification_table() {
        let unreg = fcm_body(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        );
        assert_eq!(err(404, &unreg).class(), "delete_device");
        let bad_token = fcm_body(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "The registration token is not a valid FCM registration token",
        );
        assert_eq!(err(400, &bad_token).reason(), "INVALID_ARGUMENT_token");
        let bad_ttl = fcm_body(
            400,
            "INVALID_ARGUMENT",
            None,
            "Invalid value at 'message.android.ttl'",
        );
        assert_eq!(err(400, &bad_ttl).class(), "drop");
        let quota = fcm_body(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"), "quota");
        assert_eq!(err(429, &quota).reason(), "QUOTA_EXCEEDED");
        assert_eq!(err(503, "<html>").class(), "retry");
        assert_eq!(
            err(401, &fcm_body(401, "UNAUTHENTICATED", None, "x")).reason(),
            "UNAUTHENTICATED"
        );
        assert_eq!(
            err(403, &fcm_body(403, "PERMISSION_DENIED", None, "x")).class(),
            "credentials_rejected"
        );
        assert_eq!(
            err(
                403,
                &fcm_body(403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"), "x")
            )
            .class(),
            "delete_device"
        );
        assert_eq!(
            err(
                401,
                &fcm_body(401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR"), "x")
            )
            .reason(),
            "THIRD_PARTY_AUTH_ERROR"
        );
        assert_eq!(err(404, "").reason(), "http_404");
    }
}
