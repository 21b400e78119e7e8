//! What the plugin hands the sender service, and the service's acknowledgements.
//!
//! A [`Record`] is one event: its id, the Dovecot user it was delivered to, the identity
//! the user's METADATA subscription names (`subscriber`), when it was made, and the ox
//! body (whose `user` is the Dovecot username). It names no endpoint: the service sends
//! it to every endpoint its own, root-owned configuration names, with the credentials
//! from there, so that neither a mail process nor a local user chooses where events go
//! (and `dovepush_url` with its password can live in a file only root reads). The
//! service keeps its own copies of unsent events as records for one endpoint
//! ([`Record::endpoint`], [`Record::for_endpoint`]).
//!
//! A record travels as one line of compact JSON on the service's unix socket, or as the
//! content of one file in its drop spool; records are at most [`MAX_RECORD_BYTES`].
//!
//! On the socket both sides count records: the n-th line a connection carries is record
//! n (from 1). The service answers `+n\n` once record n is no longer the plugin's
//! concern (sent, refused for good, or kept in the service's own spool); the plugin keeps
//! each record until then, and drops the ones still unanswered into the drop spool if
//! the service goes away.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::notification::Notification;

/// The version this code writes and reads.
pub const RECORD_VERSION: u32 = 2;
/// Largest record, as a line (without its newline) or a file.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Longest event id a record may carry (ids are also file names).
pub const MAX_RECORD_ID_LEN: usize = 64;

/// One event (for every endpoint, or, in the service's queue, for one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// [`RECORD_VERSION`].
    pub v: u32,
    /// The event id (`X-Dovepush-Event-Id`), the same for every endpoint of one event:
    /// letters, digits, `-` and `_`.
    pub id: String,
    /// The Dovecot username the mail was delivered to (log lines, and the check of who
    /// may speak for whom).
    pub user: String,
    /// The `user=` of the METADATA subscription: the body's `user` for endpoints with
    /// `user_from_metadata`.
    pub subscriber: String,
    /// When the mail was delivered, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub body: Notification,
    /// Only in the service's own queue: the one endpoint (URL without credentials) this
    /// copy is for. Records from mail processes never name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(pub String);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecordError {}

impl Record {
    /// An event record of the current version (for every endpoint).
    pub fn new(
        id: String,
        user: String,
        subscriber: String,
        created_ms: u64,
        body: Notification,
    ) -> Record {
        Record {
            v: RECORD_VERSION,
            id,
            user,
            subscriber,
            created_ms,
            body,
            endpoint: None,
        }
    }

    /// The copy of this event for one endpoint: its body names the subscriber when
    /// the endpoint has `user_from_metadata`, the Dovecot user otherwise.
    pub fn for_endpoint(&self, endpoint: &str, user_from_metadata: bool) -> Record {
        let mut copy = self.clone();
        copy.body.user = if user_from_metadata {
            self.subscriber.clone()
        } else {
            self.user.clone()
        };
        copy.endpoint = Some(endpoint.to_string());
        copy
    }

    /// Compact JSON (no newline inside: JSON escapes control characters).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a record always serialises")
    }

    /// Parse and check one record (a line without its newline, or a file's content).
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError(format!(
                "{} bytes is more than the {MAX_RECORD_BYTES} a record may have",
                bytes.len()
            )));
        }
        let record: Record = serde_json::from_slice(bytes)
            .map_err(|e| RecordError(format!("not a record ({e})")))?;
        record.check()?;
        Ok(record)
    }

    fn check(&self) -> Result<(), RecordError> {
        if self.v != RECORD_VERSION {
            return Err(RecordError(format!("unknown record version {}", self.v)));
        }
        if self.id.is_empty()
            || self.id.len() > MAX_RECORD_ID_LEN
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RecordError(format!(
                "event id {:?} is not 1-{MAX_RECORD_ID_LEN} letters, digits, - or _",
                self.id
            )));
        }
        if self.user.is_empty() || self.user.chars().any(char::is_control) {
            return Err(RecordError(format!(
                "user {:?} is not a username",
                self.user
            )));
        }
        if self.endpoint.as_deref().is_some_and(str::is_empty) {
            return Err(RecordError("the endpoint is empty".into()));
        }
        Ok(())
    }

    /// The record's file name in a spool: oldest first when sorted, and the same for the
    /// same event (and endpoint) whoever writes it, so that one event cannot be queued
    /// twice.
    pub fn file_name(&self) -> String {
        match &self.endpoint {
            None => format!("{:013}-{}.json", self.created_ms, self.id),
            Some(endpoint) => format!(
                "{:013}-{}-{:016x}.json",
                self.created_ms,
                self.id,
                fnv1a(endpoint.as_bytes())
            ),
        }
    }
}

