//! The embedded store: one SQLite file in WAL mode, written by a single writer thread
//! that group-commits, and a sync thread that makes those commits durable.
//!
//! Every change is a command sent to the writer thread. The thread takes everything queued
//! (up to [`MAX_BATCH`] commands), runs each inside its own savepoint of one transaction and
//! commits once. The commit only writes the write-ahead log (`synchronous = NORMAL`); the
//! batch's answers go to the sync thread, which `fdatasync`s the log — once for every batch
//! committed since its last sync — and only then answers. The writer meanwhile runs the
//! next batch, so statements and disk flushes overlap instead of taking turns; it keeps
//! that transaction open and adds what arrives until the sync is done, so there is about
//! one commit per sync and each changed page is written once per sync. A caller that
//! got an answer knows its change is on disk: it survives `kill -9` and power loss.
//! (SQLite itself syncs the log before each checkpoint and the database after it, so the
//! file stays consistent; the sync thread adds durability of the newest commits.)
//! Reads use a second connection (WAL readers never block the writer).
//!
//! * `schema` — tables, indexes, connection settings, the device row.
//! * `writer` — the writer and sync threads (group commit).
//! * `commands` — what each write does inside the transaction.
//! * `queries` — what is read on the second connection.
//! * [`inspect`] — read-only looks at a store file, for operators and tests.

#[macro_use]
pub(crate) mod schema;
mod commands;
pub mod inspect;
mod queries;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use futures_util::future::BoxFuture;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::domain::device::{DeviceRegistration, RegisteredDevice};
use crate::domain::event::NewMailEvent;
use crate::domain::store::{
    CompleteOutcome, Completed, IdleRemoval, Ingested, OutboxItem, QueueEntry, RegisterOutcome,
    RemoveOutcome, Store, StoreError, UserStatus,
};
use crate::store::Migrated;
use commands::{recover_in_flight, Command, Reply};
use queries::{count_outbox, read_devices};
use schema::configure;
use writer::{sync_loop, writer_loop, QUEUE_CAPACITY};

pub use writer::MAX_BATCH;

/// The SQLite-backed [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    writer: Option<mpsc::Sender<Command>>,
    writer_thread: Option<JoinHandle<()>>,
    sync_thread: Option<JoinHandle<()>>,
    reader: Arc<Mutex<Connection>>,
    depth: Arc<AtomicI64>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, returns in-flight items of a previous
    /// run to pending, and starts the writer thread.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_inner(path, true)
    }

    /// Opens an existing store for operator commands while a server may be running: it
    /// does not touch items in flight and does not create a missing file.
    pub fn open_existing(path: &Path) -> Result<SqliteStore, StoreError> {
        if !path.exists() {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                message: "no such file".into(),
            });
        }
        Self::open_inner(path, false)
    }

    fn open_inner(path: &Path, recover: bool) -> Result<SqliteStore, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
            }
        }
        let writer_conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        configure(&writer_conn, false).map_err(|e| open_err(e.to_string()))?;
        if recover {
            schema::migrate(&writer_conn)?;
        } else {
            let version = schema::version(&writer_conn).map_err(|e| open_err(e.to_string()))?;
            if version != schema::VERSION {
                return Err(StoreError::Schema(crate::store::wrong_version(
                    version,
                    schema::VERSION,
                )));
            }
        }
        if recover {
            recover_in_flight(&writer_conn).map_err(|e| open_err(e.to_string()))?;
        }
        let depth = count_outbox(&writer_conn).map_err(|e| open_err(e.to_string()))?;
        let reader = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        configure(&reader, true).map_err(|e| open_err(e.to_string()))?;

        // The reads above opened the write-ahead log; it lives as long as a connection does.
        let wal_path = wal_path(path);
        let wal = std::fs::File::open(&wal_path)
            .map_err(|e| open_err(format!("cannot open {}: {e}", wal_path.display())))?;

        let depth = Arc::new(AtomicI64::new(depth));
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (synced_tx, synced_rx) = std::sync::mpsc::channel();
        let syncing = Arc::new(AtomicBool::new(false));
        let thread_depth = depth.clone();
        let writer_syncing = syncing.clone();
        let writer_thread = std::thread::Builder::new()
            .name("dovepush-store-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, synced_tx, thread_depth, writer_syncing))
            .map_err(|e| open_err(e.to_string()))?;
        let writer = writer_thread.thread().clone();
        let sync_thread = std::thread::Builder::new()
            .name("dovepush-store-sync".into())
            .spawn(move || sync_loop(wal, synced_rx, syncing, writer))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            sync_thread: Some(sync_thread),
            reader: Arc::new(Mutex::new(reader)),
            depth,
        })
    }

    /// Creates the file if needed and brings its schema to this program's version (what
    /// `serve` does at start, and `dovepush-receiver migrate`).
    pub fn migrate(path: &Path) -> Result<Migrated, StoreError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        let conn = Connection::open(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        configure(&conn, false)?;
        schema::migrate(&conn)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let (reply, rx) = oneshot::channel();
        let command = make(reply);
        Box::pin(async move {
            let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
            writer.send(command).await.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let reader = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
                f(&conn)
            })
            .await
            .map_err(|e| StoreError::Database(format!("reader task failed: {e}")))?
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and stop.
        self.writer.take();
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
        // The writer's end of the sync channel is gone with it: the sync thread answers
        // what is left and stops.
        if let Some(t) = self.sync_thread.take() {
            let _ = t.join();
        }
    }
}

