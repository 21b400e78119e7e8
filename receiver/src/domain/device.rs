//! Devices: what an app registers ([`DeviceRegistration`]), what the registry keeps
//! ([`RegisteredDevice`]: the push target, dovepush-push's [`Device`], with its user,
//! folders and delivery record), and the fan-out rule deciding which devices want an event.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dovepush_push::webpush::Subscription;
use dovepush_push::{Device, DeviceKind, Privacy};
use serde_json::{Map, Value};

use super::FieldError;

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
    pub transport: DeviceKind,
    /// The APNs or FCM token; for Web Push the subscription's canonical form
    /// (`webpush:<endpoint>|<p256dh>|<auth>`).
    pub token: String,
    pub mailboxes: Vec<String>,
    pub privacy: Privacy,
}

/// A device as the registry keeps it: where its pushes go, whose it is, which folders it
/// follows and how its last pushes went.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredDevice {
    pub id: i64,
    pub user: String,
    /// The push target as the transports take it. Its `privacy` is always set (the
    /// device's own choice or its app's default at registration) and its `registered_at`
    /// is when the device last registered (created or updated by `PUT /v1/devices`): a
    /// provider's "unregistered at" older than that must not delete it.
    pub device: Device,
    pub mailboxes: Vec<String>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// Outbox items waiting for this device.
    pub pending: u64,
}

impl RegisteredDevice {
    /// When it last registered (created or refreshed by `PUT /v1/devices`): what the
    /// idle sweep ([`super::lifetime`]) goes by. Milliseconds since the epoch.
    pub fn last_seen_at(&self) -> i64 {
        self.device
            .registered_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(self.created_at, |d| d.as_millis() as i64)
    }

    /// The privacy its pushes get.
    pub fn privacy(&self) -> Privacy {
        self.device.privacy.unwrap_or_default()
    }
}

/// Milliseconds since the epoch as a [`SystemTime`] (negative ones as the epoch).
pub fn system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
impl DeviceRegistration {
    /// An APNs device of app `mail` following INBOX, full privacy, for tests.
    pub(crate) fn for_tests(user: &str, token: &str) -> DeviceRegistration {
        DeviceRegistration {
            user: user.into(),
            app: "mail".into(),
            transport: DeviceKind::Apns,
            token: token.into(),
            mailboxes: vec!["INBOX".into()],
            privacy: Privacy::Full,
        }
    }
}

#[cfg(test)]
impl RegisteredDevice {
    /// A device of `user` for tests: app `mail`, INBOX, full privacy, created at 0, no
    /// outcome yet, nothing pending.
    pub(crate) fn for_tests(user: &str, kind: DeviceKind, token: &str) -> RegisteredDevice {
        RegisteredDevice {
            id: 1,
            user: user.into(),
            device: Device {
                app_id: "mail".into(),
                kind,
                token: token.into(),
                privacy: Some(Privacy::Full),
                registered_at: Some(UNIX_EPOCH),
            },
            mailboxes: vec!["INBOX".into()],
            created_at: 0,
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
        if key.is_empty() {
            // Found by fuzzing: an answer naming the field "" helps nobody.
            return Err(FieldError::new("body", "a key is empty"));
        }
        if !matches!(
            key.as_str(),
            "app" | "transport" | "token" | "mailboxes" | "privacy"
        ) && !WEBPUSH_FIELDS.contains(&key.as_str())
        {
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
        .parse::<DeviceKind>()
        .ok()
        .ok_or_else(|| FieldError::new("transport", "expected \"apns\", \"fcm\" or \"webpush\""))?;
    let token = if transport == DeviceKind::WebPush {
        webpush_token(&obj)?
    } else {
        if let Some(key) = WEBPUSH_FIELDS.iter().find(|k| obj.contains_key(**k)) {
            return Err(FieldError::new(*key, "only for transport \"webpush\""));
        }
        let token = string("token")?.ok_or_else(|| FieldError::new("token", "missing"))?;
        if !valid_token(&token) {
            return Err(FieldError::new(
                "token",
                format!("expected 1-{MAX_TOKEN_LEN} characters of A-Z a-z 0-9 . _ ~ : -"),
            ));
        }
        token
    };
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

/// The fields of a browser's `PushSubscription.toJSON()`, taken as they are for
/// `"transport": "webpush"` (`expirationTime` is accepted and ignored).
const WEBPUSH_FIELDS: [&str; 3] = ["endpoint", "keys", "expirationTime"];

/// A Web Push registration's subscription, checked, in its canonical token form. The
/// endpoint's host is checked against the address rules by the registry, not here.
fn webpush_token(obj: &Map<String, Value>) -> Result<String, FieldError> {
    if obj.contains_key("token") {
        return Err(FieldError::new(
            "token",
            "a webpush device sends its subscription (endpoint, keys), not a token",
        ));
    }
    let endpoint = match obj.get("endpoint") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => return Err(FieldError::new("endpoint", "missing")),
        Some(_) => return Err(FieldError::new("endpoint", "expected a string")),
    };
    match obj.get("expirationTime") {
        None | Some(Value::Null | Value::Number(_)) => {}
        Some(_) => {
            return Err(FieldError::new(
                "expirationTime",
                "expected a number or null",
            ))
        }
    }
    let keys = match obj.get("keys") {
        Some(Value::Object(keys)) => keys,
        None | Some(Value::Null) => return Err(FieldError::new("keys", "missing")),
        Some(_) => {
            return Err(FieldError::new(
                "keys",
                "expected an object with p256dh and auth",
            ))
        }
    };
    if let Some(unknown) = keys
        .keys()
        .find(|k| !matches!(k.as_str(), "p256dh" | "auth"))
    {
        return Err(FieldError::new(format!("keys.{unknown}"), "unknown field"));
    }
    let key = |name: &'static str| match keys.get(name) {
        Some(Value::String(s)) => Ok(s.as_str()),
        None => Err(FieldError::new(format!("keys.{name}"), "missing")),
        Some(_) => Err(FieldError::new(format!("keys.{name}"), "expected a string")),
    };
    let subscription = Subscription::new(endpoint, key("p256dh")?, key("auth")?)
        .map_err(|e| FieldError::new(e.field, e.message))?;
    Ok(subscription.token())
}

/// What the device API shows as a device's `token`, and what `DELETE /v1/devices/{token}`
/// takes: the token itself, or for a Web Push subscription its short id (`wp-…`; the
/// canonical form holds the auth secret and is no URL path segment).
pub fn public_token(kind: DeviceKind, token: &str) -> String {
    match kind {
        DeviceKind::WebPush => Subscription::from_token(token)
            .map(|s| s.id())
            .unwrap_or_else(|_| shorten_token(token)),
        DeviceKind::Apns | DeviceKind::Fcm => token.to_owned(),
    }
}

/// The endpoint URL of a Web Push device (shown to its owner only).
pub fn webpush_endpoint(kind: DeviceKind, token: &str) -> Option<String> {
    (kind == DeviceKind::WebPush)
        .then(|| Subscription::from_token(token).ok())
        .flatten()
        .map(|s| s.endpoint().to_owned())
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

/// A token as shown to operators and in logs: the first and last 6 characters; a Web
/// Push subscription's short id and its push service's host (the rest of the endpoint is
/// a capability, and its last characters would be part of the auth secret).
pub fn shorten_token(token: &str) -> String {
    if token.starts_with(dovepush_push::webpush::subscription::TOKEN_PREFIX) {
        return match Subscription::from_token(token) {
            Ok(sub) => format!("{}@{}", sub.id(), sub.host()),
            Err(_) => "webpush:(bad)".to_owned(),
        };
    }
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
        assert_eq!(r.transport, DeviceKind::Fcm);
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
            // Found by fuzzing (fuzz/fuzz_targets/device_registration.rs): it was named "".
            (br#"{"":"fm"}"#, "body"),
        ];
        for (body, field) in cases {
            let err = parse_registration("alice", body, apps).unwrap_err();
            assert_eq!(err.field, *field, "{}", String::from_utf8_lossy(body));
        }
    }

    /// The user agent keys of RFC 8291, Appendix A.
    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    fn webpush_body(extra: &str) -> String {
        format!(
            r#"{{"app":"mail","transport":"webpush","endpoint":"https://push.example.net/s/1",
                "expirationTime":null,"keys":{{"p256dh":"{P256DH}","auth":"{AUTH}"}}{extra}}}"#
        )
    }

