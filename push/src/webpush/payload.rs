//! The Web Push message (the plaintext the browser's service worker gets, end-to-end
//! encrypted): JSON with an `event` word first, so that later kinds (a badge-only update
//! when mail is read elsewhere) fit without a new format, and the privacy modes:
//!
//! * full: `event`, `user`, `folder`, `uid`, `uidvalidity`, `unseen`, `event_id`,
//!   `notification {title: sender, body: subject}` and `snippet`;
//! * generic: the same without `user`, sender, subject and snippet: `notification {title:
//!   generic_text}`;
//! * silent: counts only: `event` and `unseen`.
//!
//! A push service must take 4096 bytes of encrypted body (RFC 8030 §7.2); one aes128gcm
//! record adds [`OVERHEAD`] bytes, so the JSON is cut to [`MAX_PLAINTEXT`]: the snippet
//! first, then the subject, then the sender, at character boundaries with `…`.

use serde::Serialize;

use crate::content::{decode_subject, fit_to_limit, sender_display_name};
use crate::model::{Notification, Privacy};

/// The encrypted body's limit.
pub(crate) const MAX_BODY: usize = 4096;
/// What one aes128gcm record adds: the header (16-byte salt, 4-byte record size, key id
/// length, 65-byte key id), the 16-byte AEAD tag and the padding delimiter.
pub(crate) const OVERHEAD: usize = 16 + 4 + 1 + 65 + 16 + 1;
/// The plaintext's limit.
pub(crate) const MAX_PLAINTEXT: usize = MAX_BODY - OVERHEAD;
/// After a 413, the message is cut to fit this much encrypted body and sent once more.
pub(crate) const RETRY_BODY: usize = 2048;

/// The `event` of a new-mail message.
pub const EVENT_MESSAGE_NEW: &str = "messageNew";

#[derive(Serialize)]
struct Message<'a> {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    folder: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uidvalidity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unseen: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<Shown<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snippet: Option<&'a str>,
}

#[derive(Serialize)]
struct Shown<'a> {
    title: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    body: &'a str,
}

/// The message did not fit even with every text cut away.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooLarge;

/// The plaintext for `n` in `privacy` mode, at most `limit` bytes.
pub(crate) fn build(
    n: &Notification,
    privacy: Privacy,
    generic_text: &str,
    limit: usize,
) -> Result<Vec<u8>, TooLarge> {
    let base = Message {
        event: EVENT_MESSAGE_NEW,
        user: None,
        folder: Some(&n.folder),
        uid: Some(n.uid),
        uidvalidity: Some(n.uidvalidity),
        unseen: n.unseen,
        event_id: n.event_id.as_deref(),
        notification: None,
        snippet: None,
    };
    match privacy {
        Privacy::Full => {
            let title = n
                .from
                .as_deref()
                .map(sender_display_name)
                .unwrap_or_default();
            let body = n.subject.as_deref().map(decode_subject).unwrap_or_default();
            let snippet = n.snippet.as_deref().unwrap_or_default().trim().to_owned();
            let mut texts = [snippet, body, title];
            fit_to_limit(&mut texts, limit, |t| {
                to_json(&Message {
                    user: Some(&n.user),
                    notification: Some(Shown {
                        title: &t[2],
                        body: &t[1],
                    }),
                    snippet: (!t[0].is_empty()).then_some(t[0].as_str()),
                    ..clone_base(&base)
                })
            })
            .ok_or(TooLarge)
        }
        Privacy::Generic => {
            let mut texts = [generic_text.to_owned()];
            fit_to_limit(&mut texts, limit, |t| {
                to_json(&Message {
                    notification: Some(Shown {
                        title: &t[0],
                        body: "",
                    }),
                    ..clone_base(&base)
                })
            })
            .ok_or(TooLarge)
        }
        Privacy::Silent => {
            let json = to_json(&Message {
                event: n.event_word(),
                user: None,
                folder: None,
                uid: None,
                uidvalidity: None,
                unseen: n.unseen,
                event_id: None,
                notification: None,
                snippet: None,
            });
            if json.len() <= limit {
                Ok(json)
            } else {
                Err(TooLarge)
            }
        }
    }
}

