//! New-mail events: the ox notification body → [`NewMailEvent`], and the
//! [`PushContent`] an outbox item carries (with the coalescing rule).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::FieldError;

/// Longest accepted `X-Dovepush-Event-Id`.
pub const MAX_EVENT_ID_LEN: usize = 128;

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

/// Parses an ox `http-notify` body. Unknown keys are ignored (the ox format may grow);
/// the OX middleware's `unread` is accepted in place of `unseen`.
pub fn parse_notification(
    body: &[u8],
    event_id: Option<String>,
    received_at: i64,
) -> Result<NewMailEvent, FieldError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("body", format!("not valid JSON: {e}")))?;
    // Fields are taken out of the parsed object, so their strings move instead of
    // being copied.
    let Value::Object(mut obj) = value else {
        return Err(FieldError::new("body", "expected a JSON object"));
    };
    let user = required_string(&mut obj, "user")?;
    if user.is_empty() {
        return Err(FieldError::new("user", "must not be empty"));
    }
    let event = required_string(&mut obj, "event")?;
    if event != "messageNew" && event != "MessageNew" {
        return Err(FieldError::new(
            "event",
            format!("unsupported event {event:?}: only \"messageNew\" is handled"),
        ));
    }
    let folder = required_string(&mut obj, "folder")?;
    if folder.is_empty() {
        return Err(FieldError::new("folder", "must not be empty"));
    }
    let uidvalidity = required_u32(&obj, "imap-uidvalidity")?;
    let uid = required_u32(&obj, "imap-uid")?;
    let unseen = match optional_u32(&obj, "unseen")? {
        Some(n) => Some(n),
        None => optional_u32(&obj, "unread")?,
    };
    Ok(NewMailEvent {
        event_id,
        user,
        folder,
        uidvalidity,
        uid,
        from: optional_string(&mut obj, "from")?,
        subject: optional_string(&mut obj, "subject")?,
        snippet: optional_string(&mut obj, "snippet")?,
        unseen,
        received_at,
    })
}

/// Checks an `X-Dovepush-Event-Id` value: 1-128 visible ASCII characters.
pub fn validate_event_id(raw: &[u8]) -> Result<String, FieldError> {
    if raw.is_empty() || raw.len() > MAX_EVENT_ID_LEN || !raw.iter().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            "X-Dovepush-Event-Id",
            format!("must be 1-{MAX_EVENT_ID_LEN} visible ASCII characters"),
        ));
    }
    Ok(String::from_utf8_lossy(raw).into_owned())
}

fn required_string(obj: &mut Map<String, Value>, key: &str) -> Result<String, FieldError> {
    match obj.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(FieldError::new(key, "expected a string")),
        None => Err(FieldError::new(key, "missing")),
    }
}

fn optional_string(obj: &mut Map<String, Value>, key: &str) -> Result<Option<String>, FieldError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(key, "expected a string")),
    }
}

fn optional_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| FieldError::new(key, "expected an unsigned 32-bit integer")),
    }
}

fn required_u32(obj: &Map<String, Value>, key: &str) -> Result<u32, FieldError> {
    optional_u32(obj, key)?.ok_or_else(|| FieldError::new(key, "missing"))
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
    fn accepts_both_event_spellings_and_optional_fields_missing() {
        let body = r#"{"user":"a","event":"MessageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":0,"unread":5,"extra":true}"#;
        let e = parse_notification(body.as_bytes(), None, 0).unwrap();
        assert_eq!(e.uid, 0);
        assert_eq!(e.unseen, Some(5));
        assert_eq!(e.from, None);
    }

    #[test]
    fn names_the_bad_field() {
        let cases: &[(&str, &str)] = &[
            ("not json", "body"),
            ("[1]", "body"),
            (r#"{"event":"messageNew"}"#, "user"),
            (r#"{"user":"a","event":"flagsSet"}"#, "event"),
            (r#"{"user":"a","event":"messageNew","folder":3}"#, "folder"),
            (
                r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":-1,"imap-uid":1}"#,
                "imap-uidvalidity",
            ),
            (
                r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":1}"#,
                "imap-uid",
            ),
            (
                r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":4294967296}"#,
                "imap-uid",
            ),
            (
                r#"{"user":"a","event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1,"subject":5}"#,
                "subject",
            ),
            (
                r#"{"user":"","event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1}"#,
                "user",
            ),
        ];
        for (body, field) in cases {
            let err = parse_notification(body.as_bytes(), None, 0).unwrap_err();
            assert_eq!(err.field, *field, "{body}");
        }
    }

    #[test]
    fn event_ids_are_checked() {
        assert_eq!(validate_event_id(b"abc-123").unwrap(), "abc-123");
        assert!(validate_event_id(b"").is_err());
        assert!(validate_event_id(b"has space").is_err());
        assert!(validate_event_id(&[b'a'; 129]).is_err());
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
