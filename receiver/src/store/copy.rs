//! `dovepush-receiver store copy --from <SQLite file> --to <PostgreSQL URL>`: moves a
//! single-box site's devices, users' last errors and outbox into an empty PostgreSQL
//! store, so that it can grow to several receivers without re-registering every phone.
//!
//! Stop the receiver first: the copy reads the file as it is. Items it had in flight are
//! copied as pending (that process is gone), each device's items folded into one pending
//! item as a restart would. Ids are kept (the sequences continue after them). The event
//! ids kept for de-duplication are not copied: an event a sender replays across the
//! switch may be pushed once more. All in one transaction: a failed copy leaves the
//! database empty.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::postgres::PgStore;
use super::sqlite::schema;
use crate::config::PostgresConfig;
use crate::domain::event::PushContent;
use crate::domain::store::StoreError;

/// What a copy moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copied {
    pub devices: u64,
    pub users: u64,
    /// Outbox items, after folding each device's into one.
    pub items: u64,
}

/// Rows per multi-row insert.
const CHUNK: usize = 1000;

struct Device {
    id: i64,
    user: String,
    app: String,
    transport: String,
    token: String,
    mailboxes: String,
    privacy: String,
    created_at: i64,
    updated_at: i64,
    last_success_at: Option<i64>,
    last_error: Option<String>,
    last_error_at: Option<i64>,
}

struct Item {
    id: i64,
    device_id: i64,
    content: PushContent,
    attempts: i32,
    created_at: i64,
    due_at: i64,
    last_error: Option<String>,
}

/// Copies the SQLite store at `from` into the PostgreSQL store `to` (migrated first,
/// which must hold no devices and no items yet).
pub async fn sqlite_to_postgres(from: &Path, to: &PostgresConfig) -> Result<Copied, StoreError> {
    let path = from.to_owned();
    let (devices, users, items) = tokio::task::spawn_blocking(move || read_sqlite(&path))
        .await
        .map_err(|e| StoreError::Database(e.to_string()))??;
    PgStore::migrate(to).await?;
    let store = PgStore::open_existing(to).await?;
    let mut client = store.client().await?;
    let fail = |e: tokio_postgres::Error| super::postgres::store_error(e, "copy");
    let tx = client.transaction().await.map_err(fail)?;
    let present: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM devices) + (SELECT count(*) FROM outbox)",
            &[],
        )
        .await
        .map_err(fail)?
        .get(0);
    if present > 0 {
        return Err(StoreError::Database(format!(
            "{} already holds devices or outbox items: copy into an empty database",
            to.url
        )));
    }
    for chunk in devices.chunks(CHUNK) {
        let col = |f: fn(&Device) -> String| chunk.iter().map(f).collect::<Vec<_>>();
        let ids: Vec<i64> = chunk.iter().map(|d| d.id).collect();
        let created: Vec<i64> = chunk.iter().map(|d| d.created_at).collect();
        let updated: Vec<i64> = chunk.iter().map(|d| d.updated_at).collect();
        let success: Vec<Option<i64>> = chunk.iter().map(|d| d.last_success_at).collect();
        let error: Vec<Option<String>> = chunk.iter().map(|d| d.last_error.clone()).collect();
        let error_at: Vec<Option<i64>> = chunk.iter().map(|d| d.last_error_at).collect();
        tx.execute(
            "INSERT INTO devices (id, login, app, transport, token, mailboxes, privacy,
                 created_at, updated_at, last_success_at, last_error, last_error_at)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],
                 $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[],
                 $10::bigint[], $11::text[], $12::bigint[])",
            &[
                &ids,
                &col(|d| d.user.clone()),
                &col(|d| d.app.clone()),
                &col(|d| d.transport.clone()),
                &col(|d| d.token.clone()),
                &col(|d| d.mailboxes.clone()),
                &col(|d| d.privacy.clone()),
                &created,
                &updated,
                &success,
                &error,
                &error_at,
            ],
        )
        .await
        .map_err(fail)?;
    }
    for chunk in users.chunks(CHUNK) {
        let logins: Vec<&str> = chunk.iter().map(|u| u.0.as_str()).collect();
        let errors: Vec<Option<&str>> = chunk.iter().map(|u| u.1.as_deref()).collect();
        let at: Vec<Option<i64>> = chunk.iter().map(|u| u.2).collect();
        tx.execute(
            "INSERT INTO users (login, last_error, last_error_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
             ON CONFLICT (login) DO UPDATE SET last_error = excluded.last_error,
                 last_error_at = excluded.last_error_at",
            &[&logins, &errors, &at],
        )
        .await
        .map_err(fail)?;
    }
    for chunk in items.chunks(CHUNK) {
        let ids: Vec<i64> = chunk.iter().map(|i| i.id).collect();
        let device_ids: Vec<i64> = chunk.iter().map(|i| i.device_id).collect();
        let contents: Vec<String> = chunk
            .iter()
            .map(|i| serde_json::to_string(&i.content).unwrap_or_default())
            .collect();
        let attempts: Vec<i32> = chunk.iter().map(|i| i.attempts).collect();
        let created: Vec<i64> = chunk.iter().map(|i| i.created_at).collect();
        let due: Vec<i64> = chunk.iter().map(|i| i.due_at).collect();
        let errors: Vec<Option<&str>> = chunk.iter().map(|i| i.last_error.as_deref()).collect();
        tx.execute(
            "INSERT INTO outbox (id, device_id, state, content, attempts, created_at, due_at,
                 last_error)
             SELECT i, d, 0, c, a, cr, du, e FROM unnest($1::bigint[], $2::bigint[],
                 $3::text[], $4::integer[], $5::bigint[], $6::bigint[], $7::text[])
                 AS t(i, d, c, a, cr, du, e)",
            &[
                &ids,
                &device_ids,
                &contents,
                &attempts,
                &created,
                &due,
                &errors,
            ],
        )
        .await
        .map_err(fail)?;
    }
    tx.batch_execute(
        "SELECT setval('devices_id_seq', coalesce((SELECT max(id) FROM devices), 0) + 1, false);
         SELECT setval('outbox_id_seq', coalesce((SELECT max(id) FROM outbox), 0) + 1, false);",
    )
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok(Copied {
        devices: devices.len() as u64,
        users: users.len() as u64,
        items: items.len() as u64,
    })
}

