//! Accepting a new-mail event: one durable commit of the event and its outbox items (the
//! store hands those it marks in flight to the dispatcher), then counting it and waking
//! the dispatcher to claim the others.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::event::NewMailEvent;
use crate::store::{HandOver, IngestOutcome, Store, StoreError};
use crate::telemetry::Metrics;

/// The ingest service.
pub struct Ingest {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    coalesce: Duration,
    wake: Arc<Notify>,
    hand_over: HandOver,
}

impl Ingest {
    /// `coalesce` is how long a new outbox item waits for more events; `wake` and
    /// `hand_over` are the dispatcher's (see [`super::outbox::Dispatcher`]).
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        coalesce: Duration,
        wake: Arc<Notify>,
        hand_over: HandOver,
    ) -> Self {
        Self {
            store,
            metrics,
            coalesce,
            wake,
            hand_over,
        }
    }

    /// Commits `event`; resolves once it is durable.
    pub async fn accept(&self, event: NewMailEvent) -> Result<IngestOutcome, StoreError> {
        // Only the debug logs need the user and event id after the store took the event:
        // copy them only when those logs are on (this is the hot path).
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (event.user.clone(), event.event_id.clone()));
        let (user, event_id) = match &logged {
            Some((user, event_id)) => (user.as_str(), event_id.as_deref()),
            None => ("", None),
        };
        let due_at = event.received_at + self.coalesce.as_millis() as i64;
        let outcome = self
            .store
            .ingest(event, due_at, Some(self.hand_over.clone()))
            .await?;
        let m = &self.metrics;
        if outcome.duplicate {
            Metrics::add(&m.duplicates, 1);
            tracing::debug!(user = %user, event_id = ?event_id, "Duplicate notification ignored.");
            return Ok(outcome);
        }
        Metrics::add(&m.ingested, 1);
        if outcome.matched_devices == 0 {
            Metrics::add(&m.dropped_no_device, 1);
            tracing::debug!(user = %user, event_id = ?event_id, "No device follows this folder; event dropped.");
        } else {
            Metrics::add(&m.queued, u64::from(outcome.queued));
            Metrics::add(&m.coalesced, u64::from(outcome.coalesced));
            tracing::debug!(
                user = %user,
                event_id = ?event_id,
                queued = outcome.queued,
                coalesced = outcome.coalesced,
                "Notification queued."
            );
            // The store handed the items it marked in flight to the dispatcher itself.
            if outcome.queued > outcome.handed_over {
                self.wake.notify_one();
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::DeviceRegistration;
    use crate::store::sqlite::SqliteStore;
    use crate::transport::{Privacy, TransportKind};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn event(user: &str, id: &str, folder: &str) -> NewMailEvent {
        NewMailEvent {
            event_id: Some(id.into()),
            user: user.into(),
            folder: folder.into(),
            uidvalidity: 1,
            uid: 7,
            from: None,
            subject: Some("hello".into()),
            snippet: None,
            unseen: Some(1),
            received_at: crate::domain::now_millis(),
        }
    }

    /// An ingest service on a fresh store where alice has one device for INBOX, with
    /// `slots` send slots; also the receiving end of its hand-over.
    async fn ingest(
        slots: usize,
    ) -> (
        tempfile::TempDir,
        Ingest,
        Arc<Metrics>,
        Arc<Notify>,
        tokio::sync::mpsc::UnboundedReceiver<crate::store::Claimed>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("store.sqlite")).unwrap());
        store
            .register_device(
                DeviceRegistration {
                    user: "alice".into(),
                    app: "mail".into(),
                    transport: TransportKind::Apns,
                    token: "a".repeat(64),
                    mailboxes: vec!["INBOX".into()],
                    privacy: Privacy::Full,
                },
                1,
            )
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let wake = Arc::new(Notify::new());
        let (to, rx) = tokio::sync::mpsc::unbounded_channel();
        let hand_over = HandOver {
            slots: Arc::new(tokio::sync::Semaphore::new(slots)),
            to,
            backlog: Arc::new(AtomicBool::new(false)),
        };
        let ingest = Ingest::new(
            store,
            metrics.clone(),
            Duration::ZERO,
            wake.clone(),
            hand_over,
        );
        (dir, ingest, metrics, wake, rx)
    }

    fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn counts_queued_duplicate_and_dropped_events() {
        let (_dir, ingest, m, _wake, mut handed) = ingest(4).await;
        let first = ingest.accept(event("alice", "e1", "INBOX")).await.unwrap();
        assert_eq!((first.queued, first.handed_over), (1, 1));
        assert!(handed.try_recv().is_ok(), "in flight at once, with a slot");
        let again = ingest.accept(event("alice", "e1", "INBOX")).await.unwrap();
        assert!(again.duplicate);
        // No device follows that folder; nobody has devices at all.
        ingest.accept(event("alice", "e2", "Spam")).await.unwrap();
        ingest.accept(event("bob", "e3", "INBOX")).await.unwrap();
        assert_eq!(count(&m.ingested), 3, "duplicates are not ingested again");
        assert_eq!(count(&m.duplicates), 1);
        assert_eq!(count(&m.dropped_no_device), 2);
        assert_eq!(count(&m.queued), 1);
    }

    #[tokio::test]
    async fn items_left_pending_wake_the_dispatcher() {
        // No free slot: the item stays pending and the dispatcher is told to claim it.
        let (_dir, ingest, _m, wake, mut handed) = ingest(0).await;
        let woken = wake.notified();
        let outcome = ingest.accept(event("alice", "e1", "INBOX")).await.unwrap();
        assert_eq!((outcome.queued, outcome.handed_over), (1, 0));
        assert!(handed.try_recv().is_err());
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("the dispatcher was woken");
    }
}
