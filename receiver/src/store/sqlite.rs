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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    BoxFuture, Claimed, CompleteOutcome, Completed, Completion, HandOver, IngestOutcome,
    OutboxItem, QueueEntry, RegisterOutcome, RemoveOutcome, Store, StoreError, UserStatus,
};
use crate::domain::device::{wants_folder, Device, DeviceRegistration};
use crate::domain::event::{NewMailEvent, PushContent};
use crate::transport::{Privacy, TransportKind};

/// Most commands committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Commands that may wait for the writer before senders wait too.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// How long the writer waits at most for the sync thread's wake-up while it gathers
/// commands into an open transaction (a bound, should a wake-up be missed).
const SYNC_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(2);
/// How long the writer keeps a transaction open at most waiting for a sync to end (a slow
/// disk then gets several commits per sync, as a writer that does not wait would).
const SYNC_HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(20);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    app TEXT NOT NULL,
    transport TEXT NOT NULL,
    token TEXT NOT NULL,
    mailboxes TEXT NOT NULL,
    privacy TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_success_at INTEGER,
    last_error TEXT,
    last_error_at INTEGER,
    UNIQUE (user, app, token)
);
CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY,
    last_error TEXT,
    last_error_at INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    event_id TEXT UNIQUE,
    user TEXT NOT NULL,
    folder TEXT NOT NULL,
    uid INTEGER NOT NULL,
    received_at INTEGER NOT NULL
);
DROP INDEX IF EXISTS events_received_at;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL,
    state INTEGER NOT NULL,
    content TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    last_error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_one_pending_per_device ON outbox (device_id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS outbox_device ON outbox (device_id);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, due_at);
"#;

// Outbox states. SQL text spells them as literals (`state = 0` pending, `state = 1` in
// flight), never as bound parameters: SQLite can use the partial index
// `outbox_one_pending_per_device` only for a value it sees when planning. (Before the
// planner's stability guarantee was set, a parameter there made it re-prepare the
// statement at every execution: half of the ingest statements' time in a profile.)
const STATE_IN_FLIGHT: i64 = 1;

/// The device columns [`device_from_row`] reads, as a macro so that the statements using
/// them are literals (no SQL text is built per execution).
macro_rules! device_columns {
    () => {
        "d.id, d.user, d.app, d.transport, d.token, d.mailboxes, d.privacy, d.created_at, \
         d.last_success_at, d.last_error, d.last_error_at, d.updated_at"
    };
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Ingest {
        event: NewMailEvent,
        due_at: i64,
        hand_over: Option<HandOver>,
        reply: Reply<IngestOutcome>,
    },
    Register {
        registration: DeviceRegistration,
        now: i64,
        reply: Reply<RegisterOutcome>,
    },
    Remove {
        user: String,
        token: String,
        reply: Reply<RemoveOutcome>,
    },
    Claim {
        now: i64,
        limit: usize,
        reply: Reply<Vec<OutboxItem>>,
    },
    Complete {
        done: Vec<Completed>,
        reply: Reply<CompleteOutcome>,
    },
    QueueRetry {
        id: i64,
        now: i64,
        reply: Reply<bool>,
    },
    QueueDrop {
        id: i64,
        reply: Reply<bool>,
    },
    Prune {
        before: i64,
        reply: Reply<u64>,
    },
}

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
        writer_conn
            .execute_batch(SCHEMA)
            .map_err(|e| open_err(e.to_string()))?;
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

fn configure(conn: &Connection, reader: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(64);
    // Plans must not depend on bound values: otherwise SQLite re-prepares a cached
    // statement at every execution whose parameter it once looked at (the claim's
    // `LIMIT ?2`, a parameter compared with a partial index's column), which was 6 %
    // of the writer thread's time.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // The page cache is bounded so memory does not grow with the registry.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA cache_size = -4096;
         PRAGMA temp_store = MEMORY;",
    )?;
    if reader {
        conn.execute_batch("PRAGMA query_only = ON;")?;
    }
    Ok(())
}