/// The write-ahead log SQLite keeps beside the database file.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

impl Store for SqliteStore {
    fn ingest(
        &self,
        event: NewMailEvent,
        due_at: i64,
        in_flight_limit: usize,
    ) -> BoxFuture<'static, Ingested> {
        let (reply, answered) = oneshot::channel();
        let command = Command::Ingest {
            event,
            due_at,
            in_flight_limit,
            reply,
        };
        let writer = self.writer.clone();
        Box::pin(async move {
            let Some(writer) = writer else {
                return Ingested::failed(StoreError::Closed);
            };
            if writer.send(command).await.is_err() {
                return Ingested::failed(StoreError::Closed);
            }
            answered
                .await
                .unwrap_or_else(|_| Ingested::failed(StoreError::Closed))
        })
    }

    fn register_device(
        &self,
        registration: DeviceRegistration,
        now: i64,
    ) -> BoxFuture<'_, Result<RegisterOutcome, StoreError>> {
        self.send(|reply| Command::Register {
            registration,
            now,
            reply,
        })
    }

    fn remove_device(
        &self,
        user: String,
        token: String,
    ) -> BoxFuture<'_, Result<RemoveOutcome, StoreError>> {
        self.send(|reply| Command::Remove { user, token, reply })
    }

    fn devices_of(&self, user: String) -> BoxFuture<'_, Result<Vec<RegisteredDevice>, StoreError>> {
        self.read(move |conn| read_devices(conn, Some(&user)))
    }

    fn remove_idle_devices(
        &self,
        seen_before: i64,
        limit: usize,
        reason: String,
        now: i64,
    ) -> BoxFuture<'_, Result<IdleRemoval, StoreError>> {
        self.send(|reply| Command::RemoveIdle {
            seen_before,
            limit,
            reason,
            now,
            reply,
        })
    }

    fn claim_due(
        &self,
        now: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxItem>, StoreError>> {
        self.send(|reply| Command::Claim { now, limit, reply })
    }

    fn complete(&self, done: Vec<Completed>) -> BoxFuture<'_, Result<CompleteOutcome, StoreError>> {
        self.send(|reply| Command::Complete { done, reply })
    }

    fn next_due_at(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        self.read(queries::next_due_at)
    }

    fn subscriptions(
        &self,
        user: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<UserStatus>, StoreError>> {
        self.read(move |conn| queries::subscriptions(conn, user.as_deref()))
    }

    fn queue_list(&self, limit: usize) -> BoxFuture<'_, Result<Vec<QueueEntry>, StoreError>> {
        self.read(move |conn| queries::queue_list(conn, limit))
    }

    fn queue_retry(&self, id: i64, now: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.send(|reply| Command::QueueRetry { id, now, reply })
    }

    fn queue_drop(&self, id: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.send(|reply| Command::QueueDrop { id, reply })
    }

    fn prune_events(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.send(|reply| Command::Prune { before, reply })
    }

    fn outbox_depth(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        // The only writer keeps it (see `writer`): no query needed.
        let depth = self.depth.load(Ordering::Relaxed).max(0) as u64;
        Box::pin(async move { Ok(depth) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::Backend;

    /// SQLite stores in a temp dir; "reopening" opens the same file again (a restart).
    pub(crate) struct Sqlite {
        dir: tempfile::TempDir,
    }

    impl Backend for Sqlite {
        type S = SqliteStore;

        async fn new() -> Self {
            Sqlite {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        async fn open(&self) -> SqliteStore {
            SqliteStore::open(&self.dir.path().join("s/store.sqlite")).unwrap()
        }

        async fn event_ids(&self) -> std::collections::HashSet<String> {
            inspect::event_ids(&self.dir.path().join("s/store.sqlite")).unwrap()
        }
    }

    crate::store_conformance_tests!(Sqlite);

    #[test]
    fn a_file_of_before_versions_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        {
            // As the receiver left it before schemas had versions.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(schema::MIGRATIONS[0].sql).unwrap();
            conn.execute_batch("INSERT INTO users (user) VALUES ('alice')")
                .unwrap();
        }
        assert_eq!(
            SqliteStore::migrate(&path).unwrap(),
            Migrated {
                from: 0,
                to: schema::VERSION
            }
        );
        assert_eq!(
            SqliteStore::migrate(&path).unwrap(),
            Migrated {
                from: schema::VERSION,
                to: schema::VERSION
            }
        );
        drop(SqliteStore::open_existing(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            let users: i64 = conn
                .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
                .unwrap();
            assert_eq!(users, 1, "the data stays");
            conn.execute_batch("PRAGMA user_version = 9").unwrap();
        }
        let err = SqliteStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("version 9, newer"), "{err}");
        let err = SqliteStore::open_existing(&path).unwrap_err().to_string();
        assert!(err.contains("version 9, newer"), "{err}");
    }

    #[test]
    fn operator_commands_want_a_migrated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        Connection::open(&path).unwrap();
        let err = SqliteStore::open_existing(&path).unwrap_err().to_string();
        assert!(err.contains("dovepush-receiver migrate"), "{err}");
    }
}
