//! `PUT /v1/devices`, `GET /v1/devices`, `DELETE /v1/devices/{token}`: a user's own
//! devices, authenticated with the user's own mail login (HTTP Basic, checked by Dovecot).

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};

use super::error::{json_response, ApiError, HttpResponse};
use super::{auth, percent_decode, read_body, AppState};
use crate::domain::device::Device;
use crate::domain::format_millis;

/// Largest accepted registration body.
pub const MAX_BODY: usize = 16 * 1024;

fn credentials(req: &Request<Incoming>) -> Result<auth::BasicCredentials, ApiError> {
    auth::basic(req.headers()).ok_or_else(ApiError::unauthorized_basic)
}

/// A device as its owner sees it (full token).
pub fn device_json(d: &Device) -> Value {
    json!({
        "app": d.app,
        "transport": d.transport.as_str(),
        "token": d.token,
        "mailboxes": d.mailboxes,
        "privacy": d.privacy.as_str(),
        "created": format_millis(d.created_at),
        "last_success": d.last_success_at.map(format_millis),
        "last_error": d.last_error,
        "pending": d.pending,
    })
}

pub async fn register(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let c = credentials(&req)?;
    let body = read_body(req, MAX_BODY).await?;
    let (reg, outcome) = state.registry.register(&c.user, &c.password, &body).await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &json!({
            "app": reg.app,
            "transport": reg.transport.as_str(),
            "token": reg.token,
            "mailboxes": reg.mailboxes,
            "privacy": reg.privacy.as_str(),
            "created": outcome.created,
        }),
    ))
}

pub async fn list(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let c = credentials(&req)?;
    let devices = state.registry.list(&c.user, &c.password).await?;
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
) -> Result<HttpResponse, ApiError> {
    let c = credentials(&req)?;
    let token = percent_decode(raw_token).unwrap_or_default();
    // An undecodable or empty token matches no device; credentials are still checked.
    state.registry.remove(&c.user, &c.password, &token).await?;
    let mut resp = HttpResponse::new(Default::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
