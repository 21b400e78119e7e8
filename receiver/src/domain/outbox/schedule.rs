//! The dispatcher's state between two turns of its loop, and its transitions: when to
//! claim from the store next, whether due items wait for a send slot, the outcomes not
//! yet recorded, the handed-over items waiting for a slot, and the shutdown deadline.
//!
//! Pure: every transition takes the current instant, and the dispatcher does the I/O
//! (store calls, sends) around them, so the rules are unit-tested here without a clock.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::store::{Completed, Completion, OutboxItem};

/// Longest the dispatcher sleeps without looking at the store (picks up CLI retries).
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// After a claim that started nothing while an item seemed due, the least wait before the
/// next one (an item without its device would otherwise keep the loop spinning).
pub const CLAIM_RETRY: Duration = Duration::from_millis(50);
/// After the store failed to record push outcomes, they are recorded again this much later
/// (until then their items stay in flight, their slots already free).
pub const RECORD_RETRY: Duration = Duration::from_secs(1);
/// How long a stopping dispatcher waits for pushes in flight.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// What one claim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Items it started.
    pub started: usize,
    /// More items may be due: the claim was full, or there was no slot and items are due.
    pub more_due: bool,
    /// The send slots ran out.
    pub ran_out: bool,
}

/// What the dispatcher does after a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClaim {
    /// Claim again at once (more is due and slots are free).
    Again,
    /// Ask the store when the next item is due ([`Schedule::next_due`]).
    AskNextDue,
    /// Wait: for a completion to free a slot, a wake-up, or the idle poll.
    Wait,
}

/// The dispatcher's state.
#[derive(Debug)]
pub struct Schedule {
    /// When to claim from the store next.
    claim_at: Instant,
    /// Due items may be waiting in the store for slots.
    starved: bool,
    /// The last claim found more due than it could start.
    more_due: bool,
    /// Items the last claim started.
    last_started: usize,
    /// Outcomes not yet recorded in the store.
    unrecorded: Vec<Completed>,
    /// Set while outcomes the store failed to record wait for another try.
    record_at: Option<Instant>,
    /// Items ingest handed over while every slot was busy (in flight in the store).
    waiting: VecDeque<OutboxItem>,
    /// Set once shutdown began: when to stop waiting for pushes in flight.
    stop_by: Option<Instant>,
}

impl Schedule {
    /// A dispatcher that claims at once.
    pub fn new(now: Instant) -> Self {
        Self {
            claim_at: now,
            starved: false,
            more_due: false,
            last_started: 0,
            unrecorded: Vec::new(),
            record_at: None,
            waiting: VecDeque::new(),
            stop_by: None,
        }
    }

    /// A push's outcome arrived.
    pub fn reported(&mut self, done: Completed) {
        self.unrecorded.push(done);
    }

    /// Whether to record the outcomes that arrived now.
    pub fn should_record(&self, now: Instant) -> bool {
        !self.unrecorded.is_empty() && self.record_at.is_none_or(|at| at <= now)
    }

    /// The outcomes to record.
    pub fn take_unrecorded(&mut self) -> Vec<Completed> {
        std::mem::take(&mut self.unrecorded)
    }

    /// The outcomes were recorded, or given back (`kept`) because the store failed;
    /// `retry_in` is when the soonest item they retry falls due.
    pub fn recorded(
        &mut self,
        kept: Option<Vec<Completed>>,
        retry_in: Option<Duration>,
        now: Instant,
    ) {
        self.record_at = None;
        if let Some(mut kept) = kept {
            // The loop wakes for them with the next claim at the latest.
            kept.append(&mut self.unrecorded);
            self.unrecorded = kept;
            let at = now + RECORD_RETRY;
            self.record_at = Some(at);
            self.claim_at = self.claim_at.min(at);
        }
        // Their slots are free: items that waited for one are claimed now.
        if self.starved {
            self.claim_at = now;
        }
        // A retry due soon is claimed then, not at the next poll.
        if let Some(wait) = retry_in {
            self.claim_at = self.claim_at.min(now + wait);
        }
    }

    /// Ingest handed over an item it wrote in flight.
    pub fn handed_over(&mut self, item: OutboxItem) {
        self.waiting.push_back(item);
    }

    /// The oldest handed-over item, for a free slot.
    pub fn next_waiting(&mut self) -> Option<OutboxItem> {
        self.waiting.pop_front()
    }

