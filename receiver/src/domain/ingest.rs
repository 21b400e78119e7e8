//! Accepting a new-mail event: one durable commit of the event and its outbox items, the
//! items the store wrote in flight handed to the dispatcher, then counting it and waking
//! the dispatcher to claim the others. A badge update waits at least
//! `[outbox] badge_wait_milliseconds` for more, so that a burst of reads is one push.
//!
//! The hand-over happens whatever becomes of the request: a caller that stops waiting (a
//! client that gave up) leaves the store's answer to a task that still hands the items
//! over, since nothing else would send them before a restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::event::{EventKind, NewMailEvent};
use super::outbox::HandOver;
use super::store::{IngestOutcome, Ingested, Store, StoreError};
use crate::telemetry::Metrics;

/// How long a new item for an event of `kind` waits for more events: `coalesce` (`[outbox]
/// coalesce_milliseconds`), and for a badge update (`messageRead`, `messageExpunge`,
/// `messageAppend`) at least `badge_wait` (`[outbox] badge_wait_milliseconds`): a client
/// marking mails read one by one, or reading then expunging, gives one push with the
/// latest count, and the phone's badge still follows within seconds.
pub fn coalesce_window(coalesce: Duration, badge_wait: Duration, kind: EventKind) -> Duration {
    if kind.is_badge_update() {
        coalesce.max(badge_wait)
    } else {
        coalesce
    }
}

/// The ingest service.
pub struct Ingest {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    coalesce: Duration,
    badge_wait: Duration,
    wake: Arc<Notify>,
    hand_over: HandOver,
}

impl Ingest {
    /// `coalesce` is how long a new outbox item waits for more events, `badge_wait` how
    /// long a badge update's waits at least ([`coalesce_window`]); `wake` and `hand_over`
    /// are the dispatcher's (see [`super::outbox::Dispatcher`]).
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        coalesce: Duration,
        badge_wait: Duration,
        wake: Arc<Notify>,
        hand_over: HandOver,
    ) -> Self {
        Self {
            store,
            metrics,
            coalesce,
            badge_wait,
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
        let kind = event.kind;
        let due_at = event.received_at
            + coalesce_window(self.coalesce, self.badge_wait, kind).as_millis() as i64;
        let ingesting = self.store.ingest(event, due_at, self.hand_over.room());
        let outcome = HandingOver::new(ingesting, &self.hand_over).await?;
        let m = &self.metrics;
        if outcome.duplicate {
            m.duplicates.inc();
            tracing::debug!(user = %user, event_id = ?event_id, "Duplicate notification ignored.");
            return Ok(outcome);
        }
        m.ingested.inc();
        m.ingested_event(kind);
        if outcome.stale {
            m.stale_badges.inc();
            tracing::debug!(user = %user, event_id = ?event_id, "Badge update older than one already taken; dropped.");
        } else if outcome.matched_devices == 0 {
            m.dropped_no_device.inc();
            tracing::debug!(user = %user, event_id = ?event_id, "No device follows this folder; event dropped.");
        } else {
            m.queued.inc_by(u64::from(outcome.queued));
            m.coalesced.inc_by(u64::from(outcome.coalesced));
            tracing::debug!(
                user = %user,
                event_id = ?event_id,
                queued = outcome.queued,
                coalesced = outcome.coalesced,
                "Notification queued."
            );
            // The items written in flight are with the dispatcher already; an item that
            // absorbed this event may have to leave sooner than the dispatcher planned.
            if outcome.queued > outcome.handed_over || outcome.advanced > 0 {
                self.wake.notify_one();
            }
        }
        Ok(outcome)
    }
}

/// A store ingest whose in-flight items go to the dispatcher when it completes, or, if
/// it is dropped before that, when a task it leaves behind has completed it.
struct HandingOver<'a> {
    ingesting: Option<BoxFuture<'static, Ingested>>,
    hand_over: &'a HandOver,
}

impl<'a> HandingOver<'a> {
    fn new(ingesting: BoxFuture<'static, Ingested>, hand_over: &'a HandOver) -> Self {
        Self {
            ingesting: Some(ingesting),
            hand_over,
        }
    }
}

impl Future for HandingOver<'_> {
    type Output = Result<IngestOutcome, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(ingesting) = self.ingesting.as_mut() else {
            return Poll::Ready(Err(StoreError::Closed));
        };
        let Poll::Ready(ingested) = ingesting.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.ingesting = None;
        self.hand_over.give(ingested.in_flight);
        Poll::Ready(ingested.result)
    }
}

