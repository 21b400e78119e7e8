//! The one place errors become HTTP responses: every error is a JSON object
//! `{"error": "...", "field": "...", "rule": "..."}` (`field` and `rule` when they apply)
//! with a 4xx/5xx status. Reasons never contain secrets.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::domain::registry::RegistryError;
use crate::domain::FieldError;

/// The response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub field: Option<String>,
    /// The rule that refused a Web Push endpoint (`loopback`, `private`, `metadata`, …).
    pub rule: Option<&'static str>,
    challenge: Option<&'static str>,
    allow: Option<&'static str>,
    /// Seconds for `Retry-After`.
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
            rule: None,
            challenge: None,
            allow: None,
            retry_after: None,
        }
    }

    pub fn bad_request(e: FieldError) -> Self {
        Self {
            field: Some(e.field),
            ..Self::new(StatusCode::BAD_REQUEST, e.message)
        }
    }

    /// 401 asking for HTTP Basic.
    pub fn unauthorized_basic() -> Self {
        Self {
            challenge: Some("Basic realm=\"dovepush\", charset=\"UTF-8\""),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication required or invalid",
            )
        }
    }

    /// 401 for a bearer token the mail server refused (RFC 6750 §3.1).
    pub fn invalid_token() -> Self {
        Self {
            challenge: Some("Bearer realm=\"dovepush\", error=\"invalid_token\""),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "the mail server refused the token",
            )
        }
    }

    /// 401 asking for the admin bearer token.
    pub fn unauthorized_bearer() -> Self {
        Self {
            challenge: Some("Bearer realm=\"dovepush-admin\""),
            ..Self::new(StatusCode::UNAUTHORIZED, "admin token required or invalid")
        }
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not found")
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes"),
        )
    }

    /// 429 with `Retry-After`: too many failed logins from this address or for this user.
    pub fn too_many_failed_logins(wait: std::time::Duration) -> Self {
        Self {
            retry_after: Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins: try again later",
            )
        }
    }

    pub fn unavailable(what: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, what)
    }

    /// The response for this error.
    pub fn into_response(self) -> HttpResponse {
        let mut resp = json_response(
            self.status,
            &ErrorBody {
                error: &self.error,
                field: self.field.as_deref(),
                rule: self.rule,
            },
        );
        if let Some(c) = self.challenge {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if let Some(a) = self.allow {
            resp.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static(a));
        }
        if let Some(seconds) = self.retry_after {
            resp.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::BadCredentials => ApiError::unauthorized_basic(),
            RegistryError::Invalid(f) => ApiError::bad_request(f),
            RegistryError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "no such device"),
            RegistryError::MailServerUnavailable(_) => {
                ApiError::unavailable("mail server unavailable, try again later")
            }
            RegistryError::Subscription(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "the mail server refused the push subscription (is imap_metadata enabled?)",
            ),
            RegistryError::EndpointRefused(e) => ApiError {
                field: Some("endpoint".into()),
                rule: Some(e.rule()),
                ..ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
            },
            RegistryError::Store(e) => {
                tracing::error!(error = %e, "Store failure.");
                ApiError::unavailable("store unavailable, try again later")
            }
        }
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn bad_request_names_the_field() {
        let r = ApiError::bad_request(FieldError::new("imap-uid", "missing")).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"error":"missing","field":"imap-uid"}"#);
    }

    #[test]
    fn unauthorized_has_a_challenge() {
        let r = ApiError::unauthorized_basic().into_response();
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
        let r = ApiError::from(RegistryError::NotFound).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_refused_endpoint_names_the_rule() {
        let refused = dovepush_push::webpush::EndpointRefused::Literal {
            address: "127.0.0.1".parse().unwrap(),
            class: dovepush_push::webpush::AddressClass::Loopback,
        };
        let r = ApiError::from(RegistryError::EndpointRefused(refused)).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["field"], "endpoint");
        assert_eq!(v["rule"], "loopback");
        assert!(v["error"].as_str().unwrap().contains("loopback"), "{v}");
    }
}