    /// Whether handed-over items wait for a slot.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Drops the handed-over items that never started (at shutdown: they stay in flight
    /// in the store and are sent after the restart).
    pub fn forget_waiting(&mut self) {
        self.waiting.clear();
    }

    /// Whether to claim from the store now.
    pub fn claim_due(&self, now: Instant) -> bool {
        self.claim_at <= now
    }

    /// When the loop must wake up at the latest.
    pub fn wake_at(&self) -> Instant {
        self.claim_at
    }

    /// A claim ended (`None`: the store failed; try again in a while); `free_slots` are
    /// the slots left.
    pub fn claimed(&mut self, claim: Option<Claim>, free_slots: usize, now: Instant) -> AfterClaim {
        let claim = claim.unwrap_or(Claim {
            started: 0,
            more_due: false,
            ran_out: true,
        });
        self.starved = claim.more_due || claim.ran_out;
        self.more_due = claim.more_due;
        self.last_started = claim.started;
        if claim.more_due && free_slots > 0 {
            self.claim_at = now;
            return AfterClaim::Again;
        }
        self.claim_at = now + IDLE_POLL;
        if self.starved {
            AfterClaim::Wait
        } else {
            AfterClaim::AskNextDue
        }
    }

    /// The next pending item is due in `due_in_ms` (negative: overdue).
    pub fn next_due(&mut self, due_in_ms: i64, now: Instant) {
        // A claim that started nothing does not repeat at once even if an item seems due;
        // ingest wakes the loop for new items.
        let wait = if due_in_ms <= 0 && self.last_started == 0 {
            CLAIM_RETRY
        } else {
            Duration::from_millis(due_in_ms.clamp(0, 1000) as u64)
        };
        self.claim_at = now + wait;
    }

    /// Ingest left an item pending: claim now.
    pub fn woken(&mut self, now: Instant) {
        self.claim_at = now;
    }

    /// Whether due items wait for a slot (ingest then leaves new items pending).
    pub fn backlog(&self) -> bool {
        self.more_due || !self.waiting.is_empty()
    }

    /// Shutdown began.
    pub fn stop(&mut self, now: Instant) {
        self.stop_by.get_or_insert(now + STOP_GRACE);
    }

    /// When a stopping dispatcher gives up waiting for pushes in flight; `None` while
    /// it runs.
    pub fn stop_by(&self) -> Option<Instant> {
        self.stop_by
    }
}

