//! The outbox: the retry policy (exponential backoff with jitter, a deadline), what a
//! transport is told about an item, and the [`Dispatcher`] that sends items through the
//! injected transports and records each [`Outcome`] as a [`Completion`].
//!
//! * [`hand_over`] — how ingest gives the dispatcher the items it had written in flight.
//! * [`schedule`] — the dispatcher's state and its transitions (pure, unit-tested).
//! * [`dispatcher`] — the loop: claims, sends, records, stops.
//!
//! Delivery is at-least-once: an item stays in the store until its completion is
//! committed, and items left in flight by a crash are sent again after a restart.
//! Coalescing happens at ingest (a pending item absorbs newer events), so one push
//! carries the newest content and unseen count.

pub mod dispatcher;
pub mod hand_over;
pub mod schedule;

use std::time::Duration;

use dovepush_push::{Notification, Outcome};

use crate::config::OutboxConfig;
use crate::domain::store::{Completion, OutboxItem};
use crate::telemetry::FailureClass;

pub use dispatcher::{Dispatcher, CLAIM_BATCH, SEND_TIMEOUT};
pub use hand_over::HandOver;

/// When a pending item that absorbs an event is sent: the earlier of its own time and the
/// event's (so that a new-mail alert folded into a badge update still waiting for more
/// leaves when an alert of its own would), unless it has been tried already: an item in
/// backoff keeps its retry time.
pub fn folded_due_at(attempts: i64, pending_due_at: i64, event_due_at: i64) -> i64 {
    if attempts == 0 {
        pending_due_at.min(event_due_at)
    } else {
        pending_due_at
    }
}

/// Retry timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// Items older than this (since their newest event) are dropped.
    pub deadline: Duration,
}

/// What to record for one sent (or expired) item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub completion: Completion,
    /// The metric class when it was not a delivery.
    pub failure: Option<FailureClass>,
}

impl RetryPolicy {
    pub fn from_config(c: &OutboxConfig) -> Self {
        Self {
            initial: c.retry_initial,
            max: c.retry_max,
            deadline: c.deadline,
        }
    }

    /// Delay before the next attempt after `failures` failed ones: `initial · 2^failures`
    /// capped at `max`, then scaled into [50 %, 100 %) by `jitter` ∈ [0, 1).
    pub fn backoff(&self, failures: u32, jitter: f64) -> Duration {
        let base = self.initial.as_secs_f64() * 2f64.powi(failures.min(40) as i32);
        let capped = base.min(self.max.as_secs_f64());
        Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }

    /// True when `item` is past its deadline at `now`.
    pub fn expired(&self, item: &OutboxItem, now: i64) -> bool {
        now > item.created_at + self.deadline.as_millis() as i64
    }

    /// Turns a transport outcome into what the store records.
    pub fn decide(
        &self,
        item: &OutboxItem,
        outcome: Outcome,
        now: i64,
        jitter: f64,
        retry_class: FailureClass,
    ) -> Decision {
        let retry = |reason: String, after: Option<Duration>, class: FailureClass| {
            let delay = after.unwrap_or_else(|| self.backoff(item.attempts, jitter));
            let due_at = now + delay.as_millis() as i64;
            if due_at > item.created_at + self.deadline.as_millis() as i64 {
                Decision {
                    completion: Completion::Drop {
                        reason: format!(
                            "deadline exceeded after {} attempts: {reason}",
                            item.attempts + 1
                        ),
                    },
                    failure: Some(FailureClass::Deadline),
                }
            } else {
                Decision {
                    completion: Completion::Retry { due_at, reason },
                    failure: Some(class),
                }
            }
        };
        match outcome {
            Outcome::Delivered { .. } => Decision {
                completion: Completion::Delivered,
                failure: None,
            },
            // An APNs 410 older than the device's registration already arrives as `Drop`
            // (`Unregistered_before_reregistration`): `DeleteDevice` always deletes.
            Outcome::DeleteDevice { reason, .. } => Decision {
                completion: Completion::DeleteDevice { reason },
                failure: Some(FailureClass::DeleteDevice),
            },
            Outcome::Drop { reason } => Decision {
                completion: Completion::Drop { reason },
                failure: Some(FailureClass::Drop),
            },
            Outcome::Retry {
                reason,
                retry_after,
            } => retry(reason, retry_after, retry_class),
            Outcome::CredentialsRejected { reason } => retry(
                format!("provider credentials rejected: {reason}"),
                None,
                FailureClass::CredentialsRejected,
            ),
        }
    }
}