fn clone_base<'a>(m: &Message<'a>) -> Message<'a> {
    Message {
        event: m.event,
        user: m.user,
        folder: m.folder,
        uid: m.uid,
        uidvalidity: m.uidvalidity,
        unseen: m.unseen,
        event_id: m.event_id,
        notification: None,
        snippet: None,
    }
}

fn to_json(m: &Message<'_>) -> Vec<u8> {
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_vec(m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn note() -> Notification {
        Notification::for_tests()
    }

    fn parse(privacy: Privacy) -> Value {
        let bytes = build(&note(), privacy, "New mail", MAX_PLAINTEXT).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn the_three_privacy_modes() {
        assert_eq!(
            parse(Privacy::Full),
            json!({"event": "messageNew", "user": "alice", "folder": "INBOX", "uid": 42,
                   "uidvalidity": 7, "unseen": 3, "event_id": "ev1",
                   "notification": {"title": "Ärger", "body": "über"},
                   "snippet": "secret body"})
        );
        assert_eq!(
            parse(Privacy::Generic),
            json!({"event": "messageNew", "folder": "INBOX", "uid": 42, "uidvalidity": 7,
                   "unseen": 3, "event_id": "ev1", "notification": {"title": "New mail"}})
        );
        assert_eq!(
            parse(Privacy::Silent),
            json!({"event": "messageNew", "unseen": 3})
        );
        // The event word comes first: a service worker can switch on it.
        let raw = build(&note(), Privacy::Silent, "x", MAX_PLAINTEXT).unwrap();
        assert!(raw.starts_with(br#"{"event":"messageNew""#));
    }

    #[test]
    fn a_badge_update_says_badge_and_the_count_only() {
        let n = Notification {
            badge_only: true,
            unseen: Some(0),
            ..note()
        };
        let v: Value =
            serde_json::from_slice(&build(&n, Privacy::Silent, "x", MAX_PLAINTEXT).unwrap())
                .unwrap();
        assert_eq!(v, json!({"event": "badge", "unseen": 0}));
    }

    #[test]
    fn cuts_snippet_then_subject_then_sender() {
        assert_eq!(MAX_PLAINTEXT, 3993);
        let mut n = note();
        n.snippet = Some("s".repeat(5000));
        n.subject = Some("€".repeat(100));
        let v: Value =
            serde_json::from_slice(&build(&n, Privacy::Full, "x", MAX_PLAINTEXT).unwrap()).unwrap();
        assert!(v["snippet"].as_str().unwrap().ends_with('…'));
        assert_eq!(v["notification"]["body"], "€".repeat(100));
        n.subject = Some("日本語".repeat(2000));
        n.from = Some("😀".repeat(2000));
        let bytes = build(&n, Privacy::Full, "x", MAX_PLAINTEXT).unwrap();
        assert!(bytes.len() <= MAX_PLAINTEXT && bytes.len() > MAX_PLAINTEXT - 8);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.get("snippet").is_none(), "{v}");
        assert!(v["notification"]["title"].as_str().unwrap().ends_with('…'));
        let shorter = build(&n, Privacy::Full, "x", RETRY_BODY - OVERHEAD).unwrap();
        assert!(shorter.len() <= RETRY_BODY - OVERHEAD);
    }

    #[test]
    fn a_huge_folder_cannot_fit() {
        let mut n = note();
        n.folder = "f".repeat(5000);
        assert_eq!(build(&n, Privacy::Full, "x", MAX_PLAINTEXT), Err(TooLarge));
        // Silent mode names no folder.
        assert!(build(&n, Privacy::Silent, "x", MAX_PLAINTEXT).is_ok());
    }
}