/// When the soonest retry among `outcomes` falls due (ms since the epoch).
pub fn earliest_retry(outcomes: &[Completed]) -> Option<i64> {
    outcomes
        .iter()
        .filter_map(|c| match c.completion {
            Completion::Retry { due_at, .. } => Some(due_at),
            _ => None,
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::RegisteredDevice;
    use crate::domain::event::PushContent;
    use dovepush_push::DeviceKind;

    fn done(id: i64, completion: Completion) -> Completed {
        Completed {
            item_id: id,
            device_id: 1,
            user: "alice".into(),
            at: 0,
            completion,
        }
    }

    fn item(id: i64) -> OutboxItem {
        OutboxItem {
            id,
            device: RegisteredDevice::for_tests("alice", DeviceKind::Apns, "tok"),
            content: PushContent {
                event_id: None,
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: 1,
                from: None,
                subject: None,
                snippet: None,
                unseen: None,
                received_at: 0,
                coalesced: 0,
                badge_only: false,
                time_ms: None,
            },
            attempts: 0,
            created_at: 0,
            due_at: 0,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_new_dispatcher_claims_at_once() {
        let now = Instant::now();
        let s = Schedule::new(now);
        assert!(s.claim_due(now));
        assert!(!s.backlog());
        assert!(!s.should_record(now));
        assert_eq!(s.stop_by(), None);
    }

    #[test]
    fn a_full_claim_with_free_slots_claims_again() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        let full = Claim {
            started: 256,
            more_due: true,
            ran_out: false,
        };
        assert_eq!(s.claimed(Some(full), 10, now), AfterClaim::Again);
        assert!(s.claim_due(now));
        assert!(s.backlog(), "ingest leaves new items behind the due ones");
    }

    #[test]
    fn items_waiting_for_slots_are_claimed_when_an_outcome_frees_one() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        let no_slot = Claim {
            started: 0,
            more_due: true,
            ran_out: true,
        };
        assert_eq!(s.claimed(Some(no_slot), 0, now), AfterClaim::Wait);
        assert!(s.backlog());
        assert_eq!(s.wake_at(), now + IDLE_POLL);
        let later = now + Duration::from_millis(30);
        s.reported(done(1, Completion::Delivered));
        assert!(s.should_record(later));
        let batch = s.take_unrecorded();
        assert_eq!(batch.len(), 1);
        s.recorded(None, None, later);
        assert!(
            s.claim_due(later),
            "the freed slot goes to a due item at once"
        );
    }

    #[test]
    fn a_claim_that_left_nothing_due_asks_when_the_next_item_is() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        let some = Claim {
            started: 3,
            more_due: false,
            ran_out: false,
        };
        assert_eq!(s.claimed(Some(some), 5, now), AfterClaim::AskNextDue);
        assert!(!s.backlog());
        s.next_due(300, now);
        assert_eq!(s.wake_at(), now + Duration::from_millis(300));
        s.next_due(5_000, now);
        assert_eq!(s.wake_at(), now + SECOND, "at least once a second");
        s.next_due(-20, now);
        assert!(s.claim_due(now), "overdue after a claim that started items");
    }

    #[test]
    fn a_claim_that_started_nothing_does_not_spin_on_an_overdue_item() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        let nothing = Claim {
            started: 0,
            more_due: false,
            ran_out: false,
        };
        assert_eq!(s.claimed(Some(nothing), 5, now), AfterClaim::AskNextDue);
        s.next_due(-20, now);
        assert_eq!(s.wake_at(), now + CLAIM_RETRY);
    }

    #[test]
    fn a_failed_claim_waits_for_the_idle_poll() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        assert_eq!(s.claimed(None, 5, now), AfterClaim::Wait);
        assert_eq!(s.wake_at(), now + IDLE_POLL);
        assert!(!s.backlog());
    }

    #[test]
    fn unrecorded_outcomes_are_kept_and_recorded_again_a_second_later() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        s.claimed(None, 5, now);
        s.reported(done(1, Completion::Delivered));
        s.reported(done(2, Completion::Delivered));
        let batch = s.take_unrecorded();
        // A third outcome arrives while the store fails the first two.
        s.reported(done(3, Completion::Delivered));
        s.recorded(Some(batch), None, now);
        assert!(!s.should_record(now + Duration::from_millis(999)));
        assert!(s.should_record(now + RECORD_RETRY));
        assert!(s.wake_at() <= now + RECORD_RETRY, "the loop wakes for them");
        let again: Vec<_> = s.take_unrecorded().iter().map(|c| c.item_id).collect();
        assert_eq!(again, vec![1, 2, 3], "oldest first, nothing lost");
        s.recorded(None, None, now + RECORD_RETRY);
        assert!(!s.should_record(now + RECORD_RETRY));
    }

    #[test]
    fn a_retry_due_soon_is_claimed_then() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        let some = Claim {
            started: 1,
            more_due: false,
            ran_out: false,
        };
        assert_eq!(s.claimed(Some(some), 5, now), AfterClaim::AskNextDue);
        assert_eq!(s.wake_at(), now + IDLE_POLL);
        let outcomes = vec![
            done(
                1,
                Completion::Retry {
                    due_at: 900,
                    reason: "503".into(),
                },
            ),
            done(
                2,
                Completion::Retry {
                    due_at: 400,
                    reason: "503".into(),
                },
            ),
            done(3, Completion::Delivered),
        ];
        assert_eq!(earliest_retry(&outcomes), Some(400));
        s.recorded(None, Some(Duration::from_millis(400)), now);
        assert_eq!(s.wake_at(), now + Duration::from_millis(400));
    }

    #[test]
    fn handed_over_items_wait_for_slots_oldest_first_and_hold_back_ingest() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        s.handed_over(item(1));
        s.handed_over(item(2));
        assert!(s.has_waiting());
        assert!(s.backlog());
        assert_eq!(s.next_waiting().map(|i| i.id), Some(1));
        assert_eq!(s.next_waiting().map(|i| i.id), Some(2));
        assert!(!s.backlog());
        s.handed_over(item(3));
        s.forget_waiting();
        assert!(!s.has_waiting());
    }

    #[test]
    fn a_wake_up_claims_now_and_a_stop_sets_one_deadline() {
        let now = Instant::now();
        let mut s = Schedule::new(now);
        s.claimed(None, 5, now);
        let later = now + Duration::from_millis(10);
        s.woken(later);
        assert!(s.claim_due(later));
        s.stop(later);
        s.stop(later + SECOND);
        assert_eq!(s.stop_by(), Some(later + STOP_GRACE));
    }
}
