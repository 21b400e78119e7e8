//! The dispatcher: the loop that starts handed-over and claimed items in send slots,
//! sends each through its transport (bounded by [`SEND_TIMEOUT`]), turns the outcome into
//! a completion with the [`RetryPolicy`], records completions in the store in batches,
//! clears a user's subscription when a push service removed their last device, and stops
//! cleanly.

use std::sync::Arc;
use std::time::Duration;

use dovepush_push::Outcome;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::hand_over::HandOver;
use super::schedule::{earliest_retry, AfterClaim, Claim, Schedule};
use super::{notification_for, Decision, RetryPolicy};
use crate::domain::credential_watch::CredentialWatch;
use crate::domain::device::shorten_token;
use crate::domain::registry::{clear_subscription_if_no_devices, UserLocks};
use crate::domain::store::{Completed, Completion, OutboxItem, Store};
use crate::domain::{jitter_unit, now_millis};
use crate::mailserver::MailServer;
use crate::telemetry::{FailureClass, Metrics};
use crate::transport::Transports;

/// Most items claimed per store round trip.
pub const CLAIM_BATCH: usize = 256;
/// Overall bound on one transport call.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Drives the outbox until shut down.
///
/// Items reach it two ways: ingest hands over the new items the store wrote in flight
/// (see [`HandOver`]), and the dispatcher claims the others from the store — pending
/// items (a device's next push while one is in flight, retries, items that found no
/// free slot) as they fall due. Each send holds one of the `concurrency` send slots; a
/// handed-over item that finds none waits for the next. It looks at the store when
/// ingest wakes it, when a completion frees a slot that due items were waiting for,
/// when the next pending item falls due, and at least every
/// [`IDLE_POLL`](super::schedule::IDLE_POLL) (to see the CLI's changes). Its state between
/// turns is a [`Schedule`].
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
    /// The send slots (`concurrency` of them) and ingest's view of them.
    pub hand_over: HandOver,
    pub concurrency: usize,
    pub send_timeout: Duration,
    /// Told of every provider verdict on our credentials.
    pub credentials: Arc<CredentialWatch>,
}

impl Dispatcher {
    /// Runs until `shutdown` turns true, then waits (bounded) for pushes in flight.
    /// `handed` brings the items ingest had written in flight.
    pub async fn run(
        self,
        mut handed: mpsc::UnboundedReceiver<OutboxItem>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Completed>();
        let mut s = Schedule::new(Instant::now());
        if *shutdown.borrow() {
            s.stop(Instant::now());
        }
        loop {
            while let Ok(c) = done_rx.try_recv() {
                s.reported(c);
            }
            if s.should_record(Instant::now()) {
                let batch = s.take_unrecorded();
                let retry = earliest_retry(&batch);
                let kept = this.record(batch).await.err();
                let retry_in =
                    retry.map(|due| Duration::from_millis((due - now_millis()).max(0) as u64));
                s.recorded(kept, retry_in, Instant::now());
            }
            if let Some(stop_by) = s.stop_by() {
                // Items handed over but not started stay in flight in the store: they are
                // sent after the restart.
                while handed.try_recv().is_ok() {}
                s.forget_waiting();
                let in_flight = this.concurrency - this.hand_over.slots().available_permits();
                if in_flight == 0 || Instant::now() >= stop_by {
                    if in_flight > 0 {
                        tracing::warn!(
                            in_flight,
                            "Stopping with pushes in flight; they will be retried after restart."
                        );
                    }
                    return;
                }
                tokio::select! {
                    Some(c) = done_rx.recv() => s.reported(c),
                    // Handed over too late to start: the item stays in flight in the store
                    // for the restart.
                    Some(_) = handed.recv() => {}
                    _ = tokio::time::sleep_until(stop_by) => {}
                }
                continue;
            }
            while let Ok(item) = handed.try_recv() {
                s.handed_over(item);
            }
            this.start_waiting(&mut s, &done_tx);

            let now = Instant::now();
            if s.claim_due(now) {
                let claim = this.claim(&done_tx).await;
                let now = Instant::now();
                let free = this.hand_over.slots().available_permits();
                if s.claimed(claim, free, now) == AfterClaim::AskNextDue {
                    match this.store.next_due_at().await {
                        Ok(Some(due)) => s.next_due(due - now_millis(), now),
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
                    }
                }
                if s.claim_due(now) {
                    continue;
                }
            }
            this.hand_over.set_backlog(s.backlog());
            tokio::select! {
                _ = this.wake.notified() => s.woken(Instant::now()),
                Some(c) = done_rx.recv() => s.reported(c),
                Some(item) = handed.recv() => s.handed_over(item),
                _ = tokio::time::sleep_until(s.wake_at()) => {}
                _ = shutdown.changed() => s.stop(Instant::now()),
            }
        }
    }

