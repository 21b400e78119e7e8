//! The ox driver's notification body and the event-id header.
//!
//! Keys, order and types follow Dovecot's ox driver (2.3 and 2.4 alike): `user`,
//! `event`, `folder`, `imap-uidvalidity`, `imap-uid`, then `from`, `subject`, `snippet`
//! and `unseen` when known. Besides the ox driver's `messageNew`, dovepush has three
//! event kinds of its own that report a changed unseen count
//! ([`EventKind::MessageRead`], [`EventKind::MessageExpunge`],
//! [`EventKind::MessageAppend`]); an endpoint gets them only when it asks for them
//! ([`EventSet`], the `dovepush_events` setting), so the stock ox receiver never does.
//!
//! Serialising a [`Notification`] gives the ox driver's body byte for byte (compact
//! JSON, keys in that order); [`Notification::from_json`] accepts the stock driver's
//! bodies and the OX middleware's `unread` in place of `unseen`, and
//! names the field at fault when it refuses one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The request header carrying an event's id: the same for every endpoint and every
/// retry or replay of one event, so that a receiver can drop repeats.
pub const EVENT_ID_HEADER: &str = "X-Dovepush-Event-Id";
/// Longest accepted event id.
pub const MAX_EVENT_ID_LEN: usize = 128;
/// At most this many bytes of `from` and of `subject` are sent (cut at a character
/// boundary), so that no body nears a receiver's 64 KiB limit.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Snippets are at most 200 characters (Dovecot's own limit).
pub const MAX_SNIPPET_CHARS: usize = 200;

/// What happened, in the ox driver's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A mail was delivered (the ox driver's one event).
    #[serde(rename = "messageNew", alias = "MessageNew")]
    MessageNew,
    /// `\Seen` was set or cleared on mails of the folder (one IMAP command's changes in
    /// one event): `unseen` is the count after the change, `imap-uid` the highest UID
    /// changed. dovepush only.
    #[serde(rename = "messageRead", alias = "MessageRead")]
    MessageRead,
    /// Mails were expunged from the folder or moved out of it (one IMAP command's in one
    /// event): `unseen` is the count after the change, `imap-uid` the highest UID
    /// expunged. dovepush only.
    #[serde(rename = "messageExpunge", alias = "MessageExpunge")]
    MessageExpunge,
    /// Unseen mails were added to the folder other than by a delivery: `APPEND`, `COPY`
    /// or `MOVE` into it (one IMAP command's in one event; Dovecot's own name for such
    /// saves): `unseen` is the count after the change, `imap-uid` the UID of the last
    /// unseen mail added. dovepush only.
    #[serde(rename = "messageAppend", alias = "MessageAppend")]
    MessageAppend,
}

impl EventKind {
    /// Every kind, in the order [`EventSet`] lists them.
    pub const ALL: [EventKind; 4] = [
        EventKind::MessageNew,
        EventKind::MessageRead,
        EventKind::MessageExpunge,
        EventKind::MessageAppend,
    ];

