//! The hand-over from ingest to the dispatcher: how many new items ingest may have the
//! store write in flight right now ([`HandOver::room`]: the dispatcher's free send slots,
//! none while due items wait for one), and the channel those items take once committed
//! ([`HandOver::give`]). The dispatcher gives each of them a send slot as one frees.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use crate::domain::store::OutboxItem;

/// Ingest's end of the dispatcher (cloned per ingest service; cheap).
#[derive(Debug, Clone)]
pub struct HandOver {
    slots: Arc<Semaphore>,
    to: mpsc::UnboundedSender<OutboxItem>,
    /// Set by the dispatcher while due items wait for a slot (in the store, or handed over
    /// earlier): ingest then leaves new items pending, so that freed slots go to the
    /// oldest first.
    backlog: Arc<AtomicBool>,
}

impl HandOver {
    /// A hand-over to a dispatcher with `slots` send slots; the receiver is the
    /// dispatcher's end.
    pub fn new(slots: Arc<Semaphore>) -> (HandOver, mpsc::UnboundedReceiver<OutboxItem>) {
        let (to, from) = mpsc::unbounded_channel();
        let hand_over = HandOver {
            slots,
            to,
            backlog: Arc::new(AtomicBool::new(false)),
        };
        (hand_over, from)
    }

    /// How many new items may go to the dispatcher in flight now. A snapshot: items
    /// handed over while every slot is busy wait in the dispatcher for the next one.
    pub fn room(&self) -> usize {
        if self.backlog.load(Ordering::Relaxed) {
            0
        } else {
            self.slots.available_permits()
        }
    }

    /// Gives committed in-flight items to the dispatcher. A dispatcher that is gone leaves
    /// them in flight in the store: they are sent after the restart.
    pub fn give(&self, items: Vec<OutboxItem>) {
        for item in items {
            let _ = self.to.send(item);
        }
    }

    /// The dispatcher's send slots.
    pub fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// Tells ingest whether due items wait for a slot.
    pub fn set_backlog(&self, backlog: bool) {
        self.backlog.store(backlog, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_the_free_slots_unless_items_wait() {
        let slots = Arc::new(Semaphore::new(2));
        let (h, _from) = HandOver::new(slots.clone());
        assert_eq!(h.room(), 2);
        let taken = slots.clone().try_acquire_owned().unwrap();
        assert_eq!(h.room(), 1, "a push in flight holds its slot");
        drop(taken);
        assert_eq!(h.room(), 2, "the slot comes back with the push");
        h.set_backlog(true);
        assert_eq!(h.room(), 0);
        h.set_backlog(false);
        assert_eq!(h.room(), 2);
    }
}
