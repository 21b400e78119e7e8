//! Persistence: the [`Store`] trait the domain works against, the records it returns,
//! and the embedded SQLite backend ([`sqlite::SqliteStore`]).
//!
//! Owns what "durable" means: every method that changes state resolves only after the
//! change is committed. Ingest fan-out runs inside the store's transaction, using the
//! domain's pure rules ([`crate::domain::device::wants_folder`],
//! [`crate::domain::event::PushContent::absorb`]), so an event and its outbox items are
//! committed together.

pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::domain::device::{Device, DeviceRegistration};
use crate::domain::event::{NewMailEvent, PushContent};

/// A boxed, sendable future (keeps the traits object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Store failures. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {path}: {message}")]
    Open { path: String, message: String },
    #[error("database error: {0}")]
    Database(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("store is shut down")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// The dispatcher's free send slots (its `[outbox] concurrency`). Ingest may take one for
/// a new outbox item and hand the item over at once, instead of leaving it to a claim.
pub type SendSlots = Arc<tokio::sync::Semaphore>;

/// An outbox item that ingest marked in flight itself, with the send slot it holds.
#[derive(Debug)]
pub struct Claimed {
    pub item: OutboxItem,
    pub slot: tokio::sync::OwnedSemaphorePermit,
}

/// Where ingest hands over the items it marks in flight: the dispatcher's send slots and
/// its channel. The store sends them there once they are committed, not the caller.
#[derive(Debug, Clone)]
pub struct HandOver {
    pub slots: SendSlots,
    pub to: tokio::sync::mpsc::UnboundedSender<Claimed>,
    /// Set by the dispatcher while due items wait in the store for a slot: ingest then
    /// leaves new items pending too, so that freed slots go to the oldest first.
    pub backlog: Arc<std::sync::atomic::AtomicBool>,
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
    /// New items (counted in `queued`) marked in flight and handed to the dispatcher.
    pub handed_over: u32,
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

/// A claimed outbox item, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    pub id: i64,
    pub device: Device,
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

/// One user in the status listing.
#[derive(Debug, Clone, PartialEq)]
pub struct UserStatus {
    pub user: String,
    /// The last reason a device of this user was removed.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub devices: Vec<Device>,
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
    /// due at `due_at`. A new item that is due at once, for a device with no other item,
    /// is marked in flight and sent to `hand_over` once committed, while one of its slots
    /// is free and it reports no backlog; the others wait for a claim.
    fn ingest(
        &self,
        event: NewMailEvent,
        due_at: i64,
        hand_over: Option<HandOver>,
    ) -> BoxFuture<'_, Result<IngestOutcome, StoreError>>;

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

    /// The user's devices, oldest first.
    fn devices_of(&self, user: String) -> BoxFuture<'_, Result<Vec<Device>, StoreError>>;

    /// Marks up to `limit` items due at `now` as in flight and returns them, oldest due first.
    fn claim_due(
        &self,
        now: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxItem>, StoreError>>;

    /// Applies completions of claimed items.
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

    /// Outbox items right now (pending and in flight).
    fn outbox_depth(&self) -> u64;
}