    /// The body's (and the settings') spelling: `messageNew`, `messageRead`,
    /// `messageExpunge`, `messageAppend`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::MessageNew => "messageNew",
            EventKind::MessageRead => "messageRead",
            EventKind::MessageExpunge => "messageExpunge",
            EventKind::MessageAppend => "messageAppend",
        }
    }

    /// A kind by name; the ox driver's capitalised spelling (`MessageNew`) is accepted
    /// too.
    pub fn parse(name: &str) -> Option<EventKind> {
        match name {
            "messageNew" | "MessageNew" => Some(EventKind::MessageNew),
            "messageRead" | "MessageRead" => Some(EventKind::MessageRead),
            "messageExpunge" | "MessageExpunge" => Some(EventKind::MessageExpunge),
            "messageAppend" | "MessageAppend" => Some(EventKind::MessageAppend),
            _ => None,
        }
    }

    /// Whether this kind only updates the badge (no new mail to show).
    pub fn is_badge_update(self) -> bool {
        self != EventKind::MessageNew
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The event kinds an endpoint takes (`dovepush_events`). The default is `messageNew`
/// alone: what the stock ox receiver understands.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventSet(u8);

impl Default for EventSet {
    fn default() -> Self {
        EventSet::only(EventKind::MessageNew)
    }
}

impl EventSet {
    /// No kind at all.
    pub const NONE: EventSet = EventSet(0);

    pub fn only(kind: EventKind) -> EventSet {
        EventSet(kind.bit())
    }

    pub fn with(self, kind: EventKind) -> EventSet {
        EventSet(self.0 | kind.bit())
    }

    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// Whether it has a kind besides `messageNew`.
    pub fn has_badge_updates(self) -> bool {
        EventKind::ALL
            .into_iter()
            .any(|k| k.is_badge_update() && self.contains(k))
    }

    /// Space-separated kind names (commas are taken as spaces too, so that the ox
    /// line's `events=messageNew,messageRead` reads the same); an unknown name is an
    /// error naming it. An empty list is an error: an endpoint that takes nothing is
    /// one to remove.
    pub fn parse(list: &str) -> Result<EventSet, String> {
        let mut set = EventSet::NONE;
        for name in list
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|n| !n.is_empty())
        {
            let kind = EventKind::parse(name).ok_or_else(|| {
                format!(
                    "unknown event {name:?} (expected messageNew, messageRead, \
                     messageExpunge or messageAppend)"
                )
            })?;
            set = set.with(kind);
        }
        if set == EventSet::NONE {
            return Err(
                "no event named (expected messageNew, messageRead, messageExpunge \
                 or messageAppend)"
                    .into(),
            );
        }
        Ok(set)
    }
}

impl fmt::Display for EventSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = EventKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .map(EventKind::as_str)
            .collect();
        f.write_str(&names.join(" "))
    }
}

impl fmt::Debug for EventSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventSet({self})")
    }
}

/// One ox notification body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawNotification")]
pub struct Notification {
    /// The Dovecot username, or with `user_from_metadata` the METADATA's `user=` value.
    pub user: String,
    pub event: EventKind,
    pub folder: String,
    #[serde(rename = "imap-uidvalidity")]
    pub uidvalidity: u32,
    #[serde(rename = "imap-uid")]
    pub uid: u32,
    /// Raw (RFC 2047-encoded) header values, as the ox driver sends them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snippet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen: Option<u32>,
    /// dovepush's badge events only: when Dovecot committed the change (milliseconds
    /// since the Unix epoch, the mail host's clock), so that a receiver keeps the newest
    /// count when two events cross on the way.
    #[serde(rename = "event-time-ms", skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
}

/// A body field that could not be accepted, with a reason for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The JSON key (or `body` when the document itself is wrong).
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// The body as sent, every key optional so that a missing one is named; unknown keys
/// are ignored (the ox format may grow).
#[derive(Deserialize)]
struct RawNotification {
    user: Option<String>,
    event: Option<String>,
    folder: Option<String>,
    #[serde(rename = "imap-uidvalidity")]
    uidvalidity: Option<u32>,
    #[serde(rename = "imap-uid")]
    uid: Option<u32>,
    from: Option<String>,
    subject: Option<String>,
    snippet: Option<String>,
    unseen: Option<u32>,
    /// The OX middleware's name for `unseen`.
    unread: Option<u32>,
    #[serde(rename = "event-time-ms")]
    time_ms: Option<u64>,
}

impl TryFrom<RawNotification> for Notification {
    type Error = FieldError;

    fn try_from(raw: RawNotification) -> Result<Self, FieldError> {
        let missing = |field: &str| FieldError::new(field, "missing");
        let user = raw.user.ok_or_else(|| missing("user"))?;
        if user.is_empty() {
            return Err(FieldError::new("user", "must not be empty"));
        }
        let event = match raw.event.as_deref() {
            None => return Err(missing("event")),
            Some(name) => EventKind::parse(name).ok_or_else(|| {
                FieldError::new(
                    "event",
                    format!(
                        "unsupported event {name:?}: \"messageNew\", \"messageRead\", \
                         \"messageExpunge\" and \"messageAppend\" are handled"
                    ),
                )
            })?,
        };
        let folder = raw.folder.ok_or_else(|| missing("folder"))?;
        if folder.is_empty() {
            return Err(FieldError::new("folder", "must not be empty"));
        }
        let unseen = raw.unseen.or(raw.unread);
        if event.is_badge_update() && unseen.is_none() {
            return Err(FieldError::new(
                "unseen",
                format!("missing: a {event} event carries the unseen count"),
            ));
        }
        Ok(Notification {
            user,
            event,
            folder,
            uidvalidity: raw.uidvalidity.ok_or_else(|| missing("imap-uidvalidity"))?,
            uid: raw.uid.ok_or_else(|| missing("imap-uid"))?,
            from: raw.from,
            subject: raw.subject,
            snippet: raw.snippet,
            unseen,
            time_ms: raw.time_ms,
        })
    }
}