type UserRow = (String, Option<String>, Option<i64>);

/// What the file holds to copy: devices, users, outbox items.
type Source = (Vec<Device>, Vec<UserRow>, Vec<Item>);

/// Everything to copy, read in one read transaction of the file.
fn read_sqlite(path: &Path) -> Result<Source, StoreError> {
    let open = |message: String| StoreError::Open {
        path: path.display().to_string(),
        message,
    };
    if !path.exists() {
        return Err(open("no such file".into()));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| open(e.to_string()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch("BEGIN")?;
    let version = schema::version(&conn)?;
    if version != schema::VERSION {
        return Err(StoreError::Schema(super::wrong_version(
            version,
            schema::VERSION,
        )));
    }
    let devices = conn
        .prepare(
            "SELECT id, user, app, transport, token, mailboxes, privacy, created_at, updated_at,
                    last_success_at, last_error, last_error_at FROM devices ORDER BY id",
        )?
        .query_map([], |r| {
            Ok(Device {
                id: r.get(0)?,
                user: r.get(1)?,
                app: r.get(2)?,
                transport: r.get(3)?,
                token: r.get(4)?,
                mailboxes: r.get(5)?,
                privacy: r.get(6)?,
                created_at: r.get(7)?,
                updated_at: r.get(8)?,
                last_success_at: r.get(9)?,
                last_error: r.get(10)?,
                last_error_at: r.get(11)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let users = conn
        .prepare("SELECT user, last_error, last_error_at FROM users ORDER BY user")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<UserRow>>>()?;
    let mut by_device: BTreeMap<i64, Item> = BTreeMap::new();
    let mut stmt = conn.prepare(
        "SELECT o.id, o.device_id, o.content, o.attempts, o.created_at, o.due_at, o.last_error
         FROM outbox o JOIN devices d ON d.id = o.device_id ORDER BY o.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i32>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    for row in rows {
        let (id, device_id, content, attempts, created_at, due_at, last_error) = row?;
        let content: PushContent = serde_json::from_str(&content)
            .map_err(|e| StoreError::Corrupt(format!("outbox item {id}: {e}")))?;
        let item = Item {
            id,
            device_id,
            content,
            attempts,
            created_at,
            due_at,
            last_error,
        };
        // One pending item per device: the others fold into it (newest content wins).
        let merged = match by_device.remove(&device_id) {
            None => item,
            Some(old) => {
                let (older, newer) = if item.content.received_at >= old.content.received_at {
                    (old, item)
                } else {
                    (item, old)
                };
                Item {
                    id: older.id.min(newer.id),
                    device_id,
                    attempts: older.attempts.min(newer.attempts),
                    created_at: older.created_at.max(newer.created_at),
                    due_at: older.due_at.min(newer.due_at),
                    last_error: newer.last_error.or(older.last_error),
                    content: older.content.absorb(newer.content),
                }
            }
        };
        by_device.insert(device_id, merged);
    }
    let mut items: Vec<Item> = by_device.into_values().collect();
    items.sort_by_key(|i| i.id);
    Ok((devices, users, items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::DeviceRegistration;
    use crate::domain::event::NewMailEvent;
    use crate::domain::store::Store;
    use crate::store::postgres::tests::fresh_config;
    use crate::store::sqlite::SqliteStore;
    use dovepush_push::{DeviceKind, Privacy};

    fn reg(user: &str, token: &str) -> DeviceRegistration {
        DeviceRegistration {
            transport: DeviceKind::Fcm,
            mailboxes: vec!["INBOX".into(), "Work".into()],
            privacy: Privacy::Silent,
            ..DeviceRegistration::for_tests(user, token)
        }
    }

    fn event(user: &str, id: &str, uid: u32) -> NewMailEvent {
        NewMailEvent {
            event_id: Some(id.into()),
            kind: crate::domain::event::EventKind::MessageNew,
            user: user.into(),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid,
            from: None,
            subject: Some(format!("s{uid}")),
            snippet: None,
            unseen: Some(uid),
            time_ms: None,
            received_at: 100 + i64::from(uid),
        }
    }

    #[tokio::test]
    async fn devices_and_pending_items_reach_postgres_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        {
            let s = SqliteStore::open(&path).unwrap();
            for (u, t) in [("alice", "a1"), ("alice", "a2"), ("bob", "b1")] {
                s.register_device(reg(u, t), 5).await.unwrap();
            }
            // alice: one item in flight and one pending per device; bob: one pending.
            let first = s.ingest(event("alice", "e1", 1), 0, 10).await;
            assert_eq!(first.in_flight.len(), 2);
            s.ingest(event("alice", "e2", 2), 0, 10)
                .await
                .result
                .unwrap();
            s.ingest(event("bob", "e3", 3), 10_000, 10)
                .await
                .result
                .unwrap();
        }
        let to = fresh_config();
        let copied = sqlite_to_postgres(&path, &to).await.unwrap();
        assert_eq!(
            copied,
            Copied {
                devices: 3,
                users: 0,
                items: 3
            }
        );
        let pg = PgStore::open(&to, "n".into()).await.unwrap();
        let alice = pg.devices_of("alice".into()).await.unwrap();
        assert_eq!(alice.len(), 2);
        assert_eq!(alice[0].mailboxes, vec!["INBOX", "Work"]);
        assert_eq!(alice[0].privacy(), Privacy::Silent);
        assert_eq!(alice[0].device.kind, DeviceKind::Fcm);
        let items = pg.claim_due(1_000, 10).await.unwrap();
        assert_eq!(items.len(), 2, "bob's is not due yet");
        for item in &items {
            assert_eq!(item.content.event_id.as_deref(), Some("e2"));
            assert_eq!(item.content.coalesced, 1, "the in-flight e1 folded into e2");
        }
        // New rows continue after the copied ids.
        pg.register_device(reg("carol", "c1"), 6).await.unwrap();
        let carol = pg.devices_of("carol".into()).await.unwrap();
        assert!(carol[0].id > alice[1].id);
        // Twice: refused, nothing changed.
        let err = sqlite_to_postgres(&path, &to)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty database"), "{err}");
        assert_eq!(pg.outbox_depth().await.unwrap(), 3);
    }
}
