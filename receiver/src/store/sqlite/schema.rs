//! The tables and indexes of the store file and their versioned migrations, the settings
//! of its connections, and how a device row reads (the columns every device query
//! selects).
//!
//! The schema's version is SQLite's `user_version`. Version 1 is the schema as it was
//! before versions existed (its statements are idempotent, so a file of that time, at
//! version 0, is simply marked 1). A migration is appended, never edited.

use rusqlite::{Connection, Row};

use crate::domain::device::{system_time, RegisteredDevice};
use crate::domain::store::StoreError;
use crate::store::{Migrated, Migration};
use dovepush_push::{Device, DeviceKind, Privacy};

/// Every migration, in order: version `i + 1` is `MIGRATIONS[i]`.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "devices, users, events, outbox",
        sql: SCHEMA_V1,
    },
    Migration {
        name: "devices by last registration, for the idle sweep",
        sql: "CREATE INDEX devices_updated_at ON devices (updated_at);",
    },
    Migration {
        name: "badge event times",
        sql: SCHEMA_V3,
    },
];

/// Badge events (`messageRead`, `messageExpunge`, `messageAppend`) keep when Dovecot
/// committed them, so that a later-arriving older one is known as stale.
const SCHEMA_V3: &str = "
ALTER TABLE events ADD COLUMN time_ms INTEGER;
CREATE INDEX events_badge_time ON events (user, folder, time_ms) WHERE time_ms IS NOT NULL;
";

/// The schema version this program works with.
pub(crate) const VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the file's schema to [`VERSION`] in one transaction; refuses a newer one.
pub(super) fn migrate(conn: &Connection) -> Result<Migrated, StoreError> {
    let schema = |e: rusqlite::Error| StoreError::Schema(format!("migration failed: {e}"));
    conn.execute_batch("BEGIN IMMEDIATE").map_err(schema)?;
    let result = (|| {
        let from = version(conn).map_err(schema)?;
        crate::store::check_version(from, VERSION)?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            conn.execute_batch(m.sql).map_err(|e| {
                StoreError::Schema(format!("migration {} ({}) failed: {e}", i + 1, m.name))
            })?;
        }
        conn.execute_batch(&format!("PRAGMA user_version = {VERSION}"))
            .map_err(schema)?;
        Ok(Migrated { from, to: VERSION })
    })();
    match &result {
        Ok(_) => conn.execute_batch("COMMIT").map_err(schema)?,
        Err(_) => {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    result
}

/// The file's schema version.
pub(crate) fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

const SCHEMA_V1: &str = r#"
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
pub(super) const STATE_IN_FLIGHT: i64 = 1;

/// The device columns [`device_from_row`] reads, as a macro so that the statements using
/// them are literals (no SQL text is built per execution).
macro_rules! device_columns {
    () => {
        "d.id, d.user, d.app, d.transport, d.token, d.mailboxes, d.privacy, d.created_at, \
         d.last_success_at, d.last_error, d.last_error_at, d.updated_at"
    };
}

pub(super) fn configure(conn: &Connection, reader: bool) -> rusqlite::Result<()> {
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

/// Reads the device columns (`device_columns!`) starting at `at`.
pub(super) fn device_from_row(
    r: &Row<'_>,
    at: usize,
    pending: u64,
) -> rusqlite::Result<RegisteredDevice> {
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(at + i, rusqlite::types::Type::Text, what.into())
    };
    let transport: String = r.get(at + 3)?;
    let mailboxes: String = r.get(at + 5)?;
    let privacy: String = r.get(at + 6)?;
    Ok(RegisteredDevice {
        id: r.get(at)?,
        user: r.get(at + 1)?,
        device: Device {
            app_id: r.get(at + 2)?,
            kind: transport
                .parse::<DeviceKind>()
                .ok()
                .ok_or_else(|| bad(3, format!("unknown transport {transport:?}")))?,
            token: r.get(at + 4)?,
            privacy: Some(
                privacy
                    .parse::<Privacy>()
                    .ok()
                    .ok_or_else(|| bad(6, format!("unknown privacy {privacy:?}")))?,
            ),
            registered_at: Some(system_time(r.get(at + 11)?)),
        },
        mailboxes: serde_json::from_str(&mailboxes).map_err(|e| bad(5, e.to_string()))?,
        created_at: r.get(at + 7)?,
        last_success_at: r.get(at + 8)?,
        last_error: r.get(at + 9)?,
        last_error_at: r.get(at + 10)?,
        pending,
    })
}