/// FNV-1a, 64 bits: a stable (across builds and versions) short name for an endpoint.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Append the acknowledgement of record `seq` to `out`.
pub fn encode_ack(seq: u64, out: &mut Vec<u8>) {
    out.push(b'+');
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b'\n');
}

/// Reads acknowledgements from a byte stream that may split them anywhere.
#[derive(Debug, Default)]
pub struct AckReader {
    partial: Vec<u8>,
}

impl AckReader {
    /// The sequence numbers completed by `bytes`; an error on anything but acks.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<u64>, RecordError> {
        let mut acks = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                if self.partial.len() > 24 {
                    return Err(RecordError("an acknowledgement line is too long".into()));
                }
                self.partial.push(b);
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            let seq = line
                .strip_prefix(b"+")
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    RecordError(format!(
                        "{:?} is not an acknowledgement",
                        String::from_utf8_lossy(&line)
                    ))
                })?;
            acks.push(seq);
        }
        Ok(acks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::EventKind;

    pub(crate) fn record(id: &str) -> Record {
        Record::new(
            id.into(),
            "alice@example.com".into(),
            "alice".into(),
            1_700_000_000_000,
            Notification {
                user: "alice@example.com".into(),
                event: EventKind::MessageNew,
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: 7,
                from: Some("a\nb".into()),
                subject: None,
                snippet: None,
                unseen: Some(1),
                time_ms: None,
            },
        )
    }

    #[test]
    fn round_trip_on_one_line() {
        let r = record("0123abcd");
        let text = r.encode();
        assert!(!text.contains('\n'));
        assert!(
            !text.contains("endpoint"),
            "an event record names no endpoint"
        );
        assert_eq!(Record::decode(text.as_bytes()).unwrap(), r);
        let copy = r.for_endpoint("http://h/notify", false);
        assert_eq!(Record::decode(copy.encode().as_bytes()).unwrap(), copy);
    }

    #[test]
    fn copies_for_endpoints_name_the_right_user() {
        let r = record("e1");
        let plain = r.for_endpoint("http://a/notify", false);
        let metadata = r.for_endpoint("http://b/notify", true);
        assert_eq!(plain.body.user, "alice@example.com");
        assert_eq!(metadata.body.user, "alice");
        assert_eq!(metadata.endpoint.as_deref(), Some("http://b/notify"));
        assert_eq!(metadata.id, r.id);
    }

    #[test]
    fn bad_records_are_refused_with_a_reason() {
        let good = record("x1");
        let cases: Vec<(String, &str)> = vec![
            ("nope".into(), "not a record"),
            ("{\"v\":2}".into(), "not a record"),
            (good.encode().replace("\"v\":2", "\"v\":1"), "version"),
            (good.encode().replace("\"x1\"", "\"../etc\""), "event id"),
            (good.encode().replace("\"x1\"", "\"\""), "event id"),
            (
                good.encode().replace(
                    "\"user\":\"alice@example.com\",\"subscriber\"",
                    "\"user\":\"\",\"subscriber\"",
                ),
                "username",
            ),
            (
                good.encode().replace("}}", "},\"endpoint\":\"\"}"),
                "endpoint",
            ),
            (
                good.encode().replace("{\"v\":2,", "{\"v\":2,\"extra\":1,"),
                "not a record",
            ),
            (" ".repeat(MAX_RECORD_BYTES + 1), "bytes is more"),
        ];
        for (text, why) in cases {
            let err = Record::decode(text.as_bytes()).unwrap_err();
            assert!(err.0.contains(why), "{text:.80}: {err}");
        }
    }

    #[test]
    fn file_names_sort_by_time_and_name_the_event_and_endpoint() {
        assert_eq!(record("aaa").file_name(), "1700000000000-aaa.json");
        let a = record("aaa").for_endpoint("http://127.0.0.1:9/notify", false);
        let b = record("aaa").for_endpoint("http://127.0.0.1:10/notify", false);
        assert_ne!(a.file_name(), b.file_name());
        assert_eq!(
            a.file_name(),
            record("aaa")
                .for_endpoint("http://127.0.0.1:9/notify", true)
                .file_name()
        );
        assert!(a.file_name().starts_with("1700000000000-aaa-"));
        let mut older = record("zzz");
        older.created_ms -= 1;
        assert!(older.file_name() < a.file_name());
        // Stable across builds: a spool outlives the binary that wrote it.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn acks_split_anywhere() {
        let mut out = Vec::new();
        for seq in [1, 2, 300] {
            encode_ack(seq, &mut out);
        }
        let mut reader = AckReader::default();
        let (first, rest) = out.split_at(4);
        let mut seen = reader.feed(first).unwrap();
        seen.extend(reader.feed(rest).unwrap());
        assert_eq!(seen, [1, 2, 300]);
        assert!(reader.feed(b"junk\n").is_err());
        assert!(AckReader::default().feed(&[b'+'; 40]).is_err());
    }
}