/// Items a previous process had in flight were never confirmed: make them pending again,
/// keeping one pending item per device (the newest content wins).
fn recover_in_flight(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare("SELECT id, device_id FROM outbox WHERE state = 1 ORDER BY device_id, id")?;
    let rows: Vec<(i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    drop(stmt);
    if rows.is_empty() {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    for (id, device_id) in rows {
        requeue(&tx, id, device_id, None, None)?;
    }
    tx.commit()
}

/// Makes item `id` pending again (due at `due_at`, one more attempt, `reason`), or folds it
/// into the device's existing pending item.
fn requeue(
    conn: &Connection,
    id: i64,
    device_id: i64,
    due_at: Option<i64>,
    reason: Option<&str>,
) -> rusqlite::Result<i64> {
    let pending: Option<(i64, String)> = conn
        .prepare_cached("SELECT id, content FROM outbox WHERE device_id = ?1 AND state = 0")?
        .query_row([device_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match pending {
        None => {
            conn.prepare_cached(
                "UPDATE outbox SET state = 0, attempts = attempts + ?2,
                     due_at = coalesce(?3, due_at), last_error = coalesce(?4, last_error)
                 WHERE id = ?1",
            )?
            .execute(params![id, i64::from(due_at.is_some()), due_at, reason])?;
            Ok(0)
        }
        Some((pending_id, pending_content)) => {
            let mine: Option<String> = conn
                .prepare_cached("SELECT content FROM outbox WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            if let Some(mine) = mine {
                if let (Ok(p), Ok(m)) = (
                    serde_json::from_str::<PushContent>(&pending_content),
                    serde_json::from_str::<PushContent>(&mine),
                ) {
                    let merged = if m.received_at > p.received_at {
                        p.absorb(m)
                    } else {
                        m.absorb(p)
                    };
                    conn.prepare_cached("UPDATE outbox SET content = ?2 WHERE id = ?1")?
                        .execute(params![pending_id, to_json(&merged)])?;
                }
            }
            let n = conn
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                .execute([id])?;
            Ok(-(n as i64))
        }
    }
}

fn to_json(c: &PushContent) -> String {
    serde_json::to_string(c).unwrap_or_else(|_| "{}".to_owned())
}

/// A finished command, answered once the batch's commit is known.
type Answer = Box<dyn FnOnce(Fate<'_>) + Send>;

/// What became of a finished command's transaction.
#[derive(Debug, Clone, Copy)]
enum Fate<'a> {
    /// Committed and on disk.
    Durable,
    /// Committed, but the sync of the log failed: it may not survive a power loss.
    NotSynced(&'a str),
    /// Rolled back (or never committed).
    RolledBack(&'a str),
}

impl Fate<'_> {
    fn result<T>(self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match self {
            Fate::Durable => result,
            Fate::NotSynced(e) | Fate::RolledBack(e) => {
                Err(StoreError::Database(format!("commit failed: {e}")))
            }
        }
    }
}

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |fate| {
        let _ = reply.send(fate.result(result));
    })
}

/// An ingest's answer: the items it marked in flight go to the dispatcher once they are
/// committed, whatever becomes of the caller (a request given up, a failed sync: the
/// client's retry is then a duplicate, and only this hand-over sends them).
fn ingest_answer(
    reply: Reply<IngestOutcome>,
    outcome: IngestOutcome,
    claimed: Vec<Claimed>,
    hand_over: Option<HandOver>,
) -> Answer {
    Box::new(move |fate| {
        if let (false, Some(hand_over)) = (matches!(fate, Fate::RolledBack(_)), hand_over) {
            for claimed in claimed {
                // A dispatcher that is gone leaves the item in flight: it is sent after
                // the restart.
                let _ = hand_over.to.send(claimed);
            }
        }
        let _ = reply.send(fate.result(Ok(outcome)));
    })
}

/// The write-ahead log SQLite keeps beside the database file.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// A committed batch waiting for the log to reach the disk: its answers, and the error
/// that rolled it back, if one did.
struct Committed {
    answers: Vec<Answer>,
    failure: Option<String>,
}

/// Answers committed batches once the log is on disk: takes every batch the writer has
/// committed so far, syncs the log once for all of them, answers them in commit order.
/// Stops when the writer is gone and everything it committed is answered.
fn sync_loop(
    wal: std::fs::File,
    rx: std::sync::mpsc::Receiver<Committed>,
    syncing: Arc<AtomicBool>,
    writer: std::thread::Thread,
) {
    let mut group: Vec<Committed> = Vec::new();
    while let Ok(first) = rx.recv() {
        group.push(first);
        group.extend(rx.try_iter());
        let needs_sync = group.iter().any(|c| c.failure.is_none());
        let sync_error = if needs_sync {
            wal.sync_data()
                .err()
                .map(|e| format!("fsync of the write-ahead log failed: {e}"))
        } else {
            None
        };
        if let Some(e) = &sync_error {
            tracing::error!(error = %e, "Store commits may not be on disk; callers will retry.");
        }
        for committed in group.drain(..) {
            let fate = match (&committed.failure, &sync_error) {
                (Some(e), _) => Fate::RolledBack(e),
                (None, Some(e)) => Fate::NotSynced(e),
                (None, None) => Fate::Durable,
            };
            for a in committed.answers {
                a(fate);
            }
        }
        // The writer commits what it gathered meanwhile (or the next command at once).
        syncing.store(false, Ordering::Release);
        writer.unpark();
    }
}

/// Items in the outbox (pending and in flight): the depth gauge.
fn count_outbox(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
}

/// How often the writer counts the outbox again for the depth gauge.
const DEPTH_RECOUNT: std::time::Duration = std::time::Duration::from_secs(60);

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    synced: std::sync::mpsc::Sender<Committed>,
    depth: Arc<AtomicI64>,
    syncing: Arc<AtomicBool>,
) {
    let mut counted_at = std::time::Instant::now();
    while let Some(first) = rx.blocking_recv() {
        let mut batch = Batch::begin(&conn);
        batch.run(first);
        let hold_until = std::time::Instant::now() + SYNC_HOLD_MAX;
        loop {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.run(c),
                    Err(_) => break,
                }
            }
            // While the log is being synced, what arrives joins this transaction: the next
            // sync has to wait for that one anyway, and one commit writes each changed
            // page once where several commits would write it several times.
            if batch.failure.is_some()
                || batch.len() >= MAX_BATCH
                || !syncing.load(Ordering::Acquire)
                || std::time::Instant::now() >= hold_until
            {
                break;
            }
            std::thread::park_timeout(SYNC_WAIT_POLL);
        }
        let (committed, delta) = batch.commit();
        if committed.failure.is_none() {
            depth.fetch_add(delta, Ordering::Relaxed);
        }
        // The deltas count this process's changes only: the CLI's `queue drop` (another
        // process) is seen by counting again now and then.
        if counted_at.elapsed() >= DEPTH_RECOUNT {
            counted_at = std::time::Instant::now();
            if let Ok(n) = count_outbox(&conn) {
                depth.store(n, Ordering::Relaxed);
            }
        }
        syncing.store(true, Ordering::Release);
        if let Err(std::sync::mpsc::SendError(lost)) = synced.send(committed) {
            // The sync thread is gone (it cannot panic short of a bug): nothing can be
            // promised durable any more.
            for a in lost.answers {
                a(Fate::NotSynced("the store's sync thread stopped"));
            }
        }
    }
}