impl Notification {
    /// Parse a body, naming the field at fault.
    pub fn from_json(body: &[u8]) -> Result<Notification, FieldError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed: Result<RawNotification, _> = serde_path_to_error::deserialize(&mut de);
        let raw = match parsed {
            Ok(raw) => raw,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                // A key of the top-level object, or the document itself (an array's
                // elements have paths such as `[0]`).
                let top_level = path == "." || path.is_empty() || path.starts_with('[');
                let field = if top_level || inner.is_syntax() || inner.is_eof() {
                    "body".to_string()
                } else {
                    path
                };
                let message = if field == "body" {
                    if inner.classify() == serde_json::error::Category::Data {
                        format!("expected a JSON object ({inner})")
                    } else {
                        format!("not valid JSON: {inner}")
                    }
                } else {
                    strip_position(&inner.to_string())
                };
                return Err(FieldError::new(field, message));
            }
        };
        de.end()
            .map_err(|e| FieldError::new("body", format!("not valid JSON: {e}")))?;
        Notification::try_from(raw)
    }

    /// The ox-compatible body: compact JSON, keys in the ox driver's order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a notification always serialises")
    }

    /// Cut `from` and `subject` to [`MAX_HEADER_BYTES`] and the snippet to
    /// [`MAX_SNIPPET_CHARS`] (senders apply this before sending).
    pub fn within_limits(mut self) -> Notification {
        for text in [&mut self.from, &mut self.subject].into_iter().flatten() {
            let end = cut_bytes(text, MAX_HEADER_BYTES).len();
            text.truncate(end);
        }
        if let Some(snippet) = &mut self.snippet {
            let end = cut_chars(snippet, MAX_SNIPPET_CHARS).len();
            snippet.truncate(end);
        }
        self
    }
}

