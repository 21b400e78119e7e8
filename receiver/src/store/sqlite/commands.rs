//! The commands the writer thread runs, each inside the batch's transaction: ingest (the
//! event and its fan-out), register, remove, claim, complete, the operators' queue
//! commands, pruning and the idle-device sweep; and the recovery of items a previous process left in flight.

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::schema::device_from_row;
use crate::domain::device::{wants_folder, DeviceRegistration, RegisteredDevice};
use crate::domain::event::{NewMailEvent, PushContent};
use crate::domain::outbox::folded_due_at;
use crate::domain::store::{
    CompleteOutcome, Completed, Completion, IdleDevice, IdleRemoval, IngestOutcome, Ingested,
    OutboxItem, RegisterOutcome, RemoveOutcome, StoreError,
};

/// Where a command's result goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A finished command, answered once the batch's commit is known.
pub(super) type Answer = Box<dyn FnOnce(Fate<'_>) + Send>;

/// What became of a finished command's transaction.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fate<'a> {
    /// Committed and on disk.
    Durable,
    /// Committed, but the sync of the log failed: it may not survive a power loss.
    NotSynced(&'a str),
    /// Rolled back (or never committed).
    RolledBack(&'a str),
}

impl Fate<'_> {
    pub(super) fn result<T>(self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match self {
            Fate::Durable => result,
            Fate::NotSynced(e) | Fate::RolledBack(e) => {
                Err(StoreError::Database(format!("commit failed: {e}")))
            }
        }
    }
}

pub(super) fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |fate| {
        let _ = reply.send(fate.result(result));
    })
}

