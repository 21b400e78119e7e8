//! One new-mail event and its wire form: the ox driver's JSON body, key for key.
//!
//! Keys, order and types follow Dovecot 2.3's ox driver (`user`, `event`, `folder`,
//! `imap-uidvalidity`, `imap-uid`, then `from`, `subject`, `snippet`, `unseen` when
//! known). `from` and `subject` stay raw (RFC 2047-encoded, folding kept), as the ox
//! driver sends them; unlike it, they are cut at a character boundary so that no body
//! nears a receiver's 64 KiB limit.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// At most this many bytes of `from` and of `subject` are sent.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Snippets are at most 200 characters (Dovecot's own limit).
pub const MAX_SNIPPET_CHARS: usize = 200;
/// The request header carrying [`Event::id`].
pub const EVENT_ID_HEADER: &str = "X-Dovepush-Event-Id";

/// A delivered message, as facts copied out of Dovecot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Stable across retries and replays, so receivers can drop duplicates.
    pub id: String,
    pub user: String,
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub snippet: Option<String>,
    pub unseen: Option<u32>,
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

fn push_json_string(out: &mut String, value: &str) {
    out.push_str(&serde_json::to_string(value).expect("strings always serialize"));
}

impl Event {
    /// The ox-compatible JSON body, compact, keys in the ox driver's order.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"user\":");
        push_json_string(&mut out, &self.user);
        out.push_str(",\"event\":\"messageNew\",\"folder\":");
        push_json_string(&mut out, &self.folder);
        let _ = write!(
            out,
            ",\"imap-uidvalidity\":{},\"imap-uid\":{}",
            self.uid_validity, self.uid
        );
        if let Some(from) = &self.from {
            out.push_str(",\"from\":");
            push_json_string(&mut out, cut_bytes(from, MAX_HEADER_BYTES));
        }
        if let Some(subject) = &self.subject {
            out.push_str(",\"subject\":");
            push_json_string(&mut out, cut_bytes(subject, MAX_HEADER_BYTES));
        }
        if let Some(snippet) = &self.snippet {
            out.push_str(",\"snippet\":");
            push_json_string(&mut out, cut_chars(snippet, MAX_SNIPPET_CHARS));
        }
        if let Some(unseen) = self.unseen {
            let _ = write!(out, ",\"unseen\":{unseen}");
        }
        out.push('}');
        out
    }
}

/// Makes event ids unique across processes and restarts: a random per-process prefix
/// and a counter.
#[derive(Debug)]
pub struct EventIds {
    prefix: u64,
    counter: AtomicU64,
}

impl EventIds {
    pub fn new() -> Self {
        EventIds {
            prefix: random_u64(),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.prefix, n)
    }
}

impl Default for EventIds {
    fn default() -> Self {
        Self::new()
    }
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok()
    {
        return u64::from_ne_bytes(bytes);
    }
    // No /dev/urandom (chroot): time and pid still make collisions unlikely.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            id: "x".into(),
            user: "3@2".into(),
            folder: "INBOX".into(),
            uid_validity: 1655200000,
            uid: 42,
            from: Some("=?utf-8?q?=C3=84?= <alice@example.org>".into()),
            subject: Some("Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?=".into()),
            snippet: Some("Hey guys This is only a test...".into()),
            unseen: Some(2),
        }
    }

    #[test]
    fn body_matches_the_ox_driver_byte_for_byte() {
        assert_eq!(
            event().to_json(),
            r#"{"user":"3@2","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":42,"from":"=?utf-8?q?=C3=84?= <alice@example.org>","subject":"Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?=","snippet":"Hey guys This is only a test...","unseen":2}"#
        );
    }

    #[test]
    fn absent_fields_are_left_out() {
        let e = Event {
            from: None,
            subject: None,
            snippet: None,
            unseen: None,
            ..event()
        };
        assert_eq!(
            e.to_json(),
            r#"{"user":"3@2","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":42}"#
        );
    }

    #[test]
    fn escapes_and_folding() {
        let e = Event {
            subject: Some("a \"quoted\"\n\tfolded \\ line\u{1}".into()),
            ..event()
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["subject"], "a \"quoted\"\n\tfolded \\ line\u{1}");
    }

    #[test]
    fn huge_subject_is_cut_at_a_char_boundary() {
        let e = Event {
            subject: Some("ä".repeat(1_000_000)),
            ..event()
        };
        let body = e.to_json();
        assert!(body.len() < 10 * 1024, "{}", body.len());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let subject = v["subject"].as_str().unwrap();
        assert_eq!(subject.len(), MAX_HEADER_BYTES);
        assert!(subject.chars().all(|c| c == 'ä'));
    }

    #[test]
    fn cutting() {
        assert_eq!(cut_bytes("aäb", 2), "a");
        assert_eq!(cut_bytes("aäb", 3), "aä");
        assert_eq!(cut_chars("aäbc", 2), "aä");
        assert_eq!(cut_chars("ab", 5), "ab");
    }

    #[test]
    fn event_ids_are_unique() {
        let ids = EventIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert_ne!(EventIds::new().next(), a);
    }
}
