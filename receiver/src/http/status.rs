//! Operator endpoints: `GET /v1/status/subscriptions[?user=U]` and `GET /metrics` (both
//! require `Authorization: Bearer <admin token>`), and `GET /healthz` (open; says only "ok").

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, StatusCode};
use serde_json::{json, Value};

use super::error::{json_response, ApiError, HttpResponse};
use super::{auth, percent_decode, AppState};
use crate::domain::device::shorten_token;
use crate::domain::format_millis;
use crate::store::UserStatus;

/// The status listing as JSON (also printed by `subscriptions list --json`).
pub fn subscriptions_json(users: &[UserStatus]) -> Value {
    Value::Array(
        users
            .iter()
            .map(|u| {
                json!({
                    "user": u.user,
                    "last_error": u.last_error,
                    "last_error_at": u.last_error_at.map(format_millis),
                    "devices": u.devices.iter().map(|d| json!({
                        "app": d.app,
                        "transport": d.transport.as_str(),
                        "token": shorten_token(&d.token),
                        "privacy": d.privacy.as_str(),
                        "mailboxes": d.mailboxes,
                        "created": format_millis(d.created_at),
                        "last_success": d.last_success_at.map(format_millis),
                        "last_error": d.last_error,
                        "last_error_at": d.last_error_at.map(format_millis),
                        "pending": d.pending,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

pub async fn subscriptions(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    auth::require_bearer(req.headers(), &state.admin_token)?;
    let mut user = None;
    for pair in req.uri().query().unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("user=") {
            user = Some(percent_decode(v).ok_or_else(|| {
                ApiError::bad_request(crate::domain::FieldError::new(
                    "user",
                    "bad percent-encoding",
                ))
            })?);
        }
    }
    let users = state.store.subscriptions(user).await.map_err(|e| {
        tracing::error!(error = %e, "Cannot read subscriptions.");
        ApiError::unavailable("store unavailable")
    })?;
    Ok(json_response(StatusCode::OK, &subscriptions_json(&users)))
}

pub async fn metrics(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    auth::require_bearer(req.headers(), &state.admin_token)?;
    let text = state.metrics.render(state.store.outbox_depth());
    let mut resp = hyper::Response::new(text.into());
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

pub fn healthz() -> HttpResponse {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::Device;
    use crate::transport::{Privacy, TransportKind};

    #[test]
    fn the_listing_shortens_tokens_and_formats_times() {
        let token = "0123456789abcdef0123456789abcdef";
        let users = vec![UserStatus {
            user: "alice".into(),
            last_error: None,
            last_error_at: None,
            devices: vec![Device {
                privacy: Privacy::Generic,
                last_success_at: Some(1_000),
                last_error: Some("Unavailable".into()),
                pending: 2,
                ..Device::for_tests("alice", TransportKind::Fcm, token)
            }],
        }];
        let v = subscriptions_json(&users);
        let d = &v[0]["devices"][0];
        assert_eq!(v[0]["user"], "alice");
        assert_eq!(d["token"], shorten_token(token));
        assert!(
            !d.to_string().contains(token),
            "the whole token never shows"
        );
        assert_eq!(d["transport"], "fcm");
        assert_eq!(d["privacy"], "generic");
        assert_eq!(d["created"], format_millis(0));
        assert_eq!(d["last_success"], format_millis(1_000));
        assert_eq!(d["last_error_at"], Value::Null);
        assert_eq!(d["pending"], 2);
    }
}