    /// Starts handed-over items while send slots are free, oldest first.
    fn start_waiting(self: &Arc<Self>, s: &mut Schedule, done: &mpsc::UnboundedSender<Completed>) {
        while s.has_waiting() {
            let Ok(slot) = self.hand_over.slots().clone().try_acquire_owned() else {
                return;
            };
            if let Some(item) = s.next_waiting() {
                self.start(item, slot, done);
            }
        }
    }

    /// Claims due items for the free slots and starts them; `None` if the store failed.
    async fn claim(self: &Arc<Self>, done: &mpsc::UnboundedSender<Completed>) -> Option<Claim> {
        // The slots are taken before the claim, so that items handed over meanwhile wait
        // for the next free one rather than exceed the concurrency.
        let slots = self.hand_over.slots();
        let free = slots.available_permits().min(CLAIM_BATCH);
        let slots = match free {
            0 => None,
            n => slots.clone().try_acquire_many_owned(n as u32).ok(),
        };
        let Some(mut slots) = slots else {
            // No slot: are due items waiting for one?
            let waiting = match self.store.next_due_at().await {
                Ok(due) => due.is_some_and(|due| due <= now_millis()),
                Err(_) => false,
            };
            return Some(Claim {
                started: 0,
                more_due: waiting,
                ran_out: true,
            });
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
                Some(Claim {
                    started,
                    more_due,
                    ran_out: self.hand_over.slots().available_permits() == 0,
                })
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
        let kind = item.device.device.kind;
        let user = item.device.user.clone();
        let event_id = item.content.event_id.clone();
        let badge_only = item.content.badge_only;
        let decision = if self.policy.expired(&item, now) {
            Decision {
                completion: Completion::Drop {
                    reason: format!("deadline exceeded after {} attempts", item.attempts),
                },
                failure: Some(FailureClass::Deadline),
            }
        } else {
            let device = &item.device.device;
            let app = &device.app_id;
            let (outcome, retry_class) = match self.transports.get(app, kind) {
                None => (
                    Outcome::Retry {
                        reason: format!("no transport configured for app {app} ({kind})"),
                        retry_after: None,
                    },
                    FailureClass::NoTransport,
                ),
                Some(t) => {
                    let notification = notification_for(&item);
                    let sending = t.send(device, &notification);
                    match tokio::time::timeout(self.send_timeout, sending).await {
                        Ok(o) => (o, FailureClass::Retry),
                        Err(_) => (
                            Outcome::Retry {
                                reason: "transport timed out".into(),
                                retry_after: None,
                            },
                            FailureClass::Timeout,
                        ),
                    }
                }
            };
            match &outcome {
                Outcome::CredentialsRejected { reason } => {
                    self.credentials
                        .rejected(app, kind, reason, std::time::SystemTime::now());
                }
                Outcome::Delivered { .. } => self.credentials.accepted(app, kind),
                _ => {}
            }
            if let Outcome::CredentialsRejected { reason } = &outcome {
                tracing::error!(
                    app = %app,
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
                if badge_only {
                    self.metrics.badge_sent(kind);
                }
                tracing::debug!(user = %user, event_id = ?event_id, transport = %kind, "Push delivered.");
            }
            Some(class) => {
                self.metrics.failed(kind, class);
                tracing::info!(
                    user = %user,
                    event_id = ?event_id,
                    transport = %kind,
                    token = %shorten_token(&item.device.device.token),
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
                    tokio::spawn(clear_subscription_if_no_devices(
                        user,
                        self.store.clone(),
                        self.user_locks.clone(),
                        self.mail.clone(),
                    ));
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
