//! The transactions that change the PostgreSQL store: ingest (the event and its fan-out),
//! register, remove, the idle-device sweep, claim, complete; giving back and taking over in-flight items; the
//! node's lease; the held advisory lock of a user.
//!
//! Lock order, the same in every transaction: device rows (by id), then outbox rows.
//! Claims take outbox rows only, skipping locked ones, so they never wait.

use std::time::Duration;

use deadpool_postgres::{GenericClient, Transaction};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::Row;

use super::queries::{device_from_row, DEVICE_COLUMNS};
use super::{get, schema, Fail};
use crate::domain::device::{wants_folder, DeviceRegistration};
use crate::domain::event::{NewMailEvent, PushContent};
use crate::domain::now_millis;
use crate::domain::outbox::folded_due_at;
use crate::domain::store::{
    CompleteOutcome, Completed, Completion, IdleDevice, IdleRemoval, IngestOutcome, OutboxItem,
    RegisterOutcome, RemoveOutcome, StoreError,
};

// Outbox states, spelled as literals in the SQL (as in the SQLite store, so the partial
// indexes apply): `state = 0` pending, `state = 1` in flight.
/// Most orphaned items taken over in one transaction.
const RECOVER_BATCH: i64 = 1000;
/// How long a node row stays after its last heartbeat (for operators' eyes) before it is
/// removed.
const NODE_ROW_TTL: Duration = Duration::from_secs(86_400);

pub(super) fn to_json(c: &PushContent) -> String {
    serde_json::to_string(c).unwrap_or_else(|_| "{}".to_owned())
}

fn from_json(item: i64, text: &str) -> Result<PushContent, Fail> {
    serde_json::from_str(text)
        .map_err(|e| Fail::Store(StoreError::Corrupt(format!("outbox item {item}: {e}"))))
}

/// Locks the rows of these devices (by id, as every transaction does).
async fn lock_devices(tx: &Transaction<'_>, ids: &[i64]) -> Result<(), Fail> {
    if ids.is_empty() {
        return Ok(());
    }
    let lock = tx
        .prepare_cached("SELECT id FROM devices WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .await?;
    tx.query(&lock, &[&ids]).await?;
    Ok(())
}

/// Ingest: the event (unless its id was seen), then one item per device that follows the
/// folder, or the event folded into that device's pending item. Items due at once for
/// devices without any item go in flight for this node, within `in_flight_limit`.
///
/// On failure, the items written in flight are returned too when the commit's outcome is
/// unknown (the connection broke during `COMMIT`): the dispatcher then sends them, which
/// at worst pushes an event twice; otherwise they would wait for this node's lease.
pub(super) async fn ingest(
    pool: &Pool,
    node: &str,
    event: &NewMailEvent,
    due_at: i64,
    in_flight_limit: usize,
) -> Result<(IngestOutcome, Vec<OutboxItem>), (Fail, Vec<OutboxItem>)> {
    let mut client = get(pool).await.map_err(|e| (Fail::Store(e), Vec::new()))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| (Fail::Pg(e), Vec::new()))?;
    let (outcome, in_flight) = ingest_in(&tx, node, event, due_at, in_flight_limit)
        .await
        .map_err(|e| (e, Vec::new()))?;
    match tx.commit().await {
        Ok(()) => Ok((outcome, in_flight)),
        Err(e) => Err((Fail::Pg(e), in_flight)),
    }
}

