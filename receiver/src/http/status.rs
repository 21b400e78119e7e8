//! Operator endpoints: `GET /v1/status/subscriptions[?user=U]`, `GET
//! /v1/status/drift[?user=U]`, `GET /v1/status/credentials` and `GET /metrics` (all
//! require `Authorization: Bearer <admin token>`), and `GET /healthz` (open; says only
//! "ok").

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, StatusCode};
use serde_json::{json, Value};

use super::error::{json_response, ApiError, HttpResponse};
use super::{auth, percent_decode, AppState};
use crate::domain::credential_watch::CredentialRecord;
use crate::domain::device::shorten_token;
use crate::domain::format_millis;
use crate::domain::resync::{find_drift, Drift, DriftAction};
use crate::domain::store::UserStatus;

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
                        "app": d.device.app_id,
                        "transport": d.device.kind.as_str(),
                        "token": shorten_token(&d.device.token),
                        "privacy": d.privacy().as_str(),
                        "mailboxes": d.mailboxes,
                        "created": format_millis(d.created_at),
                        "last_seen": format_millis(d.last_seen_at()),
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

/// The `user` query parameter, if given.
fn user_param(req: &Request<Incoming>) -> Result<Option<String>, ApiError> {
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
    Ok(user)
}

/// The drift report as JSON (also printed by `resync --json`).
pub fn drift_json(directory: &str, drift: &[Drift]) -> Value {
    json!({
        "directory": directory,
        "drift": drift.iter().map(|d| json!({
            "user": d.user,
            "devices": d.devices,
            "dovecot": d.dovecot,
            "action": match &d.action {
                DriftAction::Set(_) => "set",
                DriftAction::Clear => "clear",
            },
            "value": match &d.action {
                DriftAction::Set(v) => Some(v.as_str()),
                DriftAction::Clear => None,
            },
        })).collect::<Vec<_>>(),
    })
}

pub async fn drift(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    auth::require_bearer(req.headers(), &state.admin_token)?;
    let user = user_param(&req)?;
    let Some(directory) = &state.directory else {
        return Err(ApiError::unavailable(
            "no way to read other users' METADATA: set [dovecot] doveadm_url or master_user",
        ));
    };
    let drift = find_drift(state.store.as_ref(), directory.as_ref(), user.as_deref())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "Cannot compare the registry with Dovecot.");
            ApiError::unavailable(&format!("cannot compare with Dovecot: {e}"))
        })?;
    Ok(json_response(
        StatusCode::OK,
        &drift_json(directory.name(), &drift),
    ))
}

pub async fn subscriptions(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    auth::require_bearer(req.headers(), &state.admin_token)?;
    let user = user_param(&req)?;
    let users = state.store.subscriptions(user).await.map_err(|e| {
        tracing::error!(error = %e, "Cannot read subscriptions.");
        ApiError::unavailable("store unavailable")
    })?;
    Ok(json_response(StatusCode::OK, &subscriptions_json(&users)))
}

/// The watched credentials as JSON (also printed by `check-config`).
pub fn credentials_json(records: &[CredentialRecord], now: std::time::SystemTime) -> Value {
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "app": (!r.app.is_empty()).then_some(&r.app),
                "kind": r.kind.as_str(),
                "file": r.file.as_ref().map(|f| f.display().to_string()),
                "expires": r.not_after.map(|t| format_millis(t.saturating_mul(1000))),
                "expires_in_days": r
                    .seconds_left(now)
                    .map(|s| (s as f64 / 86_400.0 * 10.0).floor() / 10.0),
                "read_error": r.read_error,
                "rejected": r.rejected.as_ref().map(|j| json!({
                    "at": format_millis(j.at_ms),
                    "reason": j.reason,
                })),
            })
        })
        .collect();
    json!({ "credentials": records })
}

pub async fn credentials(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    auth::require_bearer(req.headers(), &state.admin_token)?;
    let records = state.credentials.snapshot();
    Ok(json_response(
        StatusCode::OK,
        &credentials_json(&records, std::time::SystemTime::now()),
    ))
}

pub async fn metrics(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    auth::require_bearer(req.headers(), &state.admin_token)?;
    // From the store: every receiver sharing it reports the same depth.
    let depth = state.store.outbox_depth().await.map_err(|e| {
        tracing::error!(error = %e, "Cannot count the outbox.");
        ApiError::unavailable("store unavailable")
    })?;
    let text = state.metrics.render(depth);
    let mut resp = hyper::Response::new(text.into());
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::telemetry::CONTENT_TYPE),
    );
    Ok(resp)
}

pub fn healthz() -> HttpResponse {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::RegisteredDevice;
    use dovepush_push::{DeviceKind, Privacy};

    #[test]
    fn the_listing_shortens_tokens_and_formats_times() {
        let token = "0123456789abcdef0123456789abcdef";
        let users = vec![UserStatus {
            user: "alice".into(),
            last_error: None,
            last_error_at: None,
            devices: vec![{
                let mut d = RegisteredDevice {
                    last_success_at: Some(1_000),
                    last_error: Some("Unavailable".into()),
                    pending: 2,
                    ..RegisteredDevice::for_tests("alice", DeviceKind::Fcm, token)
                };
                d.device.privacy = Some(Privacy::Generic);
                d
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

    #[test]
    fn web_push_devices_show_their_id_and_push_service_only() {
        let token = "webpush:https://push.example.net/send/SECRET-PATH|\
            BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4|\
            BTBZMqHH6r4Tts7J_aSIgg";
        let users = vec![UserStatus {
            user: "alice".into(),
            last_error: None,
            last_error_at: None,
            devices: vec![RegisteredDevice::for_tests(
                "alice",
                DeviceKind::WebPush,
                token,
            )],
        }];
        let v = subscriptions_json(&users);
        let d = &v[0]["devices"][0];
        assert_eq!(d["transport"], "webpush");
        let shown = d["token"].as_str().unwrap();
        assert!(
            shown.starts_with("wp-") && shown.ends_with("@push.example.net"),
            "{shown}"
        );
        assert!(!d.to_string().contains("SECRET-PATH"), "{d}");
        assert!(!d.to_string().contains("TBZMqHH"), "{d}");
    }
}
