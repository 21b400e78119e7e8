//! The persistence port: the [`Store`] trait the domain works against, the records it takes
//! and returns (outbox items, completions, what an ingest or a registration did) and its
//! error. Implementations live outside the domain (`crate::store`).
//!
//! The trait owns what "durable" means: every method that changes state resolves only after
//! the change is committed. A store runs the fan-out of an event inside its transaction,
//! with the domain's pure rules ([`super::device::wants_folder`],
//! [`super::event::PushContent::absorb`]), so an event and its outbox items are committed
//! together. It only returns what it wrote: handing items to the dispatcher is
//! [`super::ingest`]'s job.

use futures_util::future::BoxFuture;

use super::device::{DeviceRegistration, RegisteredDevice};
use super::event::{NewMailEvent, PushContent};

/// Store failures. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (connection refused or lost, server shutting
    /// down); callers answer 503 and try again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's schema is of another version than this program's.
    #[error("{0}")]
    Schema(String),
    #[error("cannot open store {path}: {message}")]
    Open { path: String, message: String },
    #[error("database error: {0}")]
    Database(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("store is shut down")]
    Closed,
}

/// What one ingest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestOutcome {
    /// The event id was seen before; nothing was changed.
    pub duplicate: bool,
    /// Devices of the user that follow the event's folder.
    pub matched_devices: u32,
    /// New outbox items created.
    pub queued: u32,
    /// Pending outbox items that absorbed the event instead.
    pub coalesced: u32,
    /// Of those, items whose send time moved earlier: a new-mail alert folded into a
    /// badge update still waiting (an item in backoff keeps its retry time).
    pub advanced: u32,
    /// New items (counted in `queued`) written in flight, for the dispatcher.
    pub handed_over: u32,
    /// A badge update older (by `event-time-ms`) than one committed before for the same
    /// user and folder: committed (its id is known), but nothing queued, so that a late
    /// event never pushes a stale count after the newer one.
    pub stale: bool,
}

/// What [`Store::ingest`] resolves to: the items it wrote in flight and committed, which
/// must go to the dispatcher whatever the result says (a failed sync of a committed batch
/// is an error for the caller, but its items are in flight all the same), and the result.
#[derive(Debug)]
pub struct Ingested {
    pub in_flight: Vec<OutboxItem>,
    pub result: Result<IngestOutcome, StoreError>,
}

impl Ingested {
    /// An ingest that wrote nothing.
    pub fn failed(error: StoreError) -> Self {
        Self {
            in_flight: Vec::new(),
            result: Err(error),
        }
    }
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterOutcome {
    /// False when the device existed and was updated.
    pub created: bool,
    /// How many devices the user had before.
    pub devices_before: u64,
}

/// What a removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoveOutcome {
    pub removed: bool,
    pub devices_left: u64,
}

/// An outbox item in flight, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    pub id: i64,
    pub device: RegisteredDevice,
    pub content: PushContent,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the newest absorbed event arrived (deadline base), ms since the epoch.
    pub created_at: i64,
    pub due_at: i64,
}

/// What the outbox decided about a sent item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Remove the item; record success on the device.
    Delivered,
    /// Keep the item, try again at `due_at`; record `reason` on the device.
    Retry { due_at: i64, reason: String },
    /// Remove the device and its items; record `reason` on the user.
    DeleteDevice { reason: String },
    /// Remove the item; record `reason` on the device.
    Drop { reason: String },
}

/// One completion for [`Store::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    pub item_id: i64,
    pub device_id: i64,
    pub user: String,
    /// When it was decided (ms since the epoch).
    pub at: i64,
    pub completion: Completion,
}

/// What a batch of completions did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompleteOutcome {
    /// Users whose last device was removed by this batch.
    pub users_without_devices: Vec<String>,
}

/// A device an idle sweep removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleDevice {
    pub user: String,
    pub app: String,
    pub transport: String,
    /// When it last registered (`PUT /v1/devices`), ms since the epoch.
    pub last_seen: i64,
}

/// What [`Store::remove_idle_devices`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdleRemoval {
    pub removed: Vec<IdleDevice>,
    /// Users whose last device was removed by this call.
    pub users_without_devices: Vec<String>,
}