async fn ingest_in(
    tx: &Transaction<'_>,
    node: &str,
    event: &NewMailEvent,
    due_at: i64,
    in_flight_limit: usize,
) -> Result<(IngestOutcome, Vec<OutboxItem>), Fail> {
    let mut outcome = IngestOutcome::default();
    let mut in_flight = Vec::new();
    let badge_time = crate::store::badge_time(event);
    // One round trip: the event (unless its id was seen), and if it is new the user's
    // devices, locked, each with whether it has an item already. One row even without
    // devices (then with NULLs), so that a duplicate is told from a user without any.
    let ingest = tx
        .prepare_cached(&format!(
            "WITH ev AS (
                 INSERT INTO events (event_id, login, folder, uid, received_at, time_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING RETURNING 1)
             SELECT (SELECT count(*) FROM ev), {DEVICE_COLUMNS},
                 EXISTS (SELECT 1 FROM outbox o WHERE o.device_id = d.id)
             FROM (SELECT 1) AS one LEFT JOIN LATERAL (
                 SELECT * FROM devices WHERE login = $2 AND EXISTS (SELECT 1 FROM ev)
                 ORDER BY id FOR NO KEY UPDATE) AS d ON true
             ORDER BY d.id"
        ))
        .await?;
    let rows = tx
        .query(
            &ingest,
            &[
                &event.event_id,
                &event.user,
                &event.folder,
                &i64::from(event.uid),
                &event.received_at,
                &badge_time,
            ],
        )
        .await?;
    let inserted: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
    if inserted == 0 {
        outcome.duplicate = true;
        return Ok((outcome, in_flight));
    }
    if let Some(time_ms) = badge_time {
        // The user's devices are locked now: a concurrent ingest for them has committed
        // (and is seen by this statement) or waits for this one.
        outcome.stale = tx
            .query_opt(
                "SELECT 1 FROM events WHERE login = $1 AND folder = $2 AND time_ms > $3 LIMIT 1",
                &[&event.user, &event.folder, &time_ms],
            )
            .await?
            .is_some();
        if outcome.stale {
            return Ok((outcome, in_flight));
        }
    }
    let received_at = event.received_at;
    let content = PushContent::from(event.clone());
    let in_flight_limit = if due_at <= received_at {
        in_flight_limit
    } else {
        0
    };
    let mut json: Option<String> = None;
    for row in rows {
        if row.get::<_, Option<i64>>(1).is_none() {
            continue; // the user has no device
        }
        let device = device_from_row(&row, 1, 0)?;
        let busy: bool = row.get(13);
        if !wants_folder(&device.mailboxes, &content.folder) {
            continue;
        }
        outcome.matched_devices += 1;
        let device_id = device.id;
        let json: &str = json.get_or_insert_with(|| to_json(&content));
        // Most often the device has no item: within the caller's limit, the new item
        // goes in flight at once (one write instead of an insert now and a claim later).
        if in_flight.len() < in_flight_limit && !busy {
            let insert = tx
                .prepare_cached(
                    "INSERT INTO outbox
                         (device_id, state, content, attempts, created_at, due_at, claimed_by)
                     VALUES ($1, 1, $2, 0, $3, $4, $5) RETURNING id",
                )
                .await?;
            let id: i64 = tx
                .query_one(&insert, &[&device_id, &json, &received_at, &due_at, &node])
                .await?
                .get(0);
            outcome.queued += 1;
            outcome.handed_over += 1;
            in_flight.push(OutboxItem {
                id,
                device,
                content: content.clone(),
                attempts: 0,
                created_at: received_at,
                due_at,
            });
            continue;
        }
        // A new pending item, or the event folded into the pending one. A claim on
        // another node may take that pending item between the two statements: then
        // there is none, and the insert is tried again.
        let insert = tx
            .prepare_cached(
                "INSERT INTO outbox (device_id, state, content, attempts, created_at, due_at)
                 VALUES ($1, 0, $2, 0, $3, $4)
                 ON CONFLICT (device_id) WHERE state = 0 DO NOTHING",
            )
            .await?;
        let pending = tx
            .prepare_cached(
                "SELECT id, content, attempts, due_at FROM outbox \
                 WHERE device_id = $1 AND state = 0 FOR UPDATE",
            )
            .await?;
        let mut tries = 0;
        loop {
            let n = tx
                .execute(&insert, &[&device_id, &json, &received_at, &due_at])
                .await?;
            if n > 0 {
                outcome.queued += 1;
                break;
            }
            if let Some(row) = tx.query_opt(&pending, &[&device_id]).await? {
                let item_id: i64 = row.get(0);
                let old = from_json(item_id, row.get(1))?;
                let merged = old.absorb(content.clone());
                let (attempts, old_due_at): (i32, i64) = (row.get(2), row.get(3));
                let new_due_at = folded_due_at(i64::from(attempts), old_due_at, due_at);
                let fold = tx
                    .prepare_cached(
                        "UPDATE outbox SET content = $2, created_at = $3, due_at = $4 WHERE id = $1",
                    )
                    .await?;
                tx.execute(
                    &fold,
                    &[&item_id, &to_json(&merged), &received_at, &new_due_at],
                )
                .await?;
                outcome.coalesced += 1;
                outcome.advanced += u32::from(new_due_at < old_due_at);
                break;
            }
            tries += 1;
            if tries >= 3 {
                return Err(Fail::Store(StoreError::Database(format!(
                    "outbox insert for device {device_id} kept conflicting without a pending item"
                ))));
            }
        }
    }
    Ok((outcome, in_flight))
}

