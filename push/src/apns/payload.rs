//! The APNs JSON payload for each privacy mode, kept under [`MAX_PAYLOAD`] bytes by cutting
//! the subject first and then the sender name.

use serde::Serialize;

use crate::content::{decode_subject, fit_to_limit, sender_display_name};
use crate::model::{Notification, Privacy};

/// APNs' payload limit for alert and background pushes.
pub(crate) const MAX_PAYLOAD: usize = 4096;

#[derive(Serialize)]
struct Payload<'a> {
    aps: Aps<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dovepush: Option<Meta<'a>>,
}

#[derive(Serialize)]
struct Aps<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<Alert<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    badge: Option<u32>,
    #[serde(rename = "thread-id", skip_serializing_if = "Option::is_none")]
    thread_id: Option<&'a str>,
    #[serde(rename = "mutable-content", skip_serializing_if = "Option::is_none")]
    mutable_content: Option<u8>,
    #[serde(rename = "content-available", skip_serializing_if = "Option::is_none")]
    content_available: Option<u8>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Alert<'a> {
    Text(&'a str),
    TitleBody { title: &'a str, body: &'a str },
}

#[derive(Serialize)]
struct Meta<'a> {
    folder: &'a str,
    uid: u32,
    uidvalidity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
}

/// The payload didn't fit even with every text cut away.
#[derive(Debug)]
pub(crate) struct TooLarge;

/// Builds the payload bytes for `n` in `privacy` mode.
pub(crate) fn build(
    n: &Notification,
    privacy: Privacy,
    generic_text: &str,
) -> Result<Vec<u8>, TooLarge> {
    match privacy {
        Privacy::Full => {
            let title = n
                .from
                .as_deref()
                .map(sender_display_name)
                .unwrap_or_default();
            let body = n.subject.as_deref().map(decode_subject).unwrap_or_default();
            // Cut the subject first, then the sender.
            let mut texts = [body, title];
            fit_to_limit(&mut texts, MAX_PAYLOAD, |t| {
                to_json(&Payload {
                    aps: Aps {
                        alert: Some(Alert::TitleBody {
                            title: &t[1],
                            body: &t[0],
                        }),
                        badge: n.unseen,
                        thread_id: Some(&n.folder),
                        mutable_content: Some(1),
                        content_available: None,
                    },
                    dovepush: Some(Meta {
                        folder: &n.folder,
                        uid: n.uid,
                        uidvalidity: n.uidvalidity,
                        event_id: n.event_id.as_deref(),
                    }),
                })
            })
            .ok_or(TooLarge)
        }
        Privacy::Generic => {
            let mut texts = [generic_text.to_owned()];
            fit_to_limit(&mut texts, MAX_PAYLOAD, |t| {
                to_json(&Payload {
                    aps: Aps {
                        alert: Some(Alert::Text(&t[0])),
                        badge: n.unseen,
                        thread_id: None,
                        mutable_content: None,
                        content_available: None,
                    },
                    dovepush: None,
                })
            })
            .ok_or(TooLarge)
        }
        Privacy::Silent => Ok(to_json(&Payload {
            aps: Aps {
                alert: None,
                badge: n.unseen,
                thread_id: None,
                mutable_content: None,
                content_available: Some(1),
            },
            dovepush: None,
        })),
    }
}

fn to_json(payload: &Payload<'_>) -> Vec<u8> {
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_vec(payload).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn note() -> Notification {
        Notification {
            subject: Some("Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?=".into()),
            ..Notification::for_tests()
        }
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn full_mode() {
        let v = parse(&build(&note(), Privacy::Full, "New mail").unwrap());
        assert_eq!(v["aps"]["alert"]["title"], "Ärger");
        assert_eq!(v["aps"]["alert"]["body"], "Test päivää");
        assert_eq!(v["aps"]["badge"], 3);
        assert_eq!(v["aps"]["thread-id"], "INBOX");
        assert_eq!(v["aps"]["mutable-content"], 1);
        assert_eq!(v["dovepush"]["uid"], 42);
        assert_eq!(v["dovepush"]["uidvalidity"], 7);
        assert_eq!(v["dovepush"]["folder"], "INBOX");
    }

    #[test]
    fn generic_and_silent_reveal_nothing() {
        for privacy in [Privacy::Generic, Privacy::Silent] {
            let bytes = build(&note(), privacy, "New mail").unwrap();
            let text = String::from_utf8(bytes.clone()).unwrap();
            for secret in ["Ärger", "päivää", "secret", "INBOX", "alice"] {
                assert!(!text.contains(secret), "{privacy}: {text}");
            }
            let v = parse(&bytes);
            assert_eq!(v["aps"]["badge"], 3);
            if privacy == Privacy::Generic {
                assert_eq!(v["aps"]["alert"], "New mail");
            } else {
                assert_eq!(v["aps"]["content-available"], 1);
                assert!(v["aps"].get("alert").is_none());
            }
        }
    }

    #[test]
    fn long_multibyte_subject_is_cut_to_the_limit() {
        let mut n = note();
        n.subject = Some("日本語の件名".repeat(400));
        n.from = Some("😀".repeat(2000));
        let bytes = build(&n, Privacy::Full, "x").unwrap();
        assert!(bytes.len() <= MAX_PAYLOAD);
        let v = parse(&bytes);
        // The subject went first, the sender is kept as long as it fits.
        let body = v["aps"]["alert"]["body"].as_str().unwrap();
        let title = v["aps"]["alert"]["title"].as_str().unwrap();
        assert!(body.is_empty() || body.ends_with('…'));
        assert!(title.ends_with('…'));
        assert!(bytes.len() > MAX_PAYLOAD - 8);
    }

    #[test]
    fn escaping_heavy_subjects_still_fit() {
        let mut n = note();
        n.subject = Some("\u{1}\"\\".repeat(3000));
        let bytes = build(&n, Privacy::Full, "x").unwrap();
        assert!(bytes.len() <= MAX_PAYLOAD);
    }

    #[test]
    fn huge_folder_cannot_fit() {
        let mut n = note();
        n.folder = "f".repeat(5000);
        assert!(build(&n, Privacy::Full, "x").is_err());
    }
}
