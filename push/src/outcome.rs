//! What became of one send: the [`Outcome`] classes the receiver acts on, each with a
//! bounded reason string usable as a metrics label.

use std::time::{Duration, SystemTime};

/// The result of sending one notification to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by APNs/FCM. `id` is the `apns-id` or the FCM message name.
    Delivered { id: Option<String> },
    /// The token is dead: remove the device. `unregistered_at` is APNs' 410 timestamp, if any;
    /// a caller that races with re-registration should delete only if the device's
    /// registration is not newer than it.
    DeleteDevice {
        reason: String,
        unregistered_at: Option<SystemTime>,
    },
    /// Temporary failure: try again later, not before `retry_after` if the service said so.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// APNs/FCM refused our credentials even after one renewal. Alert an operator; delete nothing.
    CredentialsRejected { reason: String },
    /// This item cannot be delivered as it is (bad request, too large, unknown app): drop it and log.
    Drop { reason: String },
}

impl Outcome {
    /// The class as a fixed label: `delivered`, `delete_device`, `retry`,
    /// `credentials_rejected` or `drop`.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::DeleteDevice { .. } => "delete_device",
            Outcome::Retry { .. } => "retry",
            Outcome::CredentialsRejected { .. } => "credentials_rejected",
            Outcome::Drop { .. } => "drop",
        }
    }

    /// The reason label (`ok` when delivered): an APNs reason, an FCM error code or one of
    /// this crate's own words such as `connection`, `timeout`, `payload_too_large`.
    /// Only `[A-Za-z0-9_]`, at most 48 characters.
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Delivered { .. } => "ok",
            Outcome::DeleteDevice { reason, .. }
            | Outcome::Retry { reason, .. }
            | Outcome::CredentialsRejected { reason }
            | Outcome::Drop { reason } => reason,
        }
    }

    pub(crate) fn retry(reason: impl AsRef<str>, retry_after: Option<Duration>) -> Self {
        Outcome::Retry {
            reason: label(reason.as_ref()),
            retry_after,
        }
    }

    pub(crate) fn drop(reason: impl AsRef<str>) -> Self {
        Outcome::Drop {
            reason: label(reason.as_ref()),
        }
    }

    pub(crate) fn delete(reason: impl AsRef<str>, unregistered_at: Option<SystemTime>) -> Self {
        Outcome::DeleteDevice {
            reason: label(reason.as_ref()),
            unregistered_at,
        }
    }

    pub(crate) fn credentials(reason: impl AsRef<str>) -> Self {
        Outcome::CredentialsRejected {
            reason: label(reason.as_ref()),
        }
    }
}

/// Makes a service-supplied reason safe as a metrics label: `[A-Za-z0-9_]` only, at most
/// 48 characters, never empty.
pub(crate) fn label(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(48)
        .collect();
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_safe() {
        assert_eq!(label("BadDeviceToken"), "BadDeviceToken");
        assert_eq!(label("a b{c}"), "a_b_c_");
        assert_eq!(label(""), "unknown");
        assert_eq!(label(&"x".repeat(100)).len(), 48);
    }
}