/// serde_json appends " at line L column C" to data errors: the field name says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// Checks an event id: 1-128 visible ASCII characters.
pub fn validate_event_id(raw: &[u8]) -> Result<String, FieldError> {
    if raw.is_empty() || raw.len() > MAX_EVENT_ID_LEN || !raw.iter().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            EVENT_ID_HEADER,
            format!("must be 1-{MAX_EVENT_ID_LEN} visible ASCII characters"),
        ));
    }
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn cut_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The first `max` characters of `text`.
pub fn cut_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification() -> Notification {
        Notification {
            user: "3@2".into(),
            event: EventKind::MessageNew,
            folder: "INBOX".into(),
            uidvalidity: 1655200000,
            uid: 42,
            from: Some("=?utf-8?q?=C3=84?= <alice@example.org>".into()),
            subject: Some("Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?=".into()),
            snippet: Some("Hey guys This is only a test...".into()),
            unseen: Some(2),
            time_ms: None,
        }
    }

    const STOCK: &str = r#"{"user":"3@2","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":42,"from":"=?utf-8?q?=C3=84?= <alice@example.org>","subject":"Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?=","snippet":"Hey guys This is only a test...","unseen":2}"#;

    #[test]
    fn body_matches_the_ox_driver_byte_for_byte() {
        assert_eq!(notification().to_json(), STOCK);
        assert_eq!(
            Notification::from_json(STOCK.as_bytes()).unwrap(),
            notification()
        );
    }

    #[test]
    fn absent_fields_are_left_out() {
        let n = Notification {
            from: None,
            subject: None,
            snippet: None,
            unseen: None,
            ..notification()
        };
        assert_eq!(
            n.to_json(),
            r#"{"user":"3@2","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":42}"#
        );
    }

    #[test]
    fn escapes_and_folding_survive_a_round_trip() {
        let n = Notification {
            subject: Some("a \"quoted\"\n\tfolded \\ line\u{1}".into()),
            ..notification()
        };
        let back = Notification::from_json(n.to_json().as_bytes()).unwrap();
        assert_eq!(back.subject, n.subject);
    }

    #[test]
    fn limits_cut_at_character_boundaries() {
        let n = Notification {
            subject: Some("ä".repeat(1_000_000)),
            snippet: Some("ö".repeat(1000)),
            ..notification()
        }
        .within_limits();
        let subject = n.subject.unwrap();
        assert_eq!(subject.len(), MAX_HEADER_BYTES);
        assert!(subject.chars().all(|c| c == 'ä'));
        assert_eq!(n.snippet.unwrap().chars().count(), MAX_SNIPPET_CHARS);
        assert_eq!(cut_bytes("aäb", 2), "a");
        assert_eq!(cut_bytes("aäb", 3), "aä");
        assert_eq!(cut_chars("aäbc", 2), "aä");
        assert_eq!(cut_chars("ab", 5), "ab");
    }

    #[test]
    fn accepts_both_event_spellings_unread_and_unknown_keys() {
        let body = r#"{"user":"a","event":"MessageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":0,"unread":5,"extra":true,"from":null}"#;
        let n = Notification::from_json(body.as_bytes()).unwrap();
        assert_eq!(n.uid, 0);
        assert_eq!(n.unseen, Some(5));
        assert_eq!(n.from, None);
        assert_eq!(n.event, EventKind::MessageNew);
    }

    #[test]
    fn names_the_bad_field() {
        let cases: &[(&str, &str)] = &[
            ("not json", "body"),
            ("[1]", "body"),
            ("{} trailing", "body"),
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
            let err = Notification::from_json(body.as_bytes()).unwrap_err();
            assert_eq!(err.field, *field, "{body}: {err}");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn badge_events_round_trip_and_need_unseen() {
        let n = Notification {
            event: EventKind::MessageRead,
            uid: 7,
            from: None,
            subject: None,
            snippet: None,
            unseen: Some(0),
            time_ms: Some(1_764_000_000_123),
            ..notification()
        };
        let json = n.to_json();
        assert_eq!(
            json,
            r#"{"user":"3@2","event":"messageRead","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":7,"unseen":0,"event-time-ms":1764000000123}"#
        );
        assert_eq!(Notification::from_json(json.as_bytes()).unwrap(), n);
        for kind in [EventKind::MessageExpunge, EventKind::MessageAppend] {
            let other = json.replace("messageRead", kind.as_str());
            assert_eq!(
                Notification::from_json(other.as_bytes()).unwrap().event,
                kind
            );
        }
        let without = r#"{"user":"a","event":"messageRead","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1}"#;
        assert_eq!(
            Notification::from_json(without.as_bytes())
                .unwrap_err()
                .field,
            "unseen"
        );
    }

    #[test]
    fn event_sets_parse_and_print() {
        let default = EventSet::default();
        assert!(default.contains(EventKind::MessageNew));
        assert!(!default.has_badge_updates());
        let all = EventSet::parse("messageNew messageRead,MessageExpunge messageAppend").unwrap();
        assert!(EventKind::ALL.into_iter().all(|k| all.contains(k)));
        assert!(all.has_badge_updates());
        assert_eq!(
            all.to_string(),
            "messageNew messageRead messageExpunge messageAppend"
        );
        let read = EventSet::parse(" messageRead ").unwrap();
        assert!(!read.contains(EventKind::MessageNew));
        assert!(EventSet::parse("messageNew flagsSet")
            .unwrap_err()
            .contains("\"flagsSet\""));
        assert!(EventSet::parse(" ").is_err());
    }

    #[test]
    fn event_ids_are_checked() {
        assert_eq!(validate_event_id(b"abc-123").unwrap(), "abc-123");
        assert!(validate_event_id(b"").is_err());
        assert!(validate_event_id(b"has space").is_err());
        assert!(validate_event_id(&[b'a'; 129]).is_err());
    }
}
