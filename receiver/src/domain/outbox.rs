//! The outbox: the retry policy (exponential backoff with jitter, a deadline) and the
//! [`Dispatcher`] that claims due items from the store, sends them through the injected
//! transports and records each [`Outcome`] as a [`Completion`].
//!
//! Delivery is at-least-once: an item stays in the store until its completion is
//! committed, and items left in flight by a crash are sent again after a restart.
//! Coalescing happens at ingest (a pending item absorbs newer events), so one push
//! carries the newest content and unseen count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit};

use super::{jitter_unit, now_millis};
use crate::config::OutboxConfig;
use crate::domain::device::shorten_token;
use crate::domain::registry::UserLocks;
use crate::mailserver::{MailError, MailServer};
use crate::store::{Claimed, Completed, Completion, OutboxItem, SendSlots, Store};
use crate::telemetry::{FailureClass, Metrics};
use crate::transport::{Outcome, Push, Transports};

/// Most items claimed per store round trip.
pub const CLAIM_BATCH: usize = 256;
/// Longest the dispatcher sleeps without looking at the store (picks up CLI retries).
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// After a claim that found nothing, the least wait before the next one (ms).
const CLAIM_RETRY_MS: i64 = 50;
/// After the store failed to record push outcomes, the dispatcher tries them again this
/// much later (until then their items stay in flight, their slots already free).
const RECORD_RETRY: Duration = Duration::from_secs(1);
/// Overall bound on one transport call.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

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
            Outcome::Delivered => Decision {
                completion: Completion::Delivered,
                failure: None,
            },
            Outcome::DeleteDevice { reason } => Decision {
                completion: Completion::DeleteDevice { reason },
                failure: Some(FailureClass::DeleteDevice),
            },
            Outcome::Drop { reason } => Decision {
                completion: Completion::Drop { reason },
                failure: Some(FailureClass::Drop),
            },
            Outcome::Retry { reason, after } => retry(reason, after, retry_class),
            Outcome::CredentialsRejected { reason } => retry(
                format!("provider credentials rejected: {reason}"),
                None,
                FailureClass::CredentialsRejected,
            ),
        }
    }
}

/// Builds the transport's view of an item.
pub fn push_for(item: &OutboxItem) -> Push {
    let c = &item.content;
    let d = &item.device;
    Push {
        id: item.id,
        app: d.app.clone(),
        transport: d.transport,
        token: d.token.clone(),
        privacy: d.privacy,
        registered_at: d.registered_at,
        user: d.user.clone(),
        event_id: c.event_id.clone(),
        folder: c.folder.clone(),
        uidvalidity: c.uidvalidity,
        uid: c.uid,
        from: c.from.clone(),
        subject: c.subject.clone(),
        snippet: c.snippet.clone(),
        unseen: c.unseen,
        coalesced: c.coalesced,
    }
}

/// Drives the outbox until shut down.
///
/// Items reach it two ways: ingest hands over the new items it marked in flight itself
/// (each holding one of `slots`), and the dispatcher claims the others from the store —
/// pending items (a device's next push while one is in flight, retries, items that found
/// no free slot) as they fall due. It looks at the store when ingest wakes it, when a
/// completion frees a slot that due items were waiting for, when the next pending item
/// falls due, and at least every [`IDLE_POLL`] (to see the CLI's changes).
pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub transports: Transports,
    pub policy: RetryPolicy,
    pub metrics: Arc<Metrics>,
    pub mail: Arc<dyn MailServer>,
    /// The registry's per-user locks: held while clearing a subscription.
    pub user_locks: UserLocks,
    /// Notified by ingest when new items were left pending.
    pub wake: Arc<Notify>,
    /// Send slots (`concurrency` of them), shared with ingest.
    pub slots: SendSlots,
    /// Set while due items wait in the store for slots; ingest then leaves new items
    /// pending too (see [`crate::store::HandOver`]).
    pub backlog: Arc<AtomicBool>,
    pub concurrency: usize,
    pub send_timeout: Duration,
}

