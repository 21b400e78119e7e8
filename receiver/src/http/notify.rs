//! `PUT`/`POST /preliminary/http-notify/v1/notify`: the ox-compatible ingest endpoint.
//! Answers `200 {"success":true}` only after the event is durably committed.
//!
//! `POST /v1/notify/batch` (also `…/http-notify/v1/notify/batch`, what a sender with
//! `dovepush_batch` appends to its URL): several notifications with their event ids
//! ([`dovepush_protocol::batch`]). Each is checked on its own (a bad one is a 400 result,
//! not a 400 answer); the valid ones go to the store together, so its group commit
//! writes them in one transaction, and the answer (200) has one result per
//! notification, in order, once they are durable: 200, 400 with the reason, or 503.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};

use dovepush_protocol::batch::{
    BatchRequest, BatchResponse, BatchResult, MAX_BATCH_BYTES, MAX_BATCH_ITEMS,
};
use serde_json::value::RawValue;

use super::error::{ApiError, HttpResponse};
use super::{auth, read_body, AppState};
use crate::domain::event::{parse_notification, validate_event_id};
use crate::domain::{now_millis, FieldError};

/// The ingest path (the OX middleware's).
pub const PATH: &str = "/preliminary/http-notify/v1/notify";
/// Largest accepted notification body.
pub const MAX_BODY: usize = 64 * 1024;
/// Header carrying the plugin's event id.
pub use dovepush_protocol::EVENT_ID_HEADER;
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
        Err(e) if e.status.is_client_error() => {
            state.metrics.rejected.inc();
        }
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

/// `POST …/notify/batch`.
pub async fn handle_batch(
    state: &AppState,
    req: Request<Incoming>,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let result = accept_batch(state, req, started).await;
    if matches!(&result, Err(e) if e.status.is_client_error()) {
        state.metrics.rejected.inc();
    }
    result
}

async fn accept_batch(
    state: &AppState,
    req: Request<Incoming>,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    auth::require_basic(req.headers(), &state.notify_user, &state.notify_password)?;
    let body = read_body(req, MAX_BATCH_BYTES).await?;
    let batch: BatchRequest<Box<RawValue>> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(FieldError::new(
            "body",
            format!("not a batch of notifications: {e}"),
        ))
    })?;
    if batch.notifications.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::bad_request(FieldError::new(
            "notifications",
            format!("at most {MAX_BATCH_ITEMS} per request"),
        )));
    }
    state.metrics.batches.inc();
    let received_at = now_millis();
    let mut results = Vec::with_capacity(batch.notifications.len());
    let mut committing = Vec::new();
    for item in batch.notifications {
        let checked = validate_event_id(item.event_id.as_bytes()).and_then(|id| {
            parse_notification(item.notification.get().as_bytes(), Some(id), received_at)
        });
        match checked {
            Ok(event) => {
                committing.push((results.len(), state.ingest.accept(event)));
                results.push(BatchResult {
                    event_id: item.event_id,
                    status: 200,
                    error: None,
                });
            }
            Err(e) => {
                state.metrics.rejected.inc();
                results.push(BatchResult {
                    event_id: item.event_id,
                    status: 400,
                    error: Some(e.to_string()),
                });
            }
        }
    }
    // Together, so that the store's writer takes them into one transaction.
    let (indexes, commits): (Vec<usize>, Vec<_>) = committing.into_iter().unzip();
    let outcomes = futures_util::future::join_all(commits).await;
    let mut failed = 0;
    for (i, outcome) in indexes.into_iter().zip(outcomes) {
        match outcome {
            Ok(_) => state.metrics.observe_ingest(started.elapsed()),
            Err(e) => {
                if failed == 0 {
                    tracing::error!(error = %e, "Cannot commit notifications of a batch.");
                }
                failed += 1;
                results[i].status = 503;
                results[i].error = Some("store unavailable, try again later".into());
            }
        }
    }
    let body = serde_json::to_vec(&BatchResponse { results }).expect("results serialise");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
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
