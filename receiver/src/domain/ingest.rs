//! Accepting a new-mail event: one durable commit of the event and its outbox items, then
//! counting it and handing the items the store marked in flight to the dispatcher (or
//! waking it to claim the others).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::event::NewMailEvent;
use crate::store::{Claimed, IngestOutcome, SendSlots, Store, StoreError};
use crate::telemetry::Metrics;

/// The ingest service.
pub struct Ingest {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    coalesce: Duration,
    wake: Arc<Notify>,
    slots: SendSlots,
    direct: mpsc::UnboundedSender<Claimed>,
}

impl Ingest {
    /// `coalesce` is how long a new outbox item waits for more events; `wake`, `slots` and
    /// `direct` are the dispatcher's (see [`super::outbox::Dispatcher`]).
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        coalesce: Duration,
        wake: Arc<Notify>,
        slots: SendSlots,
        direct: mpsc::UnboundedSender<Claimed>,
    ) -> Self {
        Self {
            store,
            metrics,
            coalesce,
            wake,
            slots,
            direct,
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
        let mut outcome = self
            .store
            .ingest(event, due_at, Some(self.slots.clone()))
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
            let pending = outcome.queued as usize > outcome.claimed.len();
            for claimed in outcome.claimed.drain(..) {
                // A dispatcher that is gone leaves the item in flight in the store: it is
                // sent after the restart.
                let _ = self.direct.send(claimed);
            }
            if pending {
                self.wake.notify_one();
            }
        }
        Ok(outcome)
    }
}
