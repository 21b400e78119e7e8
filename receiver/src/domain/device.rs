//! Devices: what an app registers ([`DeviceRegistration`]), what the registry keeps
//! ([`Device`]), and the fan-out rule deciding which devices want an event.

use serde_json::Value;

use super::FieldError;
use crate::transport::{Privacy, TransportKind};

/// Longest accepted device token.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Most mailboxes one device may follow.
pub const MAX_MAILBOXES: usize = 100;
/// Longest accepted mailbox name.
pub const MAX_MAILBOX_LEN: usize = 1024;
/// Longest accepted login.
pub const MAX_LOGIN_LEN: usize = 256;

/// A validated `PUT /v1/devices` request for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRegistration {
    pub user: String,
    pub app: String,
    pub transport: TransportKind,
    pub token: String,
    pub mailboxes: Vec<String>,
    pub privacy: Privacy,
}

/// A registered device with its delivery record.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: i64,
    pub user: String,
    pub app: String,
    pub transport: TransportKind,
    pub token: String,
    pub mailboxes: Vec<String>,
    pub privacy: Privacy,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// When the device last registered (created or updated by `PUT /v1/devices`), ms since
    /// the epoch. A provider's "unregistered at" older than this must not delete it.
    pub registered_at: i64,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// Outbox items waiting for this device.
    pub pending: u64,
}

#[cfg(test)]
impl Device {
    /// A device of `user` for tests: app `mail`, INBOX, full privacy, created at 0, no
    /// outcome yet, nothing pending.
    pub(crate) fn for_tests(user: &str, transport: TransportKind, token: &str) -> Device {
        Device {
            id: 1,
            user: user.into(),
            app: "mail".into(),
            transport,
            token: token.into(),
            mailboxes: vec!["INBOX".into()],
            privacy: Privacy::Full,
            created_at: 0,
            registered_at: 0,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
            pending: 0,
        }
    }
}

/// Parses a registration body. `app_privacy` looks up a configured app's default privacy
/// (`None` = no such app; `Some(None)` = the app has no default).
pub fn parse_registration(
    user: &str,
    body: &[u8],
    app_privacy: impl Fn(&str) -> Option<Option<Privacy>>,
) -> Result<DeviceRegistration, FieldError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("body", format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(FieldError::new("body", "expected a JSON object"));
    };
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "app" | "transport" | "token" | "mailboxes" | "privacy"
        ) {
            return Err(FieldError::new(key, "unknown field"));
        }
    }
    let string = |key: &str| match obj.get(key) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(FieldError::new(key, "expected a string")),
    };
    let app = string("app")?.ok_or_else(|| FieldError::new("app", "missing"))?;
    let Some(default_privacy) = app_privacy(&app) else {
        return Err(FieldError::new("app", "unknown app id"));
    };
    let transport = string("transport")?.ok_or_else(|| FieldError::new("transport", "missing"))?;
    let transport = transport
        .parse::<TransportKind>()
        .ok()
        .ok_or_else(|| FieldError::new("transport", "expected \"apns\" or \"fcm\""))?;
    let token = string("token")?.ok_or_else(|| FieldError::new("token", "missing"))?;
    if !valid_token(&token) {
        return Err(FieldError::new(
            "token",
            format!("expected 1-{MAX_TOKEN_LEN} characters of A-Z a-z 0-9 . _ ~ : -"),
        ));
    }
    let mailboxes =
        match obj.get("mailboxes") {
            None | Some(Value::Null) => vec!["INBOX".to_owned()],
            Some(Value::Array(items)) => {
                if items.is_empty() || items.len() > MAX_MAILBOXES {
                    return Err(FieldError::new(
                        "mailboxes",
                        format!("expected 1-{MAX_MAILBOXES} mailbox names"),
                    ));
                }
                let mut names = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s)
                            if !s.is_empty()
                                && s.len() <= MAX_MAILBOX_LEN
                                && !s.chars().any(char::is_control) =>
                        {
                            if !names.contains(s) {
                                names.push(s.clone());
                            }
                        }
                        _ => return Err(FieldError::new(
                            "mailboxes",
                            "each mailbox must be a non-empty string without control characters",
                        )),
                    }
                }
                names
            }
            Some(_) => return Err(FieldError::new("mailboxes", "expected an array of strings")),
        };
    let privacy = match string("privacy")? {
        None => default_privacy.unwrap_or(Privacy::Full),
        Some(p) => p.parse::<Privacy>().ok().ok_or_else(|| {
            FieldError::new("privacy", "expected \"full\", \"generic\" or \"silent\"")
        })?,
    };
    Ok(DeviceRegistration {
        user: user.to_owned(),
        app,
        transport,
        token,
        mailboxes,
        privacy,
    })
}