pub(super) async fn register(
    pool: &Pool,
    reg: &DeviceRegistration,
    now: i64,
) -> Result<RegisterOutcome, Fail> {
    let mut client = get(pool).await?;
    let tx = client.transaction().await?;
    let before: i64 = tx
        .query_one(
            "SELECT count(*) FROM devices WHERE login = $1",
            &[&reg.user],
        )
        .await?
        .get(0);
    let mailboxes =
        serde_json::to_string(&reg.mailboxes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let created: bool = tx
        .query_one(
            "INSERT INTO devices
                 (login, app, token, transport, mailboxes, privacy, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (login, app, token) DO UPDATE SET transport = excluded.transport,
                 mailboxes = excluded.mailboxes, privacy = excluded.privacy,
                 updated_at = excluded.updated_at
             RETURNING xmax = 0",
            &[
                &reg.user,
                &reg.app,
                &reg.token,
                &reg.transport.as_str(),
                &mailboxes,
                &reg.privacy.as_str(),
                &now,
            ],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(RegisterOutcome {
        created,
        devices_before: before as u64,
    })
}

pub(super) async fn remove(pool: &Pool, user: &str, token: &str) -> Result<RemoveOutcome, Fail> {
    let mut client = get(pool).await?;
    let tx = client.transaction().await?;
    let ids: Vec<i64> = tx
        .query(
            "SELECT id FROM devices WHERE login = $1 AND token = $2 ORDER BY id FOR UPDATE",
            &[&user, &token],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.execute("DELETE FROM outbox WHERE device_id = ANY($1)", &[&ids])
        .await?;
    let removed = tx
        .execute("DELETE FROM devices WHERE id = ANY($1)", &[&ids])
        .await?;
    let left: i64 = tx
        .query_one("SELECT count(*) FROM devices WHERE login = $1", &[&user])
        .await?
        .get(0);
    tx.commit().await?;
    Ok(RemoveOutcome {
        removed: removed > 0,
        devices_left: left as u64,
    })
}

/// Records `reason` as the user's last error (why a device of theirs was removed).
async fn record_user_error(
    tx: &Transaction<'_>,
    user: &str,
    reason: &str,
    at: i64,
) -> Result<(), Fail> {
    tx.execute(
        "INSERT INTO users (login, last_error, last_error_at) VALUES ($1, $2, $3)
         ON CONFLICT (login) DO UPDATE SET last_error = $2, last_error_at = $3",
        &[&user, &reason, &at],
    )
    .await?;
    Ok(())
}

/// Removes up to `limit` devices not registered since `seen_before`, skipping rows another
/// receiver is changing right now (a registration refreshing one wins; another node's
/// sweep takes the rest).
pub(super) async fn remove_idle(
    pool: &Pool,
    seen_before: i64,
    limit: usize,
    reason: &str,
    now: i64,
) -> Result<IdleRemoval, Fail> {
    let mut client = get(pool).await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, login, app, transport, updated_at FROM devices
             WHERE updated_at < $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&seen_before, &(limit as i64)],
        )
        .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    tx.execute("DELETE FROM outbox WHERE device_id = ANY($1)", &[&ids])
        .await?;
    tx.execute("DELETE FROM devices WHERE id = ANY($1)", &[&ids])
        .await?;
    let mut removed: Vec<IdleDevice> = rows
        .iter()
        .map(|r| IdleDevice {
            user: r.get(1),
            app: r.get(2),
            transport: r.get(3),
            last_seen: r.get(4),
        })
        .collect();
    removed.sort_by_key(|d| d.last_seen);
    let mut outcome = IdleRemoval {
        removed,
        users_without_devices: Vec::new(),
    };
    // Users' rows in one order (by login) in every sweep, so two sweeps cannot deadlock.
    let users: std::collections::BTreeSet<&str> =
        outcome.removed.iter().map(|d| d.user.as_str()).collect();
    for user in users {
        record_user_error(&tx, user, reason, now).await?;
        let left: i64 = tx
            .query_one("SELECT count(*) FROM devices WHERE login = $1", &[&user])
            .await?
            .get(0);
        if left == 0 {
            outcome.users_without_devices.push(user.to_owned());
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Claims up to `limit` due pending items for `node`, oldest due first, skipping rows
/// another node is claiming (or changing) right now.
pub(super) async fn claim(
    pool: &Pool,
    node: &str,
    now: i64,
    limit: usize,
) -> Result<Vec<OutboxItem>, Fail> {
    let client = get(pool).await?;
    let stmt = client
        .prepare_cached(&format!(
            "WITH picked AS (
                 SELECT id FROM outbox WHERE state = 0 AND due_at <= $1
                 ORDER BY due_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE outbox o SET state = 1, claimed_by = $3
             FROM picked p, devices d WHERE o.id = p.id AND d.id = o.device_id
             RETURNING o.id, o.content, o.attempts, o.created_at, o.due_at, {DEVICE_COLUMNS}"
        ))
        .await?;
    let rows = client.query(&stmt, &[&now, &(limit as i64), &node]).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.get(0);
        let content = match from_json(id, row.get(1)) {
            Ok(c) => c,
            Err(_) => {
                tracing::error!(item = id, "Unreadable outbox item; dropping it.");
                client
                    .execute("DELETE FROM outbox WHERE id = $1", &[&id])
                    .await?;
                continue;
            }
        };
        let attempts: i32 = row.get(2);
        items.push(OutboxItem {
            id,
            device: device_from_row(&row, 5, 0)?,
            content,
            attempts: attempts.max(0) as u32,
            created_at: row.get(3),
            due_at: row.get(4),
        });
    }
    items.sort_by_key(|i| (i.due_at, i.id));
    Ok(items)
}

/// Makes item `id` (in flight) pending again — due at `due_at` with one more attempt and
/// `reason` when given — or folds it into the device's pending item. The device's row
/// is locked by the caller.
async fn requeue(
    tx: &Transaction<'_>,
    id: i64,
    device_id: i64,
    due_at: Option<i64>,
    reason: Option<&str>,
) -> Result<(), Fail> {
    let pending = tx
        .query_opt(
            "SELECT id, content FROM outbox WHERE device_id = $1 AND state = 0 FOR UPDATE",
            &[&device_id],
        )
        .await?;
    match pending {
        None => {
            tx.execute(
                "UPDATE outbox SET state = 0, claimed_by = NULL,
                     attempts = attempts + $2, due_at = coalesce($3, due_at),
                     last_error = coalesce($4, last_error)
                 WHERE id = $1",
                &[&id, &i32::from(due_at.is_some()), &due_at, &reason],
            )
            .await?;
        }
        Some(row) => {
            let pending_id: i64 = row.get(0);
            let mine = tx
                .query_opt("SELECT content FROM outbox WHERE id = $1", &[&id])
                .await?;
            if let Some(mine) = mine {
                if let (Ok(p), Ok(m)) = (
                    from_json(pending_id, row.get(1)),
                    from_json(id, mine.get(0)),
                ) {
                    let merged = if m.received_at > p.received_at {
                        p.absorb(m)
                    } else {
                        m.absorb(p)
                    };
                    tx.execute(
                        "UPDATE outbox SET content = $2 WHERE id = $1",
                        &[&pending_id, &to_json(&merged)],
                    )
                    .await?;
                }
            }
            tx.execute("DELETE FROM outbox WHERE id = $1", &[&id])
                .await?;
        }
    }
    Ok(())
}

pub(super) async fn complete(
    pool: &Pool,
    node: &str,
    done: &[Completed],
) -> Result<CompleteOutcome, Fail> {
    let mut client = get(pool).await?;
    let tx = client.transaction().await?;
    let mut devices: Vec<i64> = done.iter().map(|c| c.device_id).collect();
    devices.sort_unstable();
    devices.dedup();
    lock_devices(&tx, &devices).await?;
    let mut outcome = CompleteOutcome::default();
    let device_error = "UPDATE devices SET last_error = $2, last_error_at = $3 WHERE id = $1";
    // Deliveries, nearly all of them, in two statements: the items go (whoever holds
    // them now: the push went out), the devices record their success.
    let delivered: Vec<&Completed> = done
        .iter()
        .filter(|c| c.completion == Completion::Delivered)
        .collect();
    if !delivered.is_empty() {
        let items: Vec<i64> = delivered.iter().map(|c| c.item_id).collect();
        let devices: Vec<i64> = delivered.iter().map(|c| c.device_id).collect();
        let at: Vec<i64> = delivered.iter().map(|c| c.at).collect();
        let delete = tx
            .prepare_cached("DELETE FROM outbox WHERE id = ANY($1)")
            .await?;
        tx.execute(&delete, &[&items]).await?;
        let success = tx
            .prepare_cached(
                "UPDATE devices d SET last_success_at = v.at
                 FROM (SELECT id, max(at) AS at FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at)
                       GROUP BY id) v
                 WHERE d.id = v.id",
            )
            .await?;
        tx.execute(&success, &[&devices, &at]).await?;
    }
    for c in done {
        match &c.completion {
            Completion::Delivered => {}
            Completion::Retry { due_at, reason } => {
                // Only while it is still this node's: after a takeover, the other node
                // decides.
                let ours = tx
                    .query_opt(
                        "SELECT 1 FROM outbox WHERE id = $1 AND state = 1 AND claimed_by = $2
                         FOR UPDATE",
                        &[&c.item_id, &node],
                    )
                    .await?
                    .is_some();
                if ours {
                    requeue(&tx, c.item_id, c.device_id, Some(*due_at), Some(reason)).await?;
                }
                tx.execute(device_error, &[&c.device_id, reason, &c.at])
                    .await?;
            }
            Completion::Drop { reason } => {
                tx.execute("DELETE FROM outbox WHERE id = $1", &[&c.item_id])
                    .await?;
                tx.execute(device_error, &[&c.device_id, reason, &c.at])
                    .await?;
            }
            Completion::DeleteDevice { reason } => {
                tx.execute("DELETE FROM outbox WHERE device_id = $1", &[&c.device_id])
                    .await?;
                let removed = tx
                    .execute("DELETE FROM devices WHERE id = $1", &[&c.device_id])
                    .await?;
                record_user_error(&tx, &c.user, reason, c.at).await?;
                let left: i64 = tx
                    .query_one("SELECT count(*) FROM devices WHERE login = $1", &[&c.user])
                    .await?
                    .get(0);
                if removed > 0 && left == 0 && !outcome.users_without_devices.contains(&c.user) {
                    outcome.users_without_devices.push(c.user.clone());
                }
            }
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Makes in-flight items pending again, each folded into its device's pending item if it
/// has one: those of `owner` (a node starting again or stopping), or, without an owner,
/// those whose node's last heartbeat is older than `cutoff` (ms since the epoch) or
/// unknown. Returns how many.
pub(super) async fn recover(
    pool: &Pool,
    owner: Option<&str>,
    cutoff: i64,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = retrying!(
            "take over items in flight",
            recover_batch(pool, owner, cutoff)
        )?;
        total += n;
        if n < RECOVER_BATCH as u64 {
            return Ok(total);
        }
    }
}

async fn recover_batch(pool: &Pool, owner: Option<&str>, cutoff: i64) -> Result<u64, Fail> {
    let mut client = get(pool).await?;
    let tx = client.transaction().await?;
    let select = "SELECT o.id, o.device_id FROM outbox o
         WHERE o.state = 1 AND ($1::text IS NOT NULL AND o.claimed_by = $1
             OR $1::text IS NULL AND NOT EXISTS (
                 SELECT 1 FROM nodes n WHERE n.id = o.claimed_by AND n.heartbeat_at >= $2))
         ORDER BY o.id LIMIT $3";
    let rows = tx.query(select, &[&owner, &cutoff, &RECOVER_BATCH]).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut devices: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    devices.sort_unstable();
    devices.dedup();
    lock_devices(&tx, &devices).await?;
    // Again under the device locks, skipping items another node is taking over now.
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let locked = tx
        .query(
            "SELECT o.id, o.device_id FROM outbox o
             WHERE o.id = ANY($1) AND o.state = 1 AND ($2::text IS NOT NULL AND o.claimed_by = $2
                 OR $2::text IS NULL AND NOT EXISTS (
                     SELECT 1 FROM nodes n WHERE n.id = o.claimed_by AND n.heartbeat_at >= $3))
             ORDER BY o.device_id, o.id FOR UPDATE OF o SKIP LOCKED",
            &[&ids, &owner, &cutoff],
        )
        .await?;
    for row in &locked {
        requeue(&tx, row.get(0), row.get(1), None, None).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Gives back every item `node` has in flight, and removes its lease (it is stopping).
pub(super) async fn release(pool: &Pool, node: &str) -> Result<u64, StoreError> {
    let n = recover(pool, Some(node), 0).await?;
    get(pool)
        .await?
        .execute("DELETE FROM nodes WHERE id = $1", &[&node])
        .await
        .map_err(|e| super::store_error(e, "remove the node's lease"))?;
    Ok(n)
}

/// Renews (or creates) `node`'s lease as of `now`.
pub(super) async fn heartbeat(
    client: &impl GenericClient,
    node: &str,
    now: i64,
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO nodes (id, started_at, heartbeat_at) VALUES ($1, $2, $2)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = $2",
            &[&node, &now],
        )
        .await
        .map_err(|e| super::store_error(e, "renew the node's lease"))?;
    Ok(())
}

/// The background task of a serving node: renews its lease every third of it, takes over
/// the in-flight items of nodes whose lease ran out, and forgets long-dead nodes.
pub(super) async fn keep_lease(pool: Pool, node: std::sync::Arc<str>, lease: Duration) {
    let every = (lease / 3).max(Duration::from_millis(100));
    let mut lost_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        let now = now_millis();
        let renewed = match get(&pool).await {
            Ok(client) => heartbeat(&client, &node, now).await,
            Err(e) => Err(e),
        };
        match renewed {
            Ok(()) => {
                if lost_since.take().is_some() {
                    tracing::info!("Lease renewed again.");
                }
            }
            Err(e) => {
                let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
                tracing::warn!(
                    error = %e,
                    "Cannot renew this receiver's lease; after {} s other receivers take over its items in flight.",
                    lease.saturating_sub(since.elapsed()).as_secs()
                );
                continue;
            }
        }
        let cutoff = now - lease.as_millis() as i64;
        match recover(&pool, None, cutoff).await {
            Ok(n) if n > 0 => tracing::warn!(
                items = n,
                "Took over items in flight of receivers whose lease ran out."
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Cannot take over items of dead receivers."),
        }
        let forget = now - NODE_ROW_TTL.as_millis() as i64;
        if let Ok(client) = get(&pool).await {
            let _ = client
                .execute("DELETE FROM nodes WHERE heartbeat_at < $1", &[&forget])
                .await;
        }
    }
}

/// A user's session advisory lock, held on its pooled connection until dropped.
pub(super) struct AdvisoryLock {
    client: Option<Object>,
    user: String,
}

impl AdvisoryLock {
    pub(super) fn new(client: Object, user: String) -> Self {
        Self {
            client: Some(client),
            user,
        }
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let user = std::mem::take(&mut self.user);
        let unlock = async move {
            let unlocked = client
                .query_one(
                    "SELECT pg_advisory_unlock($1, hashtext($2))",
                    &[&schema::LOCK_USER, &user],
                )
                .await
                .map(|r: Row| r.get::<_, bool>(0));
            if !matches!(unlocked, Ok(true)) {
                // Closing the session releases it for sure.
                drop(Object::take(client));
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(unlock);
            }
            // No runtime: the connection closes with the pool, and the lock with it.
            Err(_) => drop(unlock),
        }
    }
}
