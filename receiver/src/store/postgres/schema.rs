//! The tables of the PostgreSQL store and their versioned migrations.
//!
//! The applied versions are rows of `dovepush_schema`. Every receiver migrates at start
//! (`serve`), and `dovepush-receiver migrate` does it alone; both run all pending
//! migrations in one transaction under an advisory lock, so receivers starting together
//! migrate once. A migration is appended, never edited.
//!
//! Differences from the SQLite schema: the user column is `login` (`user` is reserved in
//! SQL); outbox items name the receiver that claimed them (`claimed_by`), and `nodes` holds
//! each receiver's lease (see [`super`]).

use tokio_postgres::{Client, GenericClient};

use crate::domain::store::StoreError;
use crate::store::{Migrated, Migration};

/// Advisory lock keys (first half) of this program: migrations, and users' locks.
pub(super) const LOCK_MIGRATE: i32 = 0x6470_7573; // "dpus"
pub(super) const LOCK_USER: i32 = 0x6470_7575; // "dpuu"

/// Every migration, in order: version `i + 1` is `MIGRATIONS[i]`.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "devices, users, events, outbox, nodes",
        sql: V1,
    },
    Migration {
        name: "devices by last registration, for the idle sweep",
        sql: "CREATE INDEX devices_updated_at ON devices (updated_at);",
    },
    Migration {
        name: "badge event times",
        sql: V3,
    },
];

/// Badge events (`messageRead`, `messageExpunge`, `messageAppend`) keep when Dovecot
/// committed them, so that a later-arriving older one is known as stale.
const V3: &str = "
ALTER TABLE events ADD COLUMN time_ms BIGINT;
CREATE INDEX events_badge_time ON events (login, folder, time_ms) WHERE time_ms IS NOT NULL;
";

/// The schema version this program works with.
pub(super) const VERSION: u32 = MIGRATIONS.len() as u32;

const V1: &str = r#"
CREATE TABLE devices (
    id BIGSERIAL PRIMARY KEY,
    login TEXT NOT NULL,
    app TEXT NOT NULL,
    transport TEXT NOT NULL,
    token TEXT NOT NULL,
    mailboxes TEXT NOT NULL,
    privacy TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_success_at BIGINT,
    last_error TEXT,
    last_error_at BIGINT,
    UNIQUE (login, app, token)
);
CREATE TABLE users (
    login TEXT PRIMARY KEY,
    last_error TEXT,
    last_error_at BIGINT
);
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    event_id TEXT UNIQUE,
    login TEXT NOT NULL,
    folder TEXT NOT NULL,
    uid BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
-- state 0: pending, 1: in flight (claimed by the receiver `claimed_by`).
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    device_id BIGINT NOT NULL,
    state SMALLINT NOT NULL,
    content TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    last_error TEXT,
    claimed_by TEXT
);
CREATE UNIQUE INDEX outbox_one_pending_per_device ON outbox (device_id) WHERE state = 0;
CREATE INDEX outbox_device ON outbox (device_id);
CREATE INDEX outbox_due ON outbox (due_at, id) WHERE state = 0;
CREATE INDEX outbox_in_flight ON outbox (claimed_by) WHERE state = 1;
-- One row per running receiver: its lease, renewed while it runs.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
"#;

/// The version of the schema in the database (0: none yet).
pub(super) async fn version(client: &impl GenericClient) -> Result<u32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('dovepush_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM dovepush_schema", &[])
        .await?
        .get(0);
    Ok(v.unwrap_or(0) as u32)
}

/// Brings the schema to [`VERSION`] in one transaction; refuses a newer one.
pub(super) async fn migrate(client: &mut Client) -> Result<Migrated, StoreError> {
    let fail = |e: tokio_postgres::Error| super::store_error(e, "migration failed");
    let tx = client.transaction().await.map_err(fail)?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_MIGRATE])
        .await
        .map_err(fail)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS dovepush_schema (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(fail)?;
    let from = version(&tx).await.map_err(fail)?;
    crate::store::check_version(from, VERSION)?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(m.sql).await.map_err(|e| {
            StoreError::Schema(format!(
                "migration {version} ({}) failed: {}",
                m.name,
                super::describe(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO dovepush_schema (version, name) VALUES ($1, $2)",
            &[&version, &m.name],
        )
        .await
        .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)?;
    Ok(Migrated { from, to: VERSION })
}