pub(super) enum Command {
    Ingest {
        event: NewMailEvent,
        due_at: i64,
        in_flight_limit: usize,
        reply: oneshot::Sender<Ingested>,
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
    RemoveIdle {
        seen_before: i64,
        limit: usize,
        reason: String,
        now: i64,
        reply: Reply<IdleRemoval>,
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

/// Items a previous process had in flight were never confirmed: make them pending again,
/// keeping one pending item per device (the newest content wins).
pub(super) fn recover_in_flight(conn: &Connection) -> rusqlite::Result<()> {
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

pub(super) fn to_json(c: &PushContent) -> String {
    serde_json::to_string(c).unwrap_or_else(|_| "{}".to_owned())
}

/// An ingest's answer: the items it wrote in flight go back with the result once they are
/// committed, even when the sync failed (they are in flight all the same); a rolled-back
/// batch wrote none.
fn ingest_answer(
    reply: oneshot::Sender<Ingested>,
    outcome: IngestOutcome,
    in_flight: Vec<OutboxItem>,
) -> Answer {
    Box::new(move |fate| {
        let in_flight = match fate {
            Fate::RolledBack(_) => Vec::new(),
            Fate::Durable | Fate::NotSynced(_) => in_flight,
        };
        let _ = reply.send(Ingested {
            in_flight,
            result: fate.result(Ok(outcome)),
        });
    })
}

pub(super) fn fail_command(command: Command) -> Answer {
    fn f<T: Send + 'static>(r: Reply<T>) -> Answer {
        answer::<T>(r, Err(StoreError::Database("transaction aborted".into())))
    }
    match command {
        Command::Ingest { reply, .. } => Box::new(move |_| {
            let _ = reply.send(Ingested::failed(StoreError::Database(
                "transaction aborted".into(),
            )));
        }),
        Command::Register { reply, .. } => f(reply),
        Command::Remove { reply, .. } => f(reply),
        Command::RemoveIdle { reply, .. } => f(reply),
        Command::Claim { reply, .. } => f(reply),
        Command::Complete { reply, .. } => f(reply),
        Command::QueueRetry { reply, .. } => f(reply),
        Command::QueueDrop { reply, .. } => f(reply),
        Command::Prune { reply, .. } => f(reply),
    }
}

/// Runs one command; returns (succeeded, outbox depth change, answer).
pub(super) fn execute(conn: &Connection, command: Command) -> (bool, i64, Answer) {
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
            in_flight_limit,
            reply,
        } => match exec_ingest(conn, event, due_at, in_flight_limit) {
            Ok((outcome, delta, in_flight)) => {
                (true, delta, ingest_answer(reply, outcome, in_flight))
            }
            Err(e) => (
                false,
                0,
                Box::new(move |_| {
                    let _ = reply.send(Ingested::failed(e));
                }),
            ),
        },
        Command::Register {
            registration,
            now,
            reply,
        } => done(reply, exec_register(conn, &registration, now)),
        Command::Remove { user, token, reply } => done(reply, exec_remove(conn, &user, &token)),
        Command::RemoveIdle {
            seen_before,
            limit,
            reason,
            now,
            reply,
        } => done(
            reply,
            exec_remove_idle(conn, seen_before, limit, &reason, now),
        ),
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
    in_flight_limit: usize,
) -> Result<(IngestOutcome, i64, Vec<OutboxItem>), StoreError> {
    let badge_time = crate::store::badge_time(&event);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (event_id, user, folder, uid, received_at, time_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (event_id) DO NOTHING",
        )?
        .execute(params![
            event.event_id,
            event.user,
            event.folder,
            event.uid,
            event.received_at,
            badge_time
        ])?;
    let mut outcome = IngestOutcome::default();
    let mut in_flight = Vec::new();
    if inserted == 0 {
        outcome.duplicate = true;
        return Ok((outcome, 0, in_flight));
    }
    if let Some(time_ms) = badge_time {
        // The one writer serialises ingests: what is committed is all there is.
        outcome.stale = conn
            .prepare_cached(
                "SELECT 1 FROM events WHERE user = ?1 AND folder = ?2 AND time_ms > ?3 LIMIT 1",
            )?
            .exists(params![event.user, event.folder, time_ms])?;
        if outcome.stale {
            return Ok((outcome, 0, in_flight));
        }
    }
    let devices: Vec<RegisteredDevice> = conn
        .prepare_cached(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices d WHERE d.user = ?1"
        ))?
        .query_map([&event.user], |r| device_from_row(r, 0, 0))?
        .collect::<rusqlite::Result<_>>()?;
    let received_at = event.received_at;
    let content = PushContent::from(event);
    // Only an item due at once can go straight to the dispatcher (the caller's limit says
    // how many it takes now).
    let in_flight_limit = if due_at <= received_at {
        in_flight_limit
    } else {
        0
    };
    let mut content_json: Option<String> = None;
    let mut delta = 0;
    for device in devices {
        if !wants_folder(&device.mailboxes, &content.folder) {
            continue;
        }
        outcome.matched_devices += 1;
        let device_id = device.id;
        let json: &str = content_json.get_or_insert_with(|| to_json(&content));
        // Most often the device has no item at all: within the caller's limit, the new
        // item is in flight at once (one write instead of an insert now and a claim
        // later). A device with an item gets the next one pending (where later events
        // fold into it) and claimed.
        if in_flight.len() < in_flight_limit {
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
                in_flight.push(OutboxItem {
                    id: conn.last_insert_rowid(),
                    device,
                    content: content.clone(),
                    attempts: 0,
                    created_at: received_at,
                    due_at,
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
        let pending: Option<(i64, String, i64, i64)> = conn
            .prepare_cached(
                "SELECT id, content, attempts, due_at FROM outbox WHERE device_id = ?1 AND state = 0",
            )?
            .query_row([device_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        match pending {
            Some((item_id, old, attempts, old_due_at)) => {
                let old: PushContent = serde_json::from_str(&old)
                    .map_err(|e| StoreError::Corrupt(format!("outbox item {item_id}: {e}")))?;
                let merged = old.absorb(content.clone());
                let new_due_at = folded_due_at(attempts, old_due_at, due_at);
                conn.prepare_cached(
                    "UPDATE outbox SET content = ?2, created_at = ?3, due_at = ?4 WHERE id = ?1",
                )?
                .execute(params![
                    item_id,
                    to_json(&merged),
                    received_at,
                    new_due_at
                ])?;
                outcome.coalesced += 1;
                outcome.advanced += u32::from(new_due_at < old_due_at);
            }
            None => {
                return Err(StoreError::Database(format!(
                    "outbox insert for device {device_id} conflicted without a pending item"
                )))
            }
        }
    }
    Ok((outcome, delta, in_flight))
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

/// Records `reason` as the user's last error (why a device of theirs was removed).
fn record_user_error(conn: &Connection, user: &str, reason: &str, at: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO users (user, last_error, last_error_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (user) DO UPDATE SET last_error = ?2, last_error_at = ?3",
    )?
    .execute(params![user, reason, at])
    .map(drop)
}

fn exec_remove_idle(
    conn: &Connection,
    seen_before: i64,
    limit: usize,
    reason: &str,
    now: i64,
) -> Result<(IdleRemoval, i64), StoreError> {
    let idle = conn
        .prepare_cached(
            "SELECT id, user, app, transport, updated_at FROM devices
             WHERE updated_at < ?1 ORDER BY updated_at, id LIMIT ?2",
        )?
        .query_map(params![seen_before, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                IdleDevice {
                    user: r.get(1)?,
                    app: r.get(2)?,
                    transport: r.get(3)?,
                    last_seen: r.get(4)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut outcome = IdleRemoval::default();
    let mut delta = 0i64;
    for (id, device) in idle {
        let items = conn
            .prepare_cached("DELETE FROM outbox WHERE device_id = ?1")?
            .execute([id])?;
        delta -= items as i64;
        conn.prepare_cached("DELETE FROM devices WHERE id = ?1")?
            .execute([id])?;
        record_user_error(conn, &device.user, reason, now)?;
        outcome.removed.push(device);
    }
    for device in &outcome.removed {
        if !outcome.users_without_devices.contains(&device.user)
            && count_devices(conn, &device.user)? == 0
        {
            outcome.users_without_devices.push(device.user.clone());
        }
    }
    Ok((outcome, delta))
}

/// The claim's selection: due pending items with their devices, oldest due first.
pub(super) const CLAIM_SQL: &str = concat!(
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
    let rows: Vec<(i64, String, u32, i64, i64, RegisteredDevice)> = conn
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
                record_user_error(conn, &c.user, reason, c.at)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::schema::{configure, migrate};

    #[test]
    fn cached_statements_are_not_re_prepared_for_new_values() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.sqlite3")).unwrap();
        configure(&conn, false).unwrap();
        migrate(&conn).unwrap();
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
}