/// One transaction of the writer thread: the commands run in it so far, their answers, and
/// the error that aborts it, if one did.
struct Batch<'c> {
    conn: &'c Connection,
    answers: Vec<Answer>,
    delta: i64,
    failure: Option<String>,
}

impl<'c> Batch<'c> {
    fn begin(conn: &'c Connection) -> Batch<'c> {
        Batch {
            conn,
            answers: Vec::with_capacity(64),
            delta: 0,
            failure: run_cached(conn, "BEGIN IMMEDIATE")
                .err()
                .map(|e| e.to_string()),
        }
    }

    fn len(&self) -> usize {
        self.answers.len()
    }

    fn run(&mut self, command: Command) {
        let conn = self.conn;
        if self.failure.is_some() {
            self.answers.push(fail_command(command));
            return;
        }
        // Ingests, the hot path, run without a savepoint (its statement journal costs a
        // page copy per change). They fail only on SQLite errors, which abort the
        // whole batch: every caller then gets an error and retries.
        if matches!(command, Command::Ingest { .. }) {
            let (ok, d, a) = execute(conn, command);
            self.delta += d;
            self.answers.push(a);
            if !ok {
                self.failure = Some("an ingest failed; batch aborted".into());
            }
            return;
        }
        if let Err(e) = run_cached(conn, "SAVEPOINT cmd") {
            self.failure = Some(e.to_string());
            self.answers.push(fail_command(command));
            return;
        }
        let (ok, d, a) = execute(conn, command);
        let end = if ok {
            self.delta += d;
            run_cached(conn, "RELEASE cmd")
        } else {
            run_cached(conn, "ROLLBACK TO cmd").and_then(|_| run_cached(conn, "RELEASE cmd"))
        };
        self.answers.push(a);
        if let Err(e) = end {
            self.failure = Some(e.to_string());
        }
    }

    /// Commits (or, after a failure, rolls back); returns what the sync thread answers
    /// and the outbox depth change.
    fn commit(mut self) -> (Committed, i64) {
        if self.failure.is_none() {
            if let Err(e) = run_cached(self.conn, "COMMIT") {
                self.failure = Some(e.to_string());
            }
        }
        if let Some(e) = &self.failure {
            tracing::error!(error = %e, "Store transaction failed; the batch is rolled back.");
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        (
            Committed {
                answers: self.answers,
                failure: self.failure,
            },
            self.delta,
        )
    }
}

/// Runs a parameterless statement through the statement cache (no re-parsing per batch).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn fail_command(command: Command) -> Answer {
    fn f<T: Send + 'static>(r: Reply<T>) -> Answer {
        answer::<T>(r, Err(StoreError::Database("transaction aborted".into())))
    }
    match command {
        Command::Ingest { reply, .. } => f(reply),
        Command::Register { reply, .. } => f(reply),
        Command::Remove { reply, .. } => f(reply),
        Command::Claim { reply, .. } => f(reply),
        Command::Complete { reply, .. } => f(reply),
        Command::QueueRetry { reply, .. } => f(reply),
        Command::QueueDrop { reply, .. } => f(reply),
        Command::Prune { reply, .. } => f(reply),
    }
}

/// Runs one command; returns (succeeded, outbox depth change, answer).
fn execute(conn: &Connection, command: Command) -> (bool, i64, Answer) {
    fn done<T: Send + 'static>(
        reply: Reply<T>,
        r: Result<(T, i64), StoreError>,
    ) -> (bool, i64, Answer) {
        match r {
            Ok((v, d)) => (true, d, answer(reply, Ok(v))),
            Err(e) => (false, 0, answer(reply, Err(e))),
        }
    }
    match command {
        Command::Ingest {
            event,
            due_at,
            hand_over,
            reply,
        } => match exec_ingest(conn, event, due_at, hand_over.as_ref()) {
            Ok((outcome, delta, claimed)) => (
                true,
                delta,
                ingest_answer(reply, outcome, claimed, hand_over),
            ),
            Err(e) => (false, 0, answer(reply, Err(e))),
        },
        Command::Register {
            registration,
            now,
            reply,
        } => done(reply, exec_register(conn, &registration, now)),
        Command::Remove { user, token, reply } => done(reply, exec_remove(conn, &user, &token)),
        Command::Claim { now, limit, reply } => done(reply, exec_claim(conn, now, limit)),
        Command::Complete { done: items, reply } => done(reply, exec_complete(conn, items)),
        Command::QueueRetry { id, now, reply } => done(
            reply,
            conn.prepare_cached("UPDATE outbox SET due_at = ?2 WHERE id = ?1 AND state = 0")
                .and_then(|mut s| s.execute(params![id, now]))
                .map(|n| (n > 0, 0))
                .map_err(StoreError::from),
        ),
        Command::QueueDrop { id, reply } => done(
            reply,
            conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map(|n| (n > 0, -(n as i64)))
                .map_err(StoreError::from),
        ),
        Command::Prune { before, reply } => done(
            reply,
            // Events are appended in arrival order, so the oldest ones have the lowest ids:
            // find the first id to keep by scanning from the start (no extra index).
            conn.prepare_cached(
                "DELETE FROM events WHERE id < coalesce(
                     (SELECT id FROM events WHERE received_at >= ?1 ORDER BY id LIMIT 1),
                     (SELECT max(id) + 1 FROM events), 0)",
            )
            .and_then(|mut s| s.execute([before]))
            .map(|n| (n as u64, 0))
            .map_err(StoreError::from),
        ),
    }
}

