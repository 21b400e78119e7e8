//! What the store reads on its second connection (WAL readers never wait for the
//! writer): a user's devices, the status listing, the operators' queue listing, when the
//! next item is due, and the outbox's size.

use rusqlite::Connection;

use super::schema::{device_from_row, STATE_IN_FLIGHT};
use crate::domain::device::RegisteredDevice;
use crate::domain::event::PushContent;
use crate::domain::store::{QueueEntry, StoreError, UserStatus};

/// Items in the outbox (pending and in flight): the depth gauge.
pub(super) fn count_outbox(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
}

pub(super) fn read_devices(
    conn: &Connection,
    user: Option<&str>,
) -> Result<Vec<RegisteredDevice>, StoreError> {
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

/// When the next pending item is due.
pub(super) fn next_due_at(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT min(due_at) FROM outbox WHERE state = 0")?
        .query_row([], |r| r.get::<_, Option<i64>>(0))?)
}

/// Users with devices (or a last error), with their devices; one user if given.
pub(super) fn subscriptions(
    conn: &Connection,
    user: Option<&str>,
) -> Result<Vec<UserStatus>, StoreError> {
    let devices = read_devices(conn, user)?;
    let mut errors: std::collections::BTreeMap<String, (Option<String>, Option<i64>)> = conn
        .prepare_cached(
            "SELECT user, last_error, last_error_at FROM users WHERE ?1 IS NULL OR user = ?1",
        )?
        .query_map([user], |r| {
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
}

/// Outbox rows, oldest due first.
pub(super) fn queue_list(conn: &Connection, limit: usize) -> Result<Vec<QueueEntry>, StoreError> {
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
}