/// Device tokens: APNs (hex) and FCM (`[A-Za-z0-9_:-]`) fit; the set is URL-path safe.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
}

/// Logins usable in an IMAP quoted string and in the METADATA value.
pub fn valid_login(login: &str) -> bool {
    !login.is_empty() && login.len() <= MAX_LOGIN_LEN && !login.chars().any(|c| c.is_control())
}

/// Fan-out rule: does a device following `mailboxes` want an event in `folder`?
/// `INBOX` is case-insensitive (RFC 3501); other names match exactly.
pub fn wants_folder(mailboxes: &[String], folder: &str) -> bool {
    mailboxes.iter().any(|m| {
        if m.eq_ignore_ascii_case("INBOX") {
            folder.eq_ignore_ascii_case("INBOX")
        } else {
            m == folder
        }
    })
}

/// A token as shown to operators and in logs: the first and last 6 characters.
pub fn shorten_token(token: &str) -> String {
    if token.len() <= 16 {
        let keep = token.len().min(4);
        format!("{}…", &token[..keep])
    } else {
        format!("{}…{}", &token[..6], &token[token.len() - 6..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apps(app: &str) -> Option<Option<Privacy>> {
        match app {
            "mail" => Some(None),
            "quiet" => Some(Some(Privacy::Silent)),
            _ => None,
        }
    }

    #[test]
    fn registration_defaults() {
        let r = parse_registration(
            "alice",
            br#"{"app":"mail","transport":"apns","token":"ab12"}"#,
            apps,
        )
        .unwrap();
        assert_eq!(r.user, "alice");
        assert_eq!(r.mailboxes, vec!["INBOX"]);
        assert_eq!(r.privacy, Privacy::Full);
        let r = parse_registration(
            "alice",
            br#"{"app":"quiet","transport":"fcm","token":"a:b-c_d","mailboxes":["INBOX","Work","Work"]}"#,
            apps,
        )
        .unwrap();
        assert_eq!(r.privacy, Privacy::Silent);
        assert_eq!(r.mailboxes, vec!["INBOX", "Work"]);
        assert_eq!(r.transport, TransportKind::Fcm);
    }

    #[test]
    fn registration_errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "body"),
            (br#"{"transport":"apns","token":"a"}"#, "app"),
            (br#"{"app":"nope","transport":"apns","token":"a"}"#, "app"),
            (
                br#"{"app":"mail","transport":"wns","token":"a"}"#,
                "transport",
            ),
            (
                br#"{"app":"mail","transport":"apns","token":"a/b"}"#,
                "token",
            ),
            (br#"{"app":"mail","transport":"apns","token":""}"#, "token"),
            (
                br#"{"app":"mail","transport":"apns","token":"a","mailboxes":[]}"#,
                "mailboxes",
            ),
            (
                br#"{"app":"mail","transport":"apns","token":"a","mailboxes":[""]}"#,
                "mailboxes",
            ),
            (
                br#"{"app":"mail","transport":"apns","token":"a","privacy":"loud"}"#,
                "privacy",
            ),
            (
                br#"{"app":"mail","transport":"apns","token":"a","user":"bob"}"#,
                "user",
            ),
        ];
        for (body, field) in cases {
            let err = parse_registration("alice", body, apps).unwrap_err();
            assert_eq!(err.field, *field, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn fan_out_matches_folders() {
        let m = vec!["inbox".to_owned(), "Work".to_owned()];
        assert!(wants_folder(&m, "INBOX"));
        assert!(wants_folder(&m, "Work"));
        assert!(!wants_folder(&m, "work"));
        assert!(!wants_folder(&m, "Spam"));
    }

    #[test]
    fn tokens_are_shortened() {
        assert_eq!(shorten_token("0123456789abcdef0123"), "012345…ef0123");
        assert_eq!(shorten_token("abcdefgh"), "abcd…");
        assert_eq!(shorten_token("ab"), "ab…");
    }

    #[test]
    fn logins() {
        assert!(valid_login("alice@example.com"));
        assert!(!valid_login(""));
        assert!(!valid_login("a\r\nb"));
    }
}