impl Drop for HandingOver<'_> {
    fn drop(&mut self) {
        let Some(ingesting) = self.ingesting.take() else {
            return;
        };
        let hand_over = self.hand_over.clone();
        // Without a runtime (the process is stopping) items written in flight are sent
        // after the restart.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { hand_over.give(ingesting.await.in_flight) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badge_updates_wait_their_own_time_for_more_new_mail_does_not() {
        let (zero, second) = (Duration::ZERO, Duration::from_secs(1));
        assert_eq!(coalesce_window(zero, second, EventKind::MessageNew), zero);
        for kind in [
            EventKind::MessageRead,
            EventKind::MessageExpunge,
            EventKind::MessageAppend,
        ] {
            assert_eq!(coalesce_window(zero, second, kind), second);
            assert_eq!(coalesce_window(zero, zero, kind), zero);
        }
        let long = Duration::from_secs(5);
        assert_eq!(coalesce_window(long, second, EventKind::MessageRead), long);
    }
    use crate::domain::device::DeviceRegistration;
    use crate::domain::store::OutboxItem;
    use crate::store::sqlite::SqliteStore;
    use dovepush_push::{DeviceKind, Privacy};

    fn event(user: &str, id: &str, folder: &str) -> NewMailEvent {
        NewMailEvent {
            event_id: Some(id.into()),
            kind: crate::domain::event::EventKind::MessageNew,
            user: user.into(),
            folder: folder.into(),
            uidvalidity: 1,
            uid: 7,
            from: None,
            subject: Some("hello".into()),
            snippet: None,
            unseen: Some(1),
            time_ms: None,
            received_at: crate::domain::now_millis(),
        }
    }

    /// An ingest service on a fresh store where alice has one device for INBOX, with
    /// `slots` send slots; also its hand-over and the dispatcher's end of it.
    async fn ingest(
        slots: usize,
    ) -> (
        tempfile::TempDir,
        Ingest,
        Arc<Metrics>,
        Arc<Notify>,
        (HandOver, tokio::sync::mpsc::UnboundedReceiver<OutboxItem>),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("store.sqlite")).unwrap());
        store
            .register_device(
                DeviceRegistration {
                    user: "alice".into(),
                    app: "mail".into(),
                    transport: DeviceKind::Apns,
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
        let (hand_over, rx) = HandOver::new(Arc::new(tokio::sync::Semaphore::new(slots)));
        let ingest = Ingest::new(
            store,
            metrics.clone(),
            Duration::ZERO,
            Duration::from_secs(1),
            wake.clone(),
            hand_over.clone(),
        );
        (dir, ingest, metrics, wake, (hand_over, rx))
    }

    fn count(counter: &prometheus_client::metrics::counter::Counter) -> u64 {
        counter.get()
    }

    #[tokio::test]
    async fn counts_queued_duplicate_and_dropped_events() {
        let (_dir, ingest, m, _wake, (_, mut handed)) = ingest(4).await;
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
        let (_dir, ingest, _m, wake, (_, mut handed)) = ingest(0).await;
        let woken = wake.notified();
        let outcome = ingest.accept(event("alice", "e1", "INBOX")).await.unwrap();
        assert_eq!((outcome.queued, outcome.handed_over), (1, 0));
        assert!(handed.try_recv().is_err());
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("the dispatcher was woken");
    }

    #[tokio::test]
    async fn no_hand_over_while_due_items_wait_for_a_slot() {
        let (_dir, ingest, _m, wake, (hand_over, mut handed)) = ingest(2).await;
        // The dispatcher reports due items waiting for slots: new ones queue behind them.
        hand_over.set_backlog(true);
        let woken = wake.notified();
        let outcome = ingest.accept(event("alice", "e1", "INBOX")).await.unwrap();
        assert_eq!((outcome.queued, outcome.handed_over), (1, 0));
        assert!(handed.try_recv().is_err());
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("the dispatcher was woken");
    }

    #[tokio::test]
    async fn a_request_given_up_still_hands_its_item_over() {
        let (_dir, ingest, _m, _wake, (_, mut handed)) = ingest(1).await;
        // The caller drops the ingest before it is answered (a request the client gave
        // up on): the committed item still reaches the dispatcher.
        let accepting = ingest.accept(event("alice", "e1", "INBOX"));
        let _ = tokio::time::timeout(Duration::ZERO, accepting).await;
        let item = tokio::time::timeout(Duration::from_secs(5), handed.recv())
            .await
            .expect("handed over")
            .unwrap();
        assert_eq!(item.content.event_id.as_deref(), Some("e1"));
    }
}