/// One user in the status listing.
#[derive(Debug, Clone, PartialEq)]
pub struct UserStatus {
    pub user: String,
    /// The last reason a device of this user was removed.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub devices: Vec<RegisteredDevice>,
}

/// One outbox row as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    pub id: i64,
    pub user: String,
    pub app: String,
    pub transport: String,
    pub token: String,
    pub in_flight: bool,
    pub attempts: u32,
    pub created_at: i64,
    pub due_at: i64,
    pub last_error: Option<String>,
    pub event_id: Option<String>,
}

/// The registry and the outbox. Every mutating method resolves after its commit.
pub trait Store: Send + Sync {
    /// Records the event (de-duplicated by event id) and fans it out to the user's devices:
    /// one new item per device, or absorbed into that device's pending item. New items are
    /// due at `due_at`. Up to `in_flight_limit` new items that are due at once, for devices
    /// with no other item, are written in flight and returned in [`Ingested::in_flight`];
    /// the others are pending, for a claim.
    ///
    /// The future does not borrow the store, so that a caller that stops waiting can let
    /// it finish elsewhere and still take the items it wrote in flight.
    fn ingest(
        &self,
        event: NewMailEvent,
        due_at: i64,
        in_flight_limit: usize,
    ) -> BoxFuture<'static, Ingested>;

    /// Inserts or updates the device `(user, app, token)`.
    fn register_device(
        &self,
        registration: DeviceRegistration,
        now: i64,
    ) -> BoxFuture<'_, Result<RegisterOutcome, StoreError>>;

    /// Removes the user's devices with this token (any app) and their outbox items.
    fn remove_device(
        &self,
        user: String,
        token: String,
    ) -> BoxFuture<'_, Result<RemoveOutcome, StoreError>>;

    /// Removes up to `limit` devices that have not registered (`PUT /v1/devices` creates
    /// or refreshes) since `seen_before`, oldest first, with their outbox items, and
    /// records `reason` at `now` on their users. Fewer than `limit` removed: no more are
    /// idle.
    fn remove_idle_devices(
        &self,
        seen_before: i64,
        limit: usize,
        reason: String,
        now: i64,
    ) -> BoxFuture<'_, Result<IdleRemoval, StoreError>>;

    /// The user's devices, oldest first.
    fn devices_of(&self, user: String) -> BoxFuture<'_, Result<Vec<RegisteredDevice>, StoreError>>;

    /// Marks up to `limit` items due at `now` as in flight and returns them, oldest due first.
    fn claim_due(
        &self,
        now: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxItem>, StoreError>>;

    /// Applies completions of items in flight.
    fn complete(&self, done: Vec<Completed>) -> BoxFuture<'_, Result<CompleteOutcome, StoreError>>;

    /// When the next pending item is due.
    fn next_due_at(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>>;

    /// Users with devices (or a last error), with their devices; one user if given.
    fn subscriptions(
        &self,
        user: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<UserStatus>, StoreError>>;

    /// Outbox rows, oldest due first.
    fn queue_list(&self, limit: usize) -> BoxFuture<'_, Result<Vec<QueueEntry>, StoreError>>;

    /// Makes an item due now (and pending again). False if no such item.
    fn queue_retry(&self, id: i64, now: i64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Deletes an item. False if no such item.
    fn queue_drop(&self, id: i64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Forgets events received before `before` (ends their de-duplication).
    fn prune_events(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Outbox items right now (pending and in flight), of every receiver sharing the store.
    fn outbox_depth(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Holds `user`'s lock for every process sharing the store until the returned guard
    /// is dropped (`None`: this store has no other process to exclude). The caller holds
    /// its own process's lock first (see [`super::registry::UserLocks`]).
    fn lock_user(&self, user: String) -> BoxFuture<'_, Result<Option<HeldLock>, StoreError>> {
        let _ = user;
        Box::pin(async { Ok(None) })
    }

    /// Gives back what this process claimed and did not finish (it is stopping), so that
    /// other processes sharing the store need not wait for its lease. Called once, after
    /// the dispatcher stopped.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A lock a store holds for a caller until dropped.
pub struct HeldLock {
    _guard: Box<dyn Send + Sync>,
}

impl HeldLock {
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        Self {
            _guard: Box::new(guard),
        }
    }
}

impl std::fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldLock")
    }
}
