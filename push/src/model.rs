//! The inputs of one push: what happened ([`Notification`]), where it goes ([`Device`]) and how
//! much of it may be shown ([`Privacy`]). Plain data, no behaviour beyond parsing.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// How much of a message a push may reveal to Apple/Google and on the lock screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Privacy {
    /// Sender and subject are shown (APNs alert title/body, FCM notification and data).
    Full,
    /// A fixed text (the app's `generic_text`) and the badge; no message content leaves the server.
    #[default]
    Generic,
    /// No alert at all: a background wake-up with the badge (APNs `content-available`, FCM data only).
    Silent,
}

impl Privacy {
    /// The config/API spelling: `full`, `generic` or `silent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Privacy::Full => "full",
            Privacy::Generic => "generic",
            Privacy::Silent => "silent",
        }
    }
}

impl fmt::Display for Privacy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a privacy word that is not `full`, `generic` or `silent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown privacy mode {0:?}: expected full, generic or silent")]
pub struct UnknownPrivacy(pub String);

impl FromStr for Privacy {
    type Err = UnknownPrivacy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(Privacy::Full),
            "generic" => Ok(Privacy::Generic),
            "silent" => Ok(Privacy::Silent),
            other => Err(UnknownPrivacy(other.to_owned())),
        }
    }
}

/// Which push service a device token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Apns,
    Fcm,
    /// A browser's push subscription (RFC 8030 + RFC 8291 + VAPID).
    #[serde(rename = "webpush")]
    WebPush,
}

impl DeviceKind {
    /// All kinds, in label order.
    pub const ALL: [DeviceKind; 3] = [DeviceKind::Apns, DeviceKind::Fcm, DeviceKind::WebPush];

    /// The config/API and metric-label spelling: `apns`, `fcm` or `webpush`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Apns => "apns",
            DeviceKind::Fcm => "fcm",
            DeviceKind::WebPush => "webpush",
        }
    }
}

/// A device kind word that is not `apns`, `fcm` or `webpush`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownDeviceKind(pub String);

impl fmt::Display for UnknownDeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown device kind {:?} (expected apns, fcm or webpush)",
            self.0
        )
    }
}

impl std::error::Error for UnknownDeviceKind {}

impl FromStr for DeviceKind {
    type Err = UnknownDeviceKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "apns" => Ok(DeviceKind::Apns),
            "fcm" => Ok(DeviceKind::Fcm),
            "webpush" => Ok(DeviceKind::WebPush),
            other => Err(UnknownDeviceKind(other.to_owned())),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registered device, as the receiver's store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The `[[apps]] id` the device registered for.
    pub app_id: String,
    pub kind: DeviceKind,
    /// APNs hex device token, FCM registration token, or a Web Push subscription in its
    /// canonical form (`webpush:<endpoint>|<p256dh>|<auth>`, see
    /// [`crate::webpush::Subscription`]).
    pub token: String,
    /// Overrides the app's default privacy mode for this device.
    pub privacy: Option<Privacy>,
    /// When the device (last) registered this token. Used to ignore an APNs 410 whose
    /// timestamp is older than a re-registration.
    pub registered_at: Option<SystemTime>,
}

/// One new-mail event, with the fields of the Dovecot ox-driver notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    pub user: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    /// Raw `From:` header value, possibly RFC 2047 encoded.
    pub from: Option<String>,
    /// Raw `Subject:` header value, possibly RFC 2047 encoded.
    pub subject: Option<String>,
    pub snippet: Option<String>,
    /// Unseen messages in the folder; becomes the (absolute) badge.
    pub unseen: Option<u32>,
    /// The receiver's id for this event (also used as the APNs collapse id in full mode).
    pub event_id: Option<String>,
    /// How many older events were folded into this one before it was sent (the caller's
    /// bookkeeping; not sent to APNs or FCM).
    pub coalesced: u32,
    /// Only the unseen count changed (mail read or expunged elsewhere): sent as a silent
    /// badge update (APNs background push, FCM data message, Web Push `event: "badge"`),
    /// whatever the privacy mode.
    pub badge_only: bool,
}

#[cfg(test)]
impl Notification {
    /// Alice's mail 42 in INBOX (UIDVALIDITY 7, 3 unseen, event id `ev1`), from an
    /// encoded `Ärger <a@example.org>`, subject `über`, snippet `secret body`: the payload
    /// tests' notification (each overrides what it checks).
    pub(crate) fn for_tests() -> Notification {
        Notification {
            user: "alice".into(),
            folder: "INBOX".into(),
            uidvalidity: 7,
            uid: 42,
            from: Some("=?utf-8?q?=C3=84rger?= <a@example.org>".into()),
            subject: Some("=?utf-8?b?w7xiZXI=?=".into()),
            snippet: Some("secret body".into()),
            unseen: Some(3),
            event_id: Some("ev1".into()),
            coalesced: 0,
            badge_only: false,
        }
    }
}

impl Notification {
    /// The `event` word apps get in FCM data and Web Push messages: `messageNew`, or
    /// `badge` for a badge-only update.
    pub fn event_word(&self) -> &'static str {
        if self.badge_only {
            "badge"
        } else {
            "messageNew"
        }
    }
}
