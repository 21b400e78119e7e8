//! The domain: new-mail events, the device registry, fan-out and the outbox — with no
//! HTTP and no provider types.
//!
//! * [`event`] — the ox notification body → [`event::NewMailEvent`]; push content and the
//!   coalescing rule.
//! * [`device`] — registrations, devices, the fan-out rule (which devices want a folder).
//! * [`credentials`] — the short-lived salted cache of successful mail logins.
//! * [`registry`] — registering, listing and removing a user's devices, guarded by the
//!   user's own mail login, with the METADATA subscription kept in step.
//! * [`store`] — the persistence port: the `Store` trait a store implements, its records
//!   (outbox items, completions, what an ingest did) and its error.
//! * [`ingest`] — accepting an event: durable commit of the event and its outbox items,
//!   the items written in flight handed to the dispatcher.
//! * [`outbox`] — retry policy, the hand-over, and the dispatcher that drives transports.
//! * [`lifetime`] — the periodic sweep removing devices that stopped registering.
//! * [`throttle`] — failed logins slow down, then lock out, per client address and user.

pub mod credential_watch;
pub mod credentials;
pub mod device;
pub mod event;
pub mod ingest;
pub mod lifetime;
pub mod outbox;
pub mod registry;
pub mod resync;
pub mod store;
pub mod throttle;

use std::time::{SystemTime, UNIX_EPOCH};

/// A request field that failed validation, with a reason for the client (the wire
/// formats' own type, so a notification body's errors need no mapping).
pub use dovepush_protocol::FieldError;

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T08:25:00.123Z`.
pub fn format_millis(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => format!("{ms} ms since 1970"),
    }
}

/// A uniform number in [0, 1) for retry jitter (not for secrets).
pub fn jitter_unit() -> f64 {
    fastrand::f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(1_655_200_000_123), "2022-06-14T09:46:40.123Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..1000 {
            let j = jitter_unit();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
