//! `PUT /v1/devices`, `GET /v1/devices`, `DELETE /v1/devices/{token}`: a user's own
//! devices, and `GET /v1/apps/{app}/vapid`: the key a browser subscribes with; all
//! authenticated with the user's own mail login (HTTP Basic with the mail password, or
//! an OAuth bearer token; Dovecot checks either).

use std::net::IpAddr;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};

use super::error::{json_response, ApiError, HttpResponse};
use super::{auth, percent_decode, read_body, AppState};
use crate::domain::device::{public_token, webpush_endpoint, RegisteredDevice};
use crate::domain::format_millis;
use crate::domain::registry::RegistryError;
use crate::mailserver::MailCredential;

/// Largest accepted registration body.
pub const MAX_BODY: usize = 16 * 1024;

/// The caller's login and credential.
fn credentials(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<(String, MailCredential), ApiError> {
    auth::device_login(req.headers(), req.uri().query(), &state.oauth_user_claim)
        .unwrap_or_else(|| Err(ApiError::unauthorized_basic()))
}

/// A registry failure as an answer: a refused bearer token says so in its challenge.
fn refused(credential: &MailCredential) -> impl Fn(RegistryError) -> ApiError + '_ {
    move |e| match (e, credential) {
        (RegistryError::BadCredentials, MailCredential::Bearer(_)) => ApiError::invalid_token(),
        (e, _) => e.into(),
    }
}

/// A device as its owner sees it: the full token (a Web Push device's `wp-…` id, and its
/// endpoint; its keys are not shown).
pub fn device_json(d: &RegisteredDevice) -> Value {
    let mut v = json!({
        "app": d.device.app_id,
        "transport": d.device.kind.as_str(),
        "token": public_token(d.device.kind, &d.device.token),
        "mailboxes": d.mailboxes,
        "privacy": d.privacy().as_str(),
        "created": format_millis(d.created_at),
        "last_seen": format_millis(d.last_seen_at()),
        "last_success": d.last_success_at.map(format_millis),
        "last_error": d.last_error,
        "pending": d.pending,
    });
    if let Some(endpoint) = webpush_endpoint(d.device.kind, &d.device.token) {
        v["endpoint"] = endpoint.into();
    }
    v
}

pub async fn register(
    state: &AppState,
    req: Request<Incoming>,
    client: IpAddr,
) -> Result<HttpResponse, ApiError> {
    let (user, credential) = credentials(state, &req)?;
    let body = read_body(req, MAX_BODY).await?;
    let (reg, outcome) = state
        .registry
        .register(&user, &credential, &body, Some(client))
        .await
        .map_err(refused(&credential))?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut body = json!({
        "app": reg.app,
        "transport": reg.transport.as_str(),
        "token": public_token(reg.transport, &reg.token),
        "mailboxes": reg.mailboxes,
        "privacy": reg.privacy.as_str(),
        "created": outcome.created,
    });
    if let Some(endpoint) = webpush_endpoint(reg.transport, &reg.token) {
        body["endpoint"] = endpoint.into();
    }
    Ok(json_response(status, &body))
}

/// `GET /v1/apps/{app}/vapid`: the app's VAPID public key, for
/// `pushManager.subscribe({applicationServerKey})`; 404 for an app without Web Push.
pub async fn vapid_key(
    state: &AppState,
    req: Request<Incoming>,
    raw_app: &str,
    client: IpAddr,
) -> Result<HttpResponse, ApiError> {
    let (user, credential) = credentials(state, &req)?;
    state
        .registry
        .authenticate(&user, &credential, Some(client))
        .await
        .map_err(refused(&credential))?;
    let app = percent_decode(raw_app).unwrap_or_default();
    let Some(key) = state.vapid_keys.get(&app) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such app with Web Push ([apps.webpush])",
        ));
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({ "app": app, "public_key": key }),
    ))
}

pub async fn list(
    state: &AppState,
    req: Request<Incoming>,
    client: IpAddr,
) -> Result<HttpResponse, ApiError> {
    let (user, credential) = credentials(state, &req)?;
    let devices = state
        .registry
        .list(&user, &credential, Some(client))
        .await
        .map_err(refused(&credential))?;
    let devices: Vec<Value> = devices.iter().map(device_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "devices": devices }),
    ))
}

pub async fn remove(
    state: &AppState,
    req: Request<Incoming>,
    raw_token: &str,
    client: IpAddr,
) -> Result<HttpResponse, ApiError> {
    let (user, credential) = credentials(state, &req)?;
    let token = percent_decode(raw_token).unwrap_or_default();
    // An undecodable or empty token matches no device; credentials are still checked.
    state
        .registry
        .remove(&user, &credential, &token, Some(client))
        .await
        .map_err(refused(&credential))?;
    let mut resp = HttpResponse::new(Default::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
