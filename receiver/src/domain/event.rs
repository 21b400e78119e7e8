//! Events: the ox notification body → [`NewMailEvent`], and the [`PushContent`] an
//! outbox item carries (with the coalescing rule).
//!
//! Besides new mail (`messageNew`), the dovepush plugin in imap reports what changed a
//! folder's unseen count (`messageRead`, `messageExpunge`, `messageAppend`, with the new count). Those
//! become silent badge updates ([`PushContent::badge_only`]): a burst of them, or one
//! arriving while a new-mail alert is still pending, is folded into one push with the
//! latest count.

use dovepush_protocol::Notification;
use serde::{Deserialize, Serialize};

use super::FieldError;

pub use dovepush_protocol::notification::{validate_event_id, EventKind, MAX_EVENT_ID_LEN};

/// A validated notification: new mail, or (`kind` `messageRead`/`messageExpunge`/`messageAppend`) a
/// changed unseen count.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMailEvent {
    /// From `X-Dovepush-Event-Id`; the stock ox driver sends none (no de-duplication then).
    pub event_id: Option<String>,
    pub kind: EventKind,
    /// The login the event is for (with `user_from_metadata`: the value the receiver wrote).
    pub user: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub snippet: Option<String>,
    pub unseen: Option<u32>,
    /// Badge events: when Dovecot committed the change (`event-time-ms`).
    pub time_ms: Option<u64>,
    /// Milliseconds since the Unix epoch, when the receiver accepted it.
    pub received_at: i64,
}

impl NewMailEvent {
    /// The event a parsed notification describes; its strings move, nothing is copied.
    pub fn from_notification(n: Notification, event_id: Option<String>, received_at: i64) -> Self {
        NewMailEvent {
            event_id,
            kind: n.event,
            user: n.user,
            folder: n.folder,
            uidvalidity: n.uidvalidity,
            uid: n.uid,
            from: n.from,
            subject: n.subject,
            snippet: n.snippet,
            unseen: n.unseen,
            time_ms: n.time_ms,
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
    /// Only the unseen count changed (mail read or expunged somewhere): a silent badge
    /// update, whatever the device's privacy mode.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub badge_only: bool,
    /// A badge update's `event-time-ms`: of two crossing on the way, the later change's
    /// count is kept.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub time_ms: Option<u64>,
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
            badge_only: e.kind.is_badge_update(),
            time_ms: e.time_ms,
        }
    }
}

impl PushContent {
    /// Coalescing: a still-pending push absorbs a newer event. The newer event's content
    /// wins; its unseen count wins when it has one (otherwise the last known count stays).
    /// A badge update does not replace a pending new-mail alert: the alert stays and
    /// takes the newer count, so a mail read right after it arrived is still announced
    /// once, with the right badge. Of two badge updates, the one whose change Dovecot
    /// committed later wins, whichever arrived last.
    pub fn absorb(self, newer: PushContent) -> PushContent {
        let coalesced = self.coalesced + 1 + newer.coalesced;
        let crossed = matches!((self.time_ms, newer.time_ms), (Some(a), Some(b)) if b < a);
        if newer.badge_only && self.badge_only && crossed {
            return PushContent { coalesced, ..self };
        }
        if newer.badge_only && !self.badge_only {
            return PushContent {
                unseen: newer.unseen.or(self.unseen),
                coalesced,
                ..self
            };
        }
        PushContent {
            unseen: newer.unseen.or(self.unseen),
            coalesced,
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
            badge_only: false,
            time_ms: None,
        };
        let merged = mk(1, Some(1)).absorb(mk(2, Some(2))).absorb(mk(3, None));
        assert_eq!(merged.uid, 3);
        assert_eq!(merged.subject.as_deref(), Some("s3"));
        assert_eq!(merged.unseen, Some(2));
        assert_eq!(merged.coalesced, 2);
        let json = serde_json::to_string(&merged).unwrap();
        assert_eq!(serde_json::from_str::<PushContent>(&json).unwrap(), merged);
    }

    #[test]
    fn badge_events_parse_and_become_badge_only_content() {
        let body = r#"{"user":"a","event":"messageRead","folder":"INBOX","imap-uidvalidity":1,"imap-uid":9,"unseen":4}"#;
        let e = parse_notification(body.as_bytes(), Some("r1".into()), 1).unwrap();
        assert_eq!(e.kind, EventKind::MessageRead);
        let content = PushContent::from(e);
        assert!(content.badge_only);
        assert_eq!(content.unseen, Some(4));
        let json = serde_json::to_string(&content).unwrap();
        assert!(json.contains("\"badge_only\":true"), "{json}");
        let fresh = PushContent::from(parse_notification(STOCK.as_bytes(), None, 0).unwrap());
        assert!(!fresh.badge_only);
        assert!(
            !serde_json::to_string(&fresh)
                .unwrap()
                .contains("badge_only"),
            "items written before badges read back the same"
        );
    }

    #[test]
    fn a_burst_of_badge_updates_keeps_the_latest_count_and_an_alert_stays_an_alert() {
        let badge = |unseen: u32| PushContent {
            event_id: Some(format!("b{unseen}")),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid: 0,
            from: None,
            subject: None,
            snippet: None,
            unseen: Some(unseen),
            received_at: 0,
            coalesced: 0,
            badge_only: true,
            time_ms: Some(100 - u64::from(unseen)),
        };
        let burst = badge(5).absorb(badge(4)).absorb(badge(2));
        assert!(burst.badge_only);
        assert_eq!(burst.unseen, Some(2));
        assert_eq!(burst.coalesced, 2);
        // Crossed on the way: the later change's count stays.
        let crossed = badge(2).absorb(badge(4));
        assert_eq!(crossed.unseen, Some(2));
        assert_eq!(crossed.coalesced, 1);

        let alert = PushContent::from(parse_notification(STOCK.as_bytes(), None, 0).unwrap());
        let read_soon_after = alert.clone().absorb(badge(1));
        assert!(!read_soon_after.badge_only);
        assert_eq!(read_soon_after.subject, alert.subject);
        assert_eq!(read_soon_after.unseen, Some(1));
        let new_after_badge = badge(0).absorb(alert.clone());
        assert!(!new_after_badge.badge_only);
        assert_eq!(new_after_badge.unseen, Some(2));
    }
}
