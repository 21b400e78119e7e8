//! Persistence adapters: implementations of the domain's [`crate::domain::store::Store`]
//! port, chosen by `[store]`: the embedded SQLite store ([`sqlite::SqliteStore`], `path`,
//! the default) for one receiver, and the PostgreSQL store ([`postgres::PgStore`], `url`)
//! for any number of receivers on one database. Both keep a versioned schema, upgraded by
//! their migrations at `serve` and by `dovepush-receiver migrate`; `store copy` ([`copy`])
//! moves a SQLite store's devices and outbox into PostgreSQL.

#[cfg(test)]
pub(crate) mod conformance;
pub mod copy;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use crate::config::{StoreBackend, StoreConfig};
use crate::domain::store::{Store, StoreError};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// One schema migration of a backend (its version is its place in the backend's list).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

/// What a migration run did: the schema's version before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: u32,
    pub to: u32,
}

/// The time a badge event is ordered by (its `event-time-ms`); `None` for new mail and
/// for events without one.
pub(crate) fn badge_time(event: &crate::domain::event::NewMailEvent) -> Option<i64> {
    event
        .time_ms
        .filter(|_| event.kind.is_badge_update())
        .and_then(|t| i64::try_from(t).ok())
}

/// Refuses a schema newer than this program knows (a newer receiver migrated it).
pub(crate) fn check_version(found: u32, known: u32) -> Result<(), StoreError> {
    if found > known {
        return Err(StoreError::Schema(format!(
            "the store's schema is version {found}, newer than this receiver's {known}: \
             run the newer dovepush-receiver"
        )));
    }
    Ok(())
}

/// The message for a schema of another version than this program's.
pub(crate) fn wrong_version(found: u32, known: u32) -> String {
    if found > known {
        format!(
            "the store's schema is version {found}, newer than this receiver's {known}: \
             run the newer dovepush-receiver"
        )
    } else {
        format!(
            "the store's schema is version {found}, this receiver needs {known}: run \
             `dovepush-receiver migrate`"
        )
    }
}

/// Opens the store `serve` runs with: migrated, in-flight items of a previous run
/// recovered (SQLite) or this node registered with its lease (PostgreSQL).
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &config.backend {
        StoreBackend::Sqlite(path) => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path))
                .await
                .map_err(|e| StoreError::Database(e.to_string()))??;
            Arc::new(store)
        }
        StoreBackend::Postgres(pg) => {
            Arc::new(postgres::PgStore::open(pg, postgres::new_node_id()).await?)
        }
    })
}

/// Opens an existing store for operator commands (the server may be running): nothing is
/// created, migrated or recovered.
pub async fn open_existing(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &config.backend {
        StoreBackend::Sqlite(path) => Arc::new(sqlite::SqliteStore::open_existing(path)?),
        StoreBackend::Postgres(pg) => Arc::new(postgres::PgStore::open_existing(pg).await?),
    })
}

/// Creates the store's schema or brings it to this program's version.
pub async fn migrate(config: &StoreConfig) -> Result<Migrated, StoreError> {
    match &config.backend {
        StoreBackend::Sqlite(path) => sqlite::SqliteStore::migrate(path),
        StoreBackend::Postgres(pg) => postgres::PgStore::migrate(pg).await,
    }
}