/// What the transport is told about an item (raw RFC 2047 headers: the provider crate
/// decodes and shortens them); the item's device is the other half.
pub fn notification_for(item: &OutboxItem) -> Notification {
    let c = &item.content;
    Notification {
        user: item.device.user.clone(),
        folder: c.folder.clone(),
        uidvalidity: c.uidvalidity,
        uid: c.uid,
        from: c.from.clone(),
        subject: c.subject.clone(),
        snippet: c.snippet.clone(),
        unseen: c.unseen,
        event_id: c.event_id.clone(),
        coalesced: c.coalesced,
        badge_only: c.badge_only,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::RegisteredDevice;
    use crate::domain::event::PushContent;
    use dovepush_push::DeviceKind;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            deadline: Duration::from_secs(3600),
        }
    }

    fn item(attempts: u32, created_at: i64) -> OutboxItem {
        OutboxItem {
            id: 1,
            device: RegisteredDevice {
                id: 2,
                ..RegisteredDevice::for_tests("alice", DeviceKind::Apns, "tok")
            },
            content: PushContent {
                event_id: None,
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: 1,
                from: None,
                subject: None,
                snippet: None,
                unseen: Some(1),
                received_at: created_at,
                coalesced: 0,
                badge_only: false,
                time_ms: None,
            },
            attempts,
            created_at,
            due_at: created_at,
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = policy();
        assert_eq!(p.backoff(0, 0.0), Duration::from_millis(500));
        assert_eq!(p.backoff(0, 0.999_999).as_millis(), 999);
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(4));
        assert_eq!(p.backoff(30, 0.0), Duration::from_secs(30));
        assert!(p.backoff(30, 0.99) < Duration::from_secs(60));
    }

    #[test]
    fn outcomes_map_to_completions() {
        let p = policy();
        let it = item(2, 0);
        let d = p.decide(
            &it,
            Outcome::Delivered { id: None },
            10,
            0.0,
            FailureClass::Retry,
        );
        assert_eq!(d.completion, Completion::Delivered);
        assert_eq!(d.failure, None);
        let d = p.decide(
            &it,
            Outcome::Retry {
                reason: "503".into(),
                retry_after: None,
            },
            10,
            0.0,
            FailureClass::Retry,
        );
        assert_eq!(
            d.completion,
            Completion::Retry {
                due_at: 10 + 2000,
                reason: "503".into()
            }
        );
        let d = p.decide(
            &it,
            Outcome::Retry {
                reason: "429".into(),
                retry_after: Some(Duration::from_secs(30)),
            },
            10,
            0.0,
            FailureClass::Retry,
        );
        assert!(matches!(
            d.completion,
            Completion::Retry { due_at: 30_010, .. }
        ));
        let d = p.decide(
            &it,
            Outcome::CredentialsRejected {
                reason: "InvalidProviderToken".into(),
            },
            10,
            0.0,
            FailureClass::Retry,
        );
        assert_eq!(d.failure, Some(FailureClass::CredentialsRejected));
        assert!(matches!(d.completion, Completion::Retry { .. }));
        let d = p.decide(
            &it,
            Outcome::DeleteDevice {
                reason: "Unregistered".into(),
                unregistered_at: None,
            },
            10,
            0.0,
            FailureClass::Retry,
        );
        assert_eq!(
            d.completion,
            Completion::DeleteDevice {
                reason: "Unregistered".into()
            }
        );
        let d = p.decide(
            &it,
            Outcome::Drop {
                reason: "PayloadTooLarge".into(),
            },
            10,
            0.0,
            FailureClass::Retry,
        );
        assert_eq!(d.failure, Some(FailureClass::Drop));
    }

    #[test]
    fn retries_past_the_deadline_are_dropped() {
        let p = policy();
        let it = item(0, 0);
        let d = p.decide(
            &it,
            Outcome::Retry {
                reason: "503".into(),
                retry_after: None,
            },
            3_600_000,
            0.0,
            FailureClass::Retry,
        );
        assert_eq!(d.failure, Some(FailureClass::Deadline));
        assert!(p.expired(&it, 3_600_001));
        assert!(!p.expired(&it, 3_600_000));
    }

    #[test]
    fn an_item_maps_to_device_and_notification() {
        let mut it = item(0, 0);
        it.content.from = Some("=?utf-8?q?J=C3=BCrgen?= <j@example.net>".into());
        it.content.event_id = Some("ev".into());
        it.content.uid = 9;
        it.content.unseen = Some(4);
        let n = notification_for(&it);
        assert_eq!(n.user, "alice");
        assert_eq!(n.unseen, Some(4));
        assert_eq!(n.uid, 9);
        assert_eq!(
            n.from.as_deref(),
            Some("=?utf-8?q?J=C3=BCrgen?= <j@example.net>")
        );
        assert_eq!(n.event_id.as_deref(), Some("ev"));
        let d = &it.device.device;
        assert_eq!(d.app_id, "mail");
        assert_eq!(d.kind, DeviceKind::Apns);
        assert_eq!(d.privacy, Some(dovepush_push::Privacy::Full));
    }

    #[test]
    fn a_folded_event_brings_an_untried_item_forward_never_a_retry() {
        assert_eq!(folded_due_at(0, 2_000, 500), 500);
        assert_eq!(folded_due_at(0, 500, 2_000), 500);
        assert_eq!(folded_due_at(3, 9_000, 500), 9_000);
    }
}
