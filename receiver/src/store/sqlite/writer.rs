//! The group-commit engine: one writer thread runs every queued command in one
//! transaction and commits; a sync thread `fdatasync`s the write-ahead log once for every
//! batch committed since its last sync and only then answers the batch's callers. See the
//! module above for why; [`super::commands`] has what each command does.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::commands::{execute, fail_command, Answer, Command, Fate};
use super::queries::count_outbox;

/// Most commands committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Commands that may wait for the writer before senders wait too.
pub(super) const QUEUE_CAPACITY: usize = 16 * 1024;
/// How long the writer waits at most for the sync thread's wake-up while it gathers
/// commands into an open transaction (a bound, should a wake-up be missed).
const SYNC_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(2);
/// How long the writer keeps a transaction open at most waiting for a sync to end (a slow
/// disk then gets several commits per sync, as a writer that does not wait would).
const SYNC_HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(20);

/// A committed batch waiting for the log to reach the disk: its answers, and the error
/// that rolled it back, if one did.
pub(super) struct Committed {
    answers: Vec<Answer>,
    failure: Option<String>,
}

/// Answers committed batches once the log is on disk: takes every batch the writer has
/// committed so far, syncs the log once for all of them, answers them in commit order.
/// Stops when the writer is gone and everything it committed is answered.
pub(super) fn sync_loop(
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

/// How often the writer counts the outbox again for the depth gauge.
const DEPTH_RECOUNT: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) fn writer_loop(
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
pub(super) fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}