fn exec_ingest(
    conn: &Connection,
    event: NewMailEvent,
    due_at: i64,
    hand_over: Option<&HandOver>,
) -> Result<(IngestOutcome, i64, Vec<Claimed>), StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (event_id, user, folder, uid, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (event_id) DO NOTHING",
        )?
        .execute(params![
            event.event_id,
            event.user,
            event.folder,
            event.uid,
            event.received_at
        ])?;
    let mut outcome = IngestOutcome::default();
    let mut claimed = Vec::new();
    if inserted == 0 {
        outcome.duplicate = true;
        return Ok((outcome, 0, claimed));
    }
    let devices: Vec<Device> = conn
        .prepare_cached(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices d WHERE d.user = ?1"
        ))?
        .query_map([&event.user], |r| device_from_row(r, 0, 0))?
        .collect::<rusqlite::Result<_>>()?;
    let received_at = event.received_at;
    let content = PushContent::from(event);
    // Only an item due at once can go straight to the dispatcher, and only while no due
    // item waits there for a slot (new ones then queue behind it, in due order).
    let slots = hand_over
        .filter(|h| due_at <= received_at && !h.backlog.load(Ordering::Relaxed))
        .map(|h| &h.slots);
    let mut content_json: Option<String> = None;
    let mut delta = 0;
    for device in devices {
        if !wants_folder(&device.mailboxes, &content.folder) {
            continue;
        }
        outcome.matched_devices += 1;
        let device_id = device.id;
        let json: &str = content_json.get_or_insert_with(|| to_json(&content));
        // Most often the device has no item at all: while the dispatcher has a free slot,
        // the new item is in flight at once (one write instead of an insert now and a
        // claim later). A device with an item gets the next one pending (where later
        // events fold into it) and claimed.
        if let Some(slot) = slots.and_then(|s| Arc::clone(s).try_acquire_owned().ok()) {
            let busy = conn
                .prepare_cached("SELECT 1 FROM outbox WHERE device_id = ?1 LIMIT 1")?
                .exists([device_id])?;
            if !busy {
                conn.prepare_cached(
                    "INSERT INTO outbox (device_id, state, content, attempts, created_at, due_at)
                     VALUES (?1, 1, ?2, 0, ?3, ?4)",
                )?
                .execute(params![device_id, json, received_at, due_at])?;
                outcome.queued += 1;
                outcome.handed_over += 1;
                delta += 1;
                claimed.push(Claimed {
                    item: OutboxItem {
                        id: conn.last_insert_rowid(),
                        device,
                        content: content.clone(),
                        attempts: 0,
                        created_at: received_at,
                        due_at,
                    },
                    slot,
                });
                continue;
            }
        }
        let inserted = conn
            .prepare_cached(
                "INSERT INTO outbox (device_id, state, content, attempts, created_at, due_at)
                 VALUES (?1, 0, ?2, 0, ?3, ?4)
                 ON CONFLICT (device_id) WHERE state = 0 DO NOTHING",
            )?
            .execute(params![device_id, json, received_at, due_at])?;
        if inserted > 0 {
            outcome.queued += 1;
            delta += 1;
            continue;
        }
        let pending: Option<(i64, String)> = conn
            .prepare_cached("SELECT id, content FROM outbox WHERE device_id = ?1 AND state = 0")?
            .query_row([device_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match pending {
            Some((item_id, old)) => {
                let old: PushContent = serde_json::from_str(&old)
                    .map_err(|e| StoreError::Corrupt(format!("outbox item {item_id}: {e}")))?;
                let merged = old.absorb(content.clone());
                conn.prepare_cached(
                    "UPDATE outbox SET content = ?2, created_at = ?3 WHERE id = ?1",
                )?
                .execute(params![item_id, to_json(&merged), received_at])?;
                outcome.coalesced += 1;
            }
            None => {
                return Err(StoreError::Database(format!(
                    "outbox insert for device {device_id} conflicted without a pending item"
                )))
            }
        }
    }
    Ok((outcome, delta, claimed))
}

fn count_devices(conn: &Connection, user: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT count(*) FROM devices WHERE user = ?1")?
        .query_row([user], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

fn exec_register(
    conn: &Connection,
    reg: &DeviceRegistration,
    now: i64,
) -> Result<(RegisterOutcome, i64), StoreError> {
    let devices_before = count_devices(conn, &reg.user)?;
    let mailboxes =
        serde_json::to_string(&reg.mailboxes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let updated = conn
        .prepare_cached(
            "UPDATE devices SET transport = ?4, mailboxes = ?5, privacy = ?6, updated_at = ?7
             WHERE user = ?1 AND app = ?2 AND token = ?3",
        )?
        .execute(params![
            reg.user,
            reg.app,
            reg.token,
            reg.transport.as_str(),
            mailboxes,
            reg.privacy.as_str(),
            now
        ])?;
    if updated == 0 {
        conn.prepare_cached(
            "INSERT INTO devices (user, app, token, transport, mailboxes, privacy, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        )?
        .execute(params![
            reg.user,
            reg.app,
            reg.token,
            reg.transport.as_str(),
            mailboxes,
            reg.privacy.as_str(),
            now
        ])?;
    }
    Ok((
        RegisterOutcome {
            created: updated == 0,
            devices_before,
        },
        0,
    ))
}

fn exec_remove(
    conn: &Connection,
    user: &str,
    token: &str,
) -> Result<(RemoveOutcome, i64), StoreError> {
    let items = conn
        .prepare_cached(
            "DELETE FROM outbox WHERE device_id IN
                 (SELECT id FROM devices WHERE user = ?1 AND token = ?2)",
        )?
        .execute([user, token])?;
    let removed = conn
        .prepare_cached("DELETE FROM devices WHERE user = ?1 AND token = ?2")?
        .execute([user, token])?;
    let devices_left = count_devices(conn, user)?;
    Ok((
        RemoveOutcome {
            removed: removed > 0,
            devices_left,
        },
        -(items as i64),
    ))
}

/// The claim's selection: due pending items with their devices, oldest due first.
const CLAIM_SQL: &str = concat!(
    "SELECT o.id, o.content, o.attempts, o.created_at, o.due_at, ",
    device_columns!(),
    " FROM outbox o JOIN devices d ON d.id = o.device_id
     WHERE o.state = 0 AND o.due_at <= ?1 ORDER BY o.due_at, o.id LIMIT ?2"
);

fn exec_claim(
    conn: &Connection,
    now: i64,
    limit: usize,
) -> Result<(Vec<OutboxItem>, i64), StoreError> {
    let rows: Vec<(i64, String, u32, i64, i64, Device)> = conn
        .prepare_cached(CLAIM_SQL)?
        .query_map(params![now, limit as i64], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                device_from_row(r, 5, 0)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Ok((Vec::new(), 0));
    }
    // One statement marks the whole claim in flight: the same selection as above, inside
    // the same transaction of the only writer, so exactly the rows just read.
    let marked = conn
        .prepare_cached(
            "UPDATE outbox SET state = 1 WHERE id IN (
                 SELECT o.id FROM outbox o JOIN devices d ON d.id = o.device_id
                 WHERE o.state = 0 AND o.due_at <= ?1 ORDER BY o.due_at, o.id LIMIT ?2)",
        )?
        .execute(params![now, limit as i64])?;
    if marked != rows.len() {
        return Err(StoreError::Database(format!(
            "claim marked {marked} items in flight but read {}",
            rows.len()
        )));
    }
    let mut items = Vec::with_capacity(rows.len());
    let mut delta = 0;
    for (id, content, attempts, created_at, due_at, device) in rows {
        let content: PushContent = match serde_json::from_str(&content) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(item = id, error = %e, "Unreadable outbox item; dropping it.");
                let n = conn
                    .prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                    .execute([id])?;
                delta -= n as i64;
                continue;
            }
        };
        items.push(OutboxItem {
            id,
            device,
            content,
            attempts,
            created_at,
            due_at,
        });
    }
    Ok((items, delta))
}

fn exec_complete(
    conn: &Connection,
    done: Vec<Completed>,
) -> Result<(CompleteOutcome, i64), StoreError> {
    let mut outcome = CompleteOutcome::default();
    let mut delta = 0i64;
    let delete_item = |id: i64| -> rusqlite::Result<i64> {
        conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
            .execute([id])
            .map(|n| -(n as i64))
    };
    let device_error = |device_id: i64, reason: &str, at: i64| -> rusqlite::Result<usize> {
        conn.prepare_cached("UPDATE devices SET last_error = ?2, last_error_at = ?3 WHERE id = ?1")?
            .execute(params![device_id, reason, at])
    };
    for c in done {
        match &c.completion {
            Completion::Delivered => {
                delta += delete_item(c.item_id)?;
                conn.prepare_cached("UPDATE devices SET last_success_at = ?2 WHERE id = ?1")?
                    .execute(params![c.device_id, c.at])?;
            }
            Completion::Retry { due_at, reason } => {
                let exists: bool = conn
                    .prepare_cached("SELECT 1 FROM outbox WHERE id = ?1")?
                    .query_row([c.item_id], |_| Ok(()))
                    .optional()?
                    .is_some();
                if exists {
                    delta += requeue(conn, c.item_id, c.device_id, Some(*due_at), Some(reason))?;
                }
                device_error(c.device_id, reason, c.at)?;
            }
            Completion::Drop { reason } => {
                delta += delete_item(c.item_id)?;
                device_error(c.device_id, reason, c.at)?;
            }
            Completion::DeleteDevice { reason } => {
                let items = conn
                    .prepare_cached("DELETE FROM outbox WHERE device_id = ?1")?
                    .execute([c.device_id])?;
                delta -= items as i64;
                let removed = conn
                    .prepare_cached("DELETE FROM devices WHERE id = ?1")?
                    .execute([c.device_id])?;
                conn.prepare_cached(
                    "INSERT INTO users (user, last_error, last_error_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (user) DO UPDATE SET last_error = ?2, last_error_at = ?3",
                )?
                .execute(params![c.user, reason, c.at])?;
                if removed > 0
                    && count_devices(conn, &c.user)? == 0
                    && !outcome.users_without_devices.contains(&c.user)
                {
                    outcome.users_without_devices.push(c.user.clone());
                }
            }
        }
    }
    Ok((outcome, delta))
}

/// Reads the device columns (`device_columns!`) starting at `at`.
fn device_from_row(r: &Row<'_>, at: usize, pending: u64) -> rusqlite::Result<Device> {
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(at + i, rusqlite::types::Type::Text, what.into())
    };
    let transport: String = r.get(at + 3)?;
    let mailboxes: String = r.get(at + 5)?;
    let privacy: String = r.get(at + 6)?;
    Ok(Device {
        id: r.get(at)?,
        user: r.get(at + 1)?,
        app: r.get(at + 2)?,
        transport: transport
            .parse::<TransportKind>()
            .ok()
            .ok_or_else(|| bad(3, format!("unknown transport {transport:?}")))?,
        token: r.get(at + 4)?,
        mailboxes: serde_json::from_str(&mailboxes).map_err(|e| bad(5, e.to_string()))?,
        privacy: privacy
            .parse::<Privacy>()
            .ok()
            .ok_or_else(|| bad(6, format!("unknown privacy {privacy:?}")))?,
        created_at: r.get(at + 7)?,
        last_success_at: r.get(at + 8)?,
        last_error: r.get(at + 9)?,
        last_error_at: r.get(at + 10)?,
        registered_at: r.get(at + 11)?,
        pending,
    })
}

fn read_devices(conn: &Connection, user: Option<&str>) -> Result<Vec<Device>, StoreError> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT ",
        device_columns!(),
        ", (SELECT count(*) FROM outbox o WHERE o.device_id = d.id)
         FROM devices d WHERE ?1 IS NULL OR d.user = ?1 ORDER BY d.user, d.created_at, d.id"
    ))?;
    let devices = stmt
        .query_map([user], |r| {
            let pending: i64 = r.get(12)?;
            device_from_row(r, 0, pending as u64)
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(devices)
}

impl Store for SqliteStore {
    fn ingest(
        &self,
        event: NewMailEvent,
        due_at: i64,
        hand_over: Option<HandOver>,
    ) -> BoxFuture<'_, Result<IngestOutcome, StoreError>> {
        self.send(|reply| Command::Ingest {
            event,
            due_at,
            hand_over,
            reply,
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

    fn devices_of(&self, user: String) -> BoxFuture<'_, Result<Vec<Device>, StoreError>> {
        self.read(move |conn| read_devices(conn, Some(&user)))
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
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT min(due_at) FROM outbox WHERE state = 0")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))?)
        })
    }

    fn subscriptions(
        &self,
        user: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<UserStatus>, StoreError>> {
        self.read(move |conn| {
            let devices = read_devices(conn, user.as_deref())?;
            let mut errors: std::collections::BTreeMap<String, (Option<String>, Option<i64>)> =
                conn.prepare_cached(
                    "SELECT user, last_error, last_error_at FROM users WHERE ?1 IS NULL OR user = ?1",
                )?
                .query_map([user.as_deref()], |r| {
                    Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?)))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut out: Vec<UserStatus> = Vec::new();
            for d in devices {
                if out.last().map(|u| u.user != d.user).unwrap_or(true) {
                    let (last_error, last_error_at) = errors.remove(&d.user).unwrap_or_default();
                    out.push(UserStatus {
                        user: d.user.clone(),
                        last_error,
                        last_error_at,
                        devices: Vec::new(),
                    });
                }
                if let Some(u) = out.last_mut() {
                    u.devices.push(d);
                }
            }
            for (user, (last_error, last_error_at)) in errors {
                out.push(UserStatus {
                    user,
                    last_error,
                    last_error_at,
                    devices: Vec::new(),
                });
            }
            out.sort_by(|a, b| a.user.cmp(&b.user));
            Ok(out)
        })
    }

    fn queue_list(&self, limit: usize) -> BoxFuture<'_, Result<Vec<QueueEntry>, StoreError>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT o.id, d.user, d.app, d.transport, d.token, o.state, o.attempts,
                        o.created_at, o.due_at, o.last_error, o.content
                 FROM outbox o JOIN devices d ON d.id = o.device_id
                 ORDER BY o.due_at, o.id LIMIT ?1",
            )?;
            let rows = stmt
                .query_map([limit as i64], |r| {
                    let content: String = r.get(10)?;
                    let event_id = serde_json::from_str::<PushContent>(&content)
                        .ok()
                        .and_then(|c| c.event_id);
                    Ok(QueueEntry {
                        id: r.get(0)?,
                        user: r.get(1)?,
                        app: r.get(2)?,
                        transport: r.get(3)?,
                        token: r.get(4)?,
                        in_flight: r.get::<_, i64>(5)? == STATE_IN_FLIGHT,
                        attempts: r.get(6)?,
                        created_at: r.get(7)?,
                        due_at: r.get(8)?,
                        last_error: r.get(9)?,
                        event_id,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
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

    fn outbox_depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed).max(0) as u64
    }
}

/// Read-only helpers for operators and tests that inspect a store file directly.
pub mod inspect {
    use super::*;

    /// Whether an event with this id was committed (and not yet pruned).
    pub fn event_ids(path: &Path) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mut stmt = conn.prepare("SELECT event_id FROM events WHERE event_id IS NOT NULL")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids)
    }

    /// Event ids carried by outbox items.
    pub fn outbox_event_ids(path: &Path) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mut stmt = conn.prepare("SELECT content FROM outbox")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .filter_map(|c| {
                c.ok()
                    .and_then(|c| serde_json::from_str::<PushContent>(&c).ok())
                    .and_then(|c| c.event_id)
            })
            .collect();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_statements_are_not_re_prepared_for_new_values() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.sqlite3")).unwrap();
        configure(&conn, false).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for (now, limit) in [(1_i64, 10_i64), (2, 20), (3, 30)] {
            let mut stmt = conn.prepare_cached(CLAIM_SQL).unwrap();
            stmt.query([now, limit]).unwrap().next().unwrap();
        }
        let stmt = conn.prepare_cached(CLAIM_SQL).unwrap();
        assert_eq!(
            stmt.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "a bound LIMIT must not make SQLite prepare the claim again"
        );
    }

    fn event(user: &str, id: Option<&str>, uid: u32, at: i64) -> NewMailEvent {
        NewMailEvent {
            event_id: id.map(str::to_owned),
            user: user.into(),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid,
            from: None,
            subject: Some(format!("s{uid}")),
            snippet: None,
            unseen: Some(uid),
            received_at: at,
        }
    }

    fn reg(user: &str, token: &str, mailboxes: &[&str]) -> DeviceRegistration {
        DeviceRegistration {
            user: user.into(),
            app: "mail".into(),
            transport: TransportKind::Apns,
            token: token.into(),
            mailboxes: mailboxes.iter().map(|s| s.to_string()).collect(),
            privacy: Privacy::Full,
        }
    }

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s/store.sqlite")).unwrap();
        (dir, store)
    }

    /// A hand-over with `slots` send slots, and the dispatcher's end of it.
    fn hand_over(slots: usize) -> (HandOver, mpsc::UnboundedReceiver<Claimed>) {
        let (to, from) = mpsc::unbounded_channel();
        let hand_over = HandOver {
            slots: Arc::new(tokio::sync::Semaphore::new(slots)),
            to,
            backlog: Arc::new(AtomicBool::new(false)),
        };
        (hand_over, from)
    }

    #[tokio::test]
    async fn ingest_hands_a_due_item_over_while_a_slot_is_free() {
        let (_dir, s) = open();
        s.register_device(reg("alice", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        s.register_device(reg("bob", "t2", &["INBOX"]), 1)
            .await
            .unwrap();
        let (h, mut dispatcher) = hand_over(1);

        let o = s
            .ingest(event("alice", Some("e1"), 1, 10), 10, Some(h.clone()))
            .await
            .unwrap();
        assert_eq!((o.queued, o.handed_over), (1, 1));
        let first = dispatcher.try_recv().expect("handed over once committed");
        assert_eq!(
            (first.item.content.uid, first.item.device.token.as_str()),
            (1, "t1")
        );
        assert_eq!(h.slots.available_permits(), 0, "the item holds its slot");
        assert!(
            s.claim_due(100, 10).await.unwrap().is_empty(),
            "it is in flight already"
        );

        // No slot left: bob's item waits for a claim.
        let o = s
            .ingest(event("bob", Some("e2"), 1, 11), 11, Some(h.clone()))
            .await
            .unwrap();
        assert_eq!((o.queued, o.handed_over), (1, 0));

        // alice's device has an item in flight: even with a free slot her next item is
        // pending (and absorbs later events) until that push is done.
        let (more, _more_dispatcher) = hand_over(1);
        let o = s
            .ingest(event("alice", Some("e3"), 2, 12), 12, Some(more.clone()))
            .await
            .unwrap();
        assert_eq!((o.queued, o.handed_over), (1, 0));
        assert_eq!(more.slots.available_permits(), 1);
        let o = s
            .ingest(event("alice", Some("e4"), 3, 13), 13, Some(more))
            .await
            .unwrap();
        assert_eq!((o.queued, o.coalesced, o.handed_over), (0, 1, 0));
        assert_eq!(s.outbox_depth(), 3);
        drop(first);
        assert_eq!(
            h.slots.available_permits(),
            1,
            "the slot comes back with the item"
        );
    }

    #[tokio::test]
    async fn no_hand_over_when_not_due_or_while_due_items_wait() {
        let (_dir, s) = open();
        for (user, token) in [("alice", "t1"), ("bob", "t2")] {
            s.register_device(reg(user, token, &["INBOX"]), 1)
                .await
                .unwrap();
        }
        let (h, mut dispatcher) = hand_over(2);
        // Due later (a coalescing window).
        let o = s
            .ingest(event("alice", Some("e1"), 1, 10), 500, Some(h.clone()))
            .await
            .unwrap();
        assert_eq!((o.queued, o.handed_over), (1, 0));
        // The dispatcher reports due items waiting for slots.
        h.backlog.store(true, Ordering::Relaxed);
        let o = s
            .ingest(event("bob", Some("e2"), 1, 10), 10, Some(h.clone()))
            .await
            .unwrap();
        assert_eq!((o.queued, o.handed_over), (1, 0));
        assert!(dispatcher.try_recv().is_err());
        assert_eq!(h.slots.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_request_given_up_still_hands_its_item_over() {
        let (_dir, s) = open();
        s.register_device(reg("alice", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        let (h, mut dispatcher) = hand_over(1);
        // The caller drops the ingest before it is answered (a request the client gave
        // up on): the committed item still reaches the dispatcher.
        let ingest = s.ingest(event("alice", Some("e1"), 1, 10), 10, Some(h.clone()));
        let _ = tokio::time::timeout(std::time::Duration::ZERO, ingest).await;
        let claimed = tokio::time::timeout(std::time::Duration::from_secs(5), dispatcher.recv())
            .await
            .expect("handed over")
            .unwrap();
        assert_eq!(claimed.item.content.event_id.as_deref(), Some("e1"));
    }

    #[tokio::test]
    async fn ingest_fans_out_dedups_and_coalesces() {
        let (_dir, s) = open();
        let r = s
            .register_device(reg("alice", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        assert_eq!(
            r,
            RegisterOutcome {
                created: true,
                devices_before: 0
            }
        );
        let r = s
            .register_device(reg("alice", "t2", &["Work"]), 2)
            .await
            .unwrap();
        assert_eq!(r.devices_before, 1);
        let r = s
            .register_device(reg("alice", "t1", &["INBOX"]), 3)
            .await
            .unwrap();
        assert!(!r.created);

        let o = s
            .ingest(event("alice", Some("e1"), 1, 10), 10, None)
            .await
            .unwrap();
        assert_eq!((o.matched_devices, o.queued, o.coalesced), (1, 1, 0));
        let o = s
            .ingest(event("alice", Some("e1"), 1, 11), 11, None)
            .await
            .unwrap();
        assert!(o.duplicate);
        let o = s
            .ingest(event("alice", Some("e2"), 2, 12), 12, None)
            .await
            .unwrap();
        assert_eq!((o.queued, o.coalesced), (0, 1));
        let o = s.ingest(event("bob", None, 1, 12), 12, None).await.unwrap();
        assert_eq!(o.matched_devices, 0);
        assert_eq!(s.outbox_depth(), 1);

        let items = s.claim_due(100, 10).await.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].content.uid, 2);
        assert_eq!(items[0].content.unseen, Some(2));
        assert_eq!(items[0].content.coalesced, 1);
        assert_eq!(items[0].device.token, "t1");
        assert!(s.claim_due(100, 10).await.unwrap().is_empty());

        // A new event while the first is in flight makes a second item.
        let o = s
            .ingest(event("alice", Some("e3"), 3, 13), 13, None)
            .await
            .unwrap();
        assert_eq!(o.queued, 1);
        assert_eq!(s.outbox_depth(), 2);
        let done = s
            .complete(vec![Completed {
                item_id: items[0].id,
                device_id: items[0].device.id,
                user: "alice".into(),
                at: 20,
                completion: Completion::Retry {
                    due_at: 50,
                    reason: "busy".into(),
                },
            }])
            .await
            .unwrap();
        assert!(done.users_without_devices.is_empty());
        // The retried (older) item folded into the pending newer one.
        assert_eq!(s.outbox_depth(), 1);
        let items = s.claim_due(100, 10).await.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].content.uid, 3);
        s.complete(vec![Completed {
            item_id: items[0].id,
            device_id: items[0].device.id,
            user: "alice".into(),
            at: 30,
            completion: Completion::Delivered,
        }])
        .await
        .unwrap();
        assert_eq!(s.outbox_depth(), 0);
        let devs = s.devices_of("alice".into()).await.unwrap();
        assert_eq!(devs[0].last_success_at, Some(30));
        assert_eq!(devs[0].last_error.as_deref(), Some("busy"));
    }

    #[tokio::test]
    async fn delete_device_completion_reports_last_device() {
        let (_dir, s) = open();
        s.register_device(reg("alice", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        s.ingest(event("alice", None, 1, 10), 10, None)
            .await
            .unwrap();
        let items = s.claim_due(10, 10).await.unwrap();
        let out = s
            .complete(vec![Completed {
                item_id: items[0].id,
                device_id: items[0].device.id,
                user: "alice".into(),
                at: 11,
                completion: Completion::DeleteDevice {
                    reason: "Unregistered".into(),
                },
            }])
            .await
            .unwrap();
        assert_eq!(out.users_without_devices, vec!["alice".to_string()]);
        let subs = s.subscriptions(None).await.unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].last_error.as_deref(), Some("Unregistered"));
        assert!(subs[0].devices.is_empty());
        assert_eq!(s.outbox_depth(), 0);
    }

    #[tokio::test]
    async fn in_flight_items_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.register_device(reg("alice", "t1", &["INBOX"]), 1)
                .await
                .unwrap();
            s.ingest(event("alice", Some("a"), 1, 10), 10, None)
                .await
                .unwrap();
            assert_eq!(s.claim_due(10, 10).await.unwrap().len(), 1);
            s.ingest(event("alice", Some("b"), 2, 11), 11, None)
                .await
                .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.outbox_depth(), 1);
        let items = s.claim_due(100, 10).await.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].content.event_id.as_deref(), Some("b"));
        assert_eq!(items[0].content.coalesced, 1);
        drop(s);
        assert!(inspect::event_ids(&path).unwrap().contains("a"));
    }

    #[tokio::test]
    async fn remove_and_queue_commands() {
        let (_dir, s) = open();
        s.register_device(reg("alice", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        s.register_device(reg("bob", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        s.ingest(event("alice", None, 1, 10), 1000, None)
            .await
            .unwrap();
        let q = s.queue_list(10).await.unwrap();
        assert_eq!(q.len(), 1);
        assert!(s.queue_retry(q[0].id, 20).await.unwrap());
        assert_eq!(s.next_due_at().await.unwrap(), Some(20));
        assert!(s.queue_drop(q[0].id).await.unwrap());
        assert!(!s.queue_drop(q[0].id).await.unwrap());
        s.ingest(event("alice", None, 2, 10), 10, None)
            .await
            .unwrap();
        let r = s.remove_device("alice".into(), "t1".into()).await.unwrap();
        assert_eq!(
            r,
            RemoveOutcome {
                removed: true,
                devices_left: 0
            }
        );
        assert_eq!(s.outbox_depth(), 0);
        assert_eq!(s.devices_of("bob".into()).await.unwrap().len(), 1);
        assert_eq!(s.prune_events(11).await.unwrap(), 2);
    }
}
