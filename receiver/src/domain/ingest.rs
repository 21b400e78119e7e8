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