    #[test]
    fn a_browser_subscription_registers_as_is() {
        let r = parse_registration("alice", webpush_body("").as_bytes(), apps).unwrap();
        assert_eq!(r.transport, DeviceKind::WebPush);
        assert_eq!(
            r.token,
            format!("webpush:https://push.example.net/s/1|{P256DH}|{AUTH}")
        );
        let id = public_token(DeviceKind::WebPush, &r.token);
        assert!(id.starts_with("wp-") && valid_token(&id), "{id}");
        assert_eq!(
            webpush_endpoint(DeviceKind::WebPush, &r.token).as_deref(),
            Some("https://push.example.net/s/1")
        );
        assert_eq!(public_token(DeviceKind::Apns, "ab12"), "ab12");
        assert_eq!(webpush_endpoint(DeviceKind::Apns, "ab12"), None);
        let shown = shorten_token(&r.token);
        assert_eq!(shown, format!("{id}@push.example.net"));
        assert!(!shown.contains(&AUTH[AUTH.len() - 4..]));
        let r = parse_registration(
            "alice",
            webpush_body(r#","mailboxes":["Work"],"privacy":"silent""#).as_bytes(),
            apps,
        )
        .unwrap();
        assert_eq!(r.mailboxes, vec!["Work"]);
        assert_eq!(r.privacy, Privacy::Silent);
    }

    #[test]
    fn web_push_errors_name_the_field() {
        let body = webpush_body("");
        let cases: Vec<(String, &str)> = vec![
            (webpush_body(r#","token":"x""#), "token"),
            (body.replace("https://push", "http://push"), "endpoint"),
            (body.replace(P256DH, "AAAA"), "keys.p256dh"),
            (body.replace(AUTH, "AAAA"), "keys.auth"),
            (body.replace(r#","auth":"#, r#","secret":"#), "keys.secret"),
            (
                body.replace(r#""expirationTime":null"#, r#""expirationTime":"soon""#),
                "expirationTime",
            ),
            (
                r#"{"app":"mail","transport":"webpush","keys":{}}"#.to_owned(),
                "endpoint",
            ),
            (
                r#"{"app":"mail","transport":"webpush","endpoint":"https://p.example/"}"#
                    .to_owned(),
                "keys",
            ),
            (
                r#"{"app":"mail","transport":"apns","token":"ab","endpoint":"https://p.example/"}"#
                    .to_owned(),
                "endpoint",
            ),
        ];
        for (body, field) in cases {
            let err = parse_registration("alice", body.as_bytes(), apps).unwrap_err();
            assert_eq!(err.field, field, "{body}: {err}");
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