impl Dispatcher {
    /// Runs until `shutdown` turns true, then waits (bounded) for pushes in flight.
    /// `direct` brings the items ingest marked in flight.
    pub async fn run(
        self,
        mut direct: mpsc::UnboundedReceiver<Claimed>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Completed>();
        let mut batch: Vec<Completed> = Vec::new();
        let mut stopping = *shutdown.borrow();
        let mut stop_deadline = None;
        // When to claim from the store next; `starved`: due items may be waiting for slots.
        let mut claim_at = tokio::time::Instant::now();
        let mut starved = false;
        // Set while outcomes the store failed to record wait for another try.
        let mut record_at: Option<tokio::time::Instant> = None;
        loop {
            while let Ok(c) = done_rx.try_recv() {
                batch.push(c);
            }
            if !batch.is_empty() && record_at.is_none_or(|at| at <= tokio::time::Instant::now()) {
                // A retry due soon is claimed then, not at the next poll.
                let retry = batch
                    .iter()
                    .filter_map(|c| match c.completion {
                        Completion::Retry { due_at, .. } => Some(due_at),
                        _ => None,
                    })
                    .min();
                let recorded = this.record(std::mem::take(&mut batch)).await;
                let now = tokio::time::Instant::now();
                record_at = None;
                if let Err(kept) = recorded {
                    // The loop wakes for it with the next claim at the latest.
                    batch = kept;
                    record_at = Some(now + RECORD_RETRY);
                    claim_at = claim_at.min(now + RECORD_RETRY);
                }
                if starved {
                    claim_at = now;
                }
                if let Some(due) = retry {
                    let wait = Duration::from_millis((due - now_millis()).max(0) as u64);
                    claim_at = claim_at.min(now + wait);
                }
            }
            if stopping {
                // Items handed over but not started stay in flight in the store: they are
                // sent after the restart.
                while direct.try_recv().is_ok() {}
                let in_flight = this.concurrency - this.slots.available_permits();
                let deadline = *stop_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(5));
                if in_flight == 0 || tokio::time::Instant::now() >= deadline {
                    if in_flight > 0 {
                        tracing::warn!(
                            in_flight,
                            "Stopping with pushes in flight; they will be retried after restart."
                        );
                    }
                    return;
                }
                tokio::select! {
                    Some(c) = done_rx.recv() => batch.push(c),
                    // Handed over too late to start: its slot is freed, the item stays in
                    // flight in the store for the restart.
                    Some(_) = direct.recv() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                continue;
            }
            while let Ok(claimed) = direct.try_recv() {
                this.start(claimed.item, claimed.slot, &done_tx);
            }

            if claim_at <= tokio::time::Instant::now() {
                let claimed = this.claim(&done_tx).await;
                let now = tokio::time::Instant::now();
                // After a failed claim, try again in a while.
                let (started, more_due, ran_out) = claimed.unwrap_or((0, false, true));
                starved = more_due || ran_out;
                this.backlog.store(more_due, Ordering::Relaxed);
                if more_due && this.slots.available_permits() > 0 {
                    claim_at = now;
                    continue;
                }
                claim_at = now + IDLE_POLL;
                if !starved {
                    match this.store.next_due_at().await {
                        Ok(Some(due)) => {
                            // A claim that found nothing due does not repeat at once even
                            // if an item seems due (one without its device would otherwise
                            // keep this loop spinning); ingest wakes it for new items.
                            let wait = match due - now_millis() {
                                w if w <= 0 && started == 0 => CLAIM_RETRY_MS,
                                w => w.clamp(0, 1000),
                            };
                            claim_at = now + Duration::from_millis(wait as u64);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
                    }
                }
                if claim_at <= now {
                    continue;
                }
            }
            tokio::select! {
                _ = this.wake.notified() => claim_at = tokio::time::Instant::now(),
                Some(c) = done_rx.recv() => batch.push(c),
                Some(claimed) = direct.recv() => this.start(claimed.item, claimed.slot, &done_tx),
                _ = tokio::time::sleep_until(claim_at) => {}
                _ = shutdown.changed() => stopping = true,
            }
        }
    }

    /// Claims due items for the free slots and starts them. Returns how many it started,
    /// whether more may be due (the claim was full, or there was no slot and items are
    /// due) and whether the slots ran out; `None` if the store failed.
    async fn claim(
        self: &Arc<Self>,
        done: &mpsc::UnboundedSender<Completed>,
    ) -> Option<(usize, bool, bool)> {
        // The slots are taken before the claim: ingest, which takes them too, runs in the
        // store's writer between claims.
        let free = self.slots.available_permits().min(CLAIM_BATCH);
        let slots = match free {
            0 => None,
            n => self.slots.clone().try_acquire_many_owned(n as u32).ok(),
        };
        let Some(mut slots) = slots else {
            // No slot: are due items waiting for one?
            let waiting = match self.store.next_due_at().await {
                Ok(due) => due.is_some_and(|due| due <= now_millis()),
                Err(_) => false,
            };
            return Some((0, waiting, true));
        };
        match self.store.claim_due(now_millis(), free).await {
            Ok(items) => {
                let (started, more_due) = (items.len(), items.len() == free);
                for item in items {
                    if let Some(slot) = slots.split(1) {
                        self.start(item, slot, done);
                    }
                }
                drop(slots);
                Some((started, more_due, self.slots.available_permits() == 0))
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot claim outbox items.");
                None
            }
        }
    }

    /// Sends `item` in a task of its own, holding `slot` until its outcome is reported.
    fn start(
        self: &Arc<Self>,
        item: OutboxItem,
        slot: OwnedSemaphorePermit,
        done: &mpsc::UnboundedSender<Completed>,
    ) {
        let this = self.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let completed = this.send_one(item).await;
            let _ = done.send(completed);
            drop(slot);
        });
    }

    async fn send_one(&self, item: OutboxItem) -> Completed {
        let now = now_millis();
        let kind = item.device.transport;
        let user = item.device.user.clone();
        let event_id = item.content.event_id.clone();
        let decision = if self.policy.expired(&item, now) {
            Decision {
                completion: Completion::Drop {
                    reason: format!("deadline exceeded after {} attempts", item.attempts),
                },
                failure: Some(FailureClass::Deadline),
            }
        } else {
            let push = push_for(&item);
            let (outcome, retry_class) = match self.transports.get(&push.app, kind) {
                None => (
                    Outcome::Retry {
                        reason: format!("no transport configured for app {} ({kind})", push.app),
                        after: None,
                    },
                    FailureClass::NoTransport,
                ),
                Some(t) => match tokio::time::timeout(self.send_timeout, t.send(&push)).await {
                    Ok(o) => (o, FailureClass::Retry),
                    Err(_) => (
                        Outcome::Retry {
                            reason: "transport timed out".into(),
                            after: None,
                        },
                        FailureClass::Timeout,
                    ),
                },
            };
            if let Outcome::CredentialsRejected { reason } = &outcome {
                tracing::error!(
                    app = %push.app,
                    transport = %kind,
                    reason = %reason,
                    "ALERT: the push provider rejected our credentials; items are kept and retried."
                );
            }
            self.policy
                .decide(&item, outcome, now_millis(), jitter_unit(), retry_class)
        };
        match decision.failure {
            None => {
                self.metrics.sent(kind);
                tracing::debug!(user = %user, event_id = ?event_id, transport = %kind, "Push delivered.");
            }
            Some(class) => {
                self.metrics.failed(kind, class);
                tracing::info!(
                    user = %user,
                    event_id = ?event_id,
                    transport = %kind,
                    token = %shorten_token(&item.device.token),
                    outcome = class.as_str(),
                    completion = ?decision.completion,
                    "Push not delivered."
                );
            }
        }
        Completed {
            item_id: item.id,
            device_id: item.device.id,
            user,
            at: now_millis(),
            completion: decision.completion,
        }
    }

    /// Records a batch of outcomes; gives the batch back if the store failed (recording
    /// again is harmless: each outcome's statements are idempotent).
    async fn record(&self, batch: Vec<Completed>) -> Result<(), Vec<Completed>> {
        match self.store.complete(batch.clone()).await {
            Ok(outcome) => {
                for user in outcome.users_without_devices {
                    let mail = self.mail.clone();
                    let store = self.store.clone();
                    let lock = self.user_locks.get(&user);
                    tokio::spawn(async move {
                        // Under the user's lock, and only if no device was registered
                        // since (that registration set the METADATA again).
                        let _guard = lock.lock().await;
                        match store.devices_of(user.clone()).await {
                            Ok(devices) if devices.is_empty() => {}
                            Ok(_) => return,
                            Err(e) => {
                                tracing::warn!(user = %user, error = %e, "Cannot read the user's devices; subscription METADATA left as is.");
                                return;
                            }
                        }
                        match mail.clear_subscription_as_master(&user).await {
                            Ok(()) => {
                                tracing::info!(user = %user, "Last device removed; subscription METADATA cleared.")
                            }
                            Err(MailError::NoMasterUser) => tracing::info!(
                                user = %user,
                                "Last device removed; no master user to clear the METADATA (events will be dropped)."
                            ),
                            Err(e) => {
                                tracing::warn!(user = %user, error = %e, "Cannot clear the subscription METADATA.")
                            }
                        }
                    });
                }
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    outcomes = batch.len(),
                    "Cannot record push outcomes; trying again in a second."
                );
                return Err(batch);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::Device;
    use crate::domain::event::PushContent;
    use crate::transport::TransportKind;

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
            device: Device {
                id: 2,
                ..Device::for_tests("alice", TransportKind::Apns, "tok")
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
        let d = p.decide(&it, Outcome::Delivered, 10, 0.0, FailureClass::Retry);
        assert_eq!(d.completion, Completion::Delivered);
        assert_eq!(d.failure, None);
        let d = p.decide(
            &it,
            Outcome::Retry {
                reason: "503".into(),
                after: None,
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
                after: Some(Duration::from_secs(30)),
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
                after: None,
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
    fn push_hides_the_user_in_the_collapse_id() {
        let p = push_for(&item(0, 0));
        assert_eq!(p.collapse_id().len(), 24);
        assert!(!p.collapse_id().contains("alice"));
        assert_eq!(p.unseen, Some(1));
    }
}
