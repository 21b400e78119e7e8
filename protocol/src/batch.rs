//! `POST …/notify/batch`: several notifications in one request to a dovepush receiver.
//!
//! The ox wire format carries one event per request. Between the sender service and a
//! dovepush receiver that opted in (`dovepush_batch`), the events that queue up for one
//! endpoint while a request is in flight travel together: the same ox bodies, each with
//! its event id. The receiver commits them in one transaction and answers `200` with one
//! result per event, in order: `200` accepted (or a repeat), a 4xx refused for good with
//! the reason, a 5xx to try again later. A non-200 answer to the whole request is a
//! result for every event in it.
//!
//! The batch URL is the endpoint's notify URL with `/batch` appended.

use serde::{Deserialize, Serialize};

use crate::notification::Notification;

/// Most notifications one batch request may carry.
pub const MAX_BATCH_ITEMS: usize = 500;
/// Largest batch body a receiver accepts.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The request body. `N` is [`Notification`] for a sender; a receiver reads each one as
/// raw JSON first, so that one bad body refuses only itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<N = Notification> {
    pub notifications: Vec<BatchItem<N>>,
}

/// One notification of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem<N = Notification> {
    /// What a single request sends as `X-Dovepush-Event-Id`.
    pub event_id: String,
    pub notification: N,
}

/// The answer to a batch, one result per item, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub results: Vec<BatchResult>,
}

/// What became of one item: the HTTP status a single request would have had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub event_id: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The batch URL of an endpoint's notify URL.
pub fn batch_url(notify_url: &str) -> String {
    format!("{}/batch", notify_url.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::EventKind;

    #[test]
    fn a_receiver_reads_items_raw_and_a_sender_writes_them_typed() {
        let request = BatchRequest {
            notifications: vec![BatchItem {
                event_id: "e1".into(),
                notification: Notification {
                    user: "alice".into(),
                    event: EventKind::MessageNew,
                    folder: "INBOX".into(),
                    uidvalidity: 1,
                    uid: 2,
                    from: None,
                    subject: None,
                    snippet: None,
                    unseen: None,
                    time_ms: None,
                },
            }],
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"notifications":[{"event_id":"e1","notification":{"user":"alice","event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":2}}]}"#
        );
        let raw: BatchRequest<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let typed =
            Notification::from_json(raw.notifications[0].notification.to_string().as_bytes());
        assert_eq!(typed.unwrap(), request.notifications[0].notification);
    }

    #[test]
    fn results_leave_out_a_missing_error() {
        let response = BatchResponse {
            results: vec![
                BatchResult {
                    event_id: "a".into(),
                    status: 200,
                    error: None,
                },
                BatchResult {
                    event_id: "b".into(),
                    status: 400,
                    error: Some("user: missing".into()),
                },
            ],
        };
        let text = serde_json::to_string(&response).unwrap();
        assert_eq!(
            text,
            r#"{"results":[{"event_id":"a","status":200},{"event_id":"b","status":400,"error":"user: missing"}]}"#
        );
        assert_eq!(
            serde_json::from_str::<BatchResponse>(&text).unwrap(),
            response
        );
    }

    #[test]
    fn batch_url_appends() {
        assert_eq!(
            batch_url("https://p.example/preliminary/http-notify/v1/notify"),
            "https://p.example/preliminary/http-notify/v1/notify/batch"
        );
        assert_eq!(batch_url("http://h/x/"), "http://h/x/batch");
    }
}
