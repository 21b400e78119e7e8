//! The FCM HTTP v1 `messages:send` request body for each privacy mode, kept under
//! [`MAX_PAYLOAD`] bytes by cutting the subject first and then the sender name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::content::{decode_subject, fit_to_limit, sender_display_name};
use crate::model::{Notification, Privacy};

/// FCM's limit on a message's payload; applied here to the whole request body.
pub(crate) const MAX_PAYLOAD: usize = 4096;

#[derive(Serialize)]
struct SendRequest<'a> {
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    token: &'a str,
    data: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<Shown<'a>>,
    android: Android<'a>,
}

#[derive(Serialize)]
struct Shown<'a> {
    title: &'a str,
    body: &'a str,
}

#[derive(Serialize)]
struct Android<'a> {
    priority: &'static str,
    ttl: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    collapse_key: Option<&'a str>,
}

/// The message did not fit even with every text cut away.
#[derive(Debug)]
pub(crate) struct TooLarge;

/// Builds the request body for `n` to `token` in `privacy` mode.
///
/// Data (all modes): `event`, `folder`, `uid`, `uidvalidity`, `unseen`, `event_id`; full mode
/// adds `user`, `from` and `subject` (decoded) and a `notification` with sender and subject;
/// generic mode adds a `notification` with the fixed text; silent mode has no notification
/// and normal priority (FCM demotes high-priority messages that show nothing).
pub(crate) fn build(
    token: &str,
    n: &Notification,
    privacy: Privacy,
    generic_text: &str,
    ttl: Duration,
) -> Result<Vec<u8>, TooLarge> {
    let mut data = BTreeMap::new();
    data.insert("event", n.event_word().to_owned());
    data.insert("folder", n.folder.clone());
    data.insert("uid", n.uid.to_string());
    data.insert("uidvalidity", n.uidvalidity.to_string());
    if let Some(unseen) = n.unseen {
        data.insert("unseen", unseen.to_string());
    }
    if let Some(id) = &n.event_id {
        data.insert("event_id", id.clone());
    }
    let ttl = format!("{}s", ttl.as_secs().min(28 * 24 * 3600));
    let android = |collapse_key, priority| Android {
        priority,
        ttl: ttl.clone(),
        collapse_key,
    };
    match privacy {
        Privacy::Full => {
            let title = n
                .from
                .as_deref()
                .map(sender_display_name)
                .unwrap_or_default();
            let body = n.subject.as_deref().map(decode_subject).unwrap_or_default();
            data.insert("user", n.user.clone());
            let mut texts = [body, title];
            fit_to_limit(&mut texts, MAX_PAYLOAD, |t| {
                let mut data = data.clone();
                data.insert("subject", t[0].clone());
                data.insert("from", t[1].clone());
                render(
                    token,
                    data,
                    Some(Shown {
                        title: &t[1],
                        body: &t[0],
                    }),
                    android(None, "HIGH"),
                )
            })
            .ok_or(TooLarge)
        }
        Privacy::Generic => {
            let mut texts = [generic_text.to_owned()];
            fit_to_limit(&mut texts, MAX_PAYLOAD, |t| {
                render(
                    token,
                    data.clone(),
                    Some(Shown {
                        title: &t[0],
                        body: "",
                    }),
                    android(Some("new-mail"), "HIGH"),
                )
            })
            .ok_or(TooLarge)
        }
        Privacy::Silent => {
            // Badge updates collapse among themselves, not with new-mail messages.
            let collapse = if n.badge_only { "badge" } else { "new-mail" };
            let body = render(token, data, None, android(Some(collapse), "NORMAL"));
            if body.len() <= MAX_PAYLOAD {
                Ok(body)
            } else {
                Err(TooLarge)
            }
        }
    }
}

fn render(
    token: &str,
    data: BTreeMap<&'static str, String>,
    notification: Option<Shown<'_>>,
    android: Android<'_>,
) -> Vec<u8> {
    let request = SendRequest {
        message: Message {
            token,
            data,
            notification,
            android,
        },
    };
    // Serialising plain structs of strings cannot fail.
    serde_json::to_vec(&request).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn note() -> Notification {
        Notification {
            snippet: None,
            ..Notification::for_tests()
        }
    }

    fn build_json(privacy: Privacy) -> Value {
        let bytes = build("tok", &note(), privacy, "New mail", Duration::from_secs(60)).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn full_mode_has_notification_and_string_data() {
        let v = build_json(Privacy::Full);
        let m = &v["message"];
        assert_eq!(m["token"], "tok");
        assert_eq!(m["notification"]["title"], "Ärger");
        assert_eq!(m["notification"]["body"], "über");
        assert_eq!(m["data"]["uid"], "42");
        assert_eq!(m["data"]["subject"], "über");
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["android"]["ttl"], "60s");
        assert!(m["data"]
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_string));
    }

    #[test]
    fn generic_and_silent_modes() {
        let g = build_json(Privacy::Generic);
        assert_eq!(g["message"]["notification"]["title"], "New mail");
        assert!(g["message"]["data"].get("subject").is_none());
        let s = build_json(Privacy::Silent);
        assert!(s["message"].get("notification").is_none());
        assert_eq!(s["message"]["android"]["priority"], "NORMAL");
        assert_eq!(s["message"]["data"]["unseen"], "3");
    }

    #[test]
    fn a_badge_update_is_a_data_message_with_the_count_collapsing_apart() {
        let n = Notification {
            badge_only: true,
            unseen: Some(1),
            ..note()
        };
        let bytes = build("tok", &n, Privacy::Silent, "x", Duration::from_secs(60)).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let m = &v["message"];
        assert!(m.get("notification").is_none());
        assert_eq!(m["data"]["event"], "badge");
        assert_eq!(m["data"]["unseen"], "1");
        assert_eq!(m["android"]["priority"], "NORMAL");
        assert_eq!(m["android"]["collapse_key"], "badge");
    }

    #[test]
    fn long_subject_fits() {
        let mut n = note();
        n.subject = Some("€".repeat(5000));
        let bytes = build("tok", &n, Privacy::Full, "x", Duration::from_secs(1)).unwrap();
        assert!(bytes.len() <= MAX_PAYLOAD);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v["message"]["notification"]["body"]
            .as_str()
            .unwrap()
            .ends_with('…'));
    }
}
