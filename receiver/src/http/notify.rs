//! `PUT`/`POST /preliminary/http-notify/v1/notify`: the ox-compatible ingest endpoint.
//! Answers `200 {"success":true}` only after the event is durably committed.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};

use super::error::{ApiError, HttpResponse};
use super::{auth, read_body, AppState};
use crate::domain::event::{parse_notification, validate_event_id};
use crate::domain::now_millis;
use crate::telemetry::Metrics;

/// The ingest path (the OX middleware's).
pub const PATH: &str = "/preliminary/http-notify/v1/notify";
/// Largest accepted notification body.
pub const MAX_BODY: usize = 64 * 1024;
/// Header carrying the plugin's event id.
pub const EVENT_ID_HEADER: &str = "x-dovepush-event-id";
/// The answer to an accepted notification (a static body: nothing to serialise per request).
const ACCEPTED_BODY: &[u8] = br#"{"success":true}"#;

pub async fn handle(
    state: &AppState,
    req: Request<Incoming>,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let result = accept(state, req).await;
    match &result {
        Ok(_) => state.metrics.observe_ingest(started.elapsed()),
        Err(e) if e.status.is_client_error() => Metrics::add(&state.metrics.rejected, 1),
        Err(_) => {}
    }
    result
}

async fn accept(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    auth::require_basic(req.headers(), &state.notify_user, &state.notify_password)?;
    let event_id = match req.headers().get(EVENT_ID_HEADER) {
        None => None,
        Some(v) => Some(validate_event_id(v.as_bytes()).map_err(ApiError::bad_request)?),
    };
    let body = read_body(req, MAX_BODY).await?;
    let event = parse_notification(&body, event_id, now_millis()).map_err(ApiError::bad_request)?;
    state.ingest.accept(event).await.map_err(|e| {
        tracing::error!(error = %e, "Cannot commit a notification.");
        ApiError::unavailable("store unavailable, try again later")
    })?;
    Ok(accepted())
}

/// `200 {"success":true}`.
fn accepted() -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(ACCEPTED_BODY)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_answer_is_the_ox_success_body() {
        let resp = accepted();
        assert_eq!(resp.status(), hyper::StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(ACCEPTED_BODY).unwrap();
        assert_eq!(body, serde_json::json!({ "success": true }));
    }
}
