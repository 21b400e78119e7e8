//! New-mail events: the ox notification body → [`NewMailEvent`], and the
//! [`PushContent`] an outbox item carries (with the coalescing rule).

use dovepush_protocol::Notification;
use serde::{Deserialize, Serialize};

use super::FieldError;

pub use dovepush_protocol::notification::{validate_event_id, MAX_EVENT_ID_LEN};

/// A validated new-mail notification.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMailEvent {
    /// From `X-Dovepush-Event-Id`; the stock ox driver sends none (no de-duplication then).
    pub event_id: Option<String>,
    /// The login the event is for (with `user_from_metadata`: the value the receiver wrote).
    pub user: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub snippet: Option<String>,
    pub unseen: Option<u32>,
    /// Milliseconds since the Unix epoch, when the receiver accepted it.
    pub received_at: i64,
}

impl NewMailEvent {
    /// The event a parsed notification describes; its strings move, nothing is copied.
    pub fn from_notification(n: Notification, event_id: Option<String>, received_at: i64) -> Self {
        NewMailEvent {
            event_id,
            user: n.user,
            folder: n.folder,
            uidvalidity: n.uidvalidity,
            uid: n.uid,
            from: n.from,
            subject: n.subject,
            snippet: n.snippet,
            unseen: n.unseen,
            received_at,
        }
    }
}

/// Parses an ox `http-notify` body ([`Notification::from_json`]: unknown keys ignored,
/// the OX middleware's `unread` taken for `unseen`, the field at fault named).
pub fn parse_notification(
    body: &[u8],
    event_id: Option<String>,
    received_at: i64,
) -> Result<NewMailEvent, FieldError> {
    Notification::from_json(body).map(|n| NewMailEvent::from_notification(n, event_id, received_at))
}

/// What an outbox item will push: the newest event's content for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushContent {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snippet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unseen: Option<u32>,
    pub received_at: i64,
    /// How many older events were folded into this one.
    #[serde(default)]
    pub coalesced: u32,
}

/// The content of a fresh event: its strings move, nothing is copied.
impl From<NewMailEvent> for PushContent {
    fn from(e: NewMailEvent) -> Self {
        Self {
            event_id: e.event_id,
            folder: e.folder,
            uidvalidity: e.uidvalidity,
            uid: e.uid,
            from: e.from,
            subject: e.subject,
            snippet: e.snippet,
            unseen: e.unseen,
            received_at: e.received_at,
            coalesced: 0,
        }
    }
}

impl PushContent {
    /// Coalescing: a still-pending push absorbs a newer event. The newer event's content
    /// wins; its unseen count wins when it has one (otherwise the last known count stays).
    pub fn absorb(self, newer: PushContent) -> PushContent {
        PushContent {
            unseen: newer.unseen.or(self.unseen),
            coalesced: self.coalesced + 1 + newer.coalesced,
            ..newer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOCK: &str = r#"{"user":"3@2","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":42,"from":"=?utf-8?q?=C3=84?= <alice@example.org>","subject":"Test","snippet":"Hey guys","unseen":2}"#;

    #[test]
    fn parses_the_stock_ox_body() {
        let e = parse_notification(STOCK.as_bytes(), Some("ev1".into()), 7).unwrap();
        assert_eq!(e.user, "3@2");
        assert_eq!(e.folder, "INBOX");
        assert_eq!(e.uidvalidity, 1_655_200_000);
        assert_eq!(e.uid, 42);
        assert_eq!(e.unseen, Some(2));
        assert_eq!(
            e.from.as_deref(),
            Some("=?utf-8?q?=C3=84?= <alice@example.org>")
        );
        assert_eq!(e.event_id.as_deref(), Some("ev1"));
        assert_eq!(e.received_at, 7);
    }

    #[test]
    fn a_bad_body_names_its_field() {
        // The rules themselves are dovepush-protocol's (and tested there).
        let body = r#"{"user":"a","event":"messageNew","folder":3}"#;
        let err = parse_notification(body.as_bytes(), None, 0).unwrap_err();
        assert_eq!(err.field, "folder");
    }

    #[test]
    fn absorb_keeps_newest_content_and_count() {
        let mk = |uid, unseen| PushContent {
            event_id: Some(format!("e{uid}")),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid,
            from: None,
            subject: Some(format!("s{uid}")),
            snippet: None,
            unseen,
            received_at: uid as i64,
            coalesced: 0,
        };
        let merged = mk(1, Some(1)).absorb(mk(2, Some(2))).absorb(mk(3, None));
        assert_eq!(merged.uid, 3);
        assert_eq!(merged.subject.as_deref(), Some("s3"));
        assert_eq!(merged.unseen, Some(2));
        assert_eq!(merged.coalesced, 2);
        let json = serde_json::to_string(&merged).unwrap();
        assert_eq!(serde_json::from_str::<PushContent>(&json).unwrap(), merged);
    }
}
