//! The PostgreSQL store: any number of receivers on one database, no leader.
//!
//! Every change is one transaction on a pooled connection (tokio-postgres and
//! deadpool-postgres); it resolves after PostgreSQL's commit, which with
//! `synchronous_commit` on (the default) means the commit record is flushed: the
//! server's own group commit plays the part of the SQLite store's writer thread.
//!
//! Sharing the work:
//! * **Claims.** A receiver claims due pending items with `FOR UPDATE SKIP LOCKED`
//!   (receivers claiming at once take different rows, never wait for each other) and
//!   marks them in flight with its node id. Ingest writes the items it hands straight to
//!   its own dispatcher in flight with its node id too.
//! * **Leases.** Each receiver has a row in `nodes` whose `heartbeat_at` it renews every
//!   third of `[store] lease_seconds`. In-flight items of a node whose lease ran out (it
//!   died, or lost the database for that long) are made pending again by whichever
//!   receiver notices first, and so sent by another one. A receiver that stops cleanly
//!   gives its items back at once ([`Store::close`]).
//! * **Per-device order and coalescing.** Every transaction that changes a device's
//!   outbox items (ingest, completion, recovery, removal) first locks the device rows it
//!   touches, in id order (so no two wait for each other in a cycle); the partial unique
//!   index keeps one pending item per device across receivers.
//! * **Per-user locks** (the registry's METADATA changes) are session advisory locks,
//!   held on a pooled connection for as long as the guard lives.
//! * **De-duplication** is the unique event id: a second receiver's insert waits for the
//!   first one's transaction and then does nothing.
//!
//! * `schema` — tables and migrations. `tls` — rustls for `sslmode`.
//! * `commands` — the transactions that change things. `queries` — what is read.

/// Runs `$body` (an async block yielding `Result<_, Fail>`) again while PostgreSQL aborts
/// it as a deadlock victim or for a serialization failure, at most [`RETRIES`] times.
macro_rules! retrying {
    ($what:expr, $body:expr) => {{
        let mut tries = 0;
        loop {
            match $body.await {
                Err(e) if e.retryable() && tries < $crate::store::postgres::RETRIES => tries += 1,
                Err(e) => break Err(e.into_store($what)),
                Ok(v) => break Ok(v),
            }
        }
    }};
}

mod commands;
mod queries;
mod schema;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use tokio_postgres::error::SqlState;

use crate::config::{PostgresConfig, SslMode};
use crate::domain::device::{DeviceRegistration, RegisteredDevice};
use crate::domain::event::NewMailEvent;
use crate::domain::now_millis;
use crate::domain::store::{
    CompleteOutcome, Completed, HeldLock, IdleRemoval, Ingested, OutboxItem, QueueEntry,
    RegisterOutcome, RemoveOutcome, Store, StoreError, UserStatus,
};
use crate::store::Migrated;

/// How long a request waits for a pooled connection, and a new connection for the server.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// How often a transaction that PostgreSQL aborted for a deadlock or a serialization
/// failure is tried again.
const RETRIES: u32 = 3;

/// The PostgreSQL-backed [`Store`].
pub struct PgStore {
    pool: Pool,
    /// This process's node id (its claims and lease).
    node: Arc<str>,
    lease: Duration,
    url: String,
    /// The task renewing the lease (stopped by `close` or drop).
    background: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A fresh node id: random, so a restarted process is a new node (its predecessor's
/// items are taken over after the lease).
pub fn new_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{host}:{}:{:016x}", std::process::id(), fastrand::u64(..))
}

/// The connection pool for `config` (no connection is made yet).
fn pool(config: &PostgresConfig, size: usize) -> Result<Pool, StoreError> {
    let open = |message: String| StoreError::Open {
        path: config.url.clone(),
        message,
    };
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e| open(format!("{e}")))?;
    if let Some(password) = &config.password {
        pg.password(password.expose());
    }
    if pg.get_application_name().is_none() {
        pg.application_name("dovepush-receiver");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(POOL_WAIT);
    }
    pg.ssl_mode(match config.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    let tls = tls::MakeRustls::new(config.sslmode, config.ca_file.as_deref())
        .map_err(|e| open(format!("TLS: {e}")))?;
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .recycle_timeout(Some(POOL_WAIT))
        .build()
        .map_err(|e| open(e.to_string()))
}

impl PgStore {
    /// Connects, migrates the schema, registers this process as a node (gives back what a
    /// previous process with the same `node` id had in flight) and starts renewing its
    /// lease. What `serve` uses, with [`new_node_id`].
    pub async fn open(config: &PostgresConfig, node: String) -> Result<PgStore, StoreError> {
        let mut store = Self::connect(config, node, true).await?;
        {
            let mut client = store.client().await?;
            schema::migrate(&mut client).await?;
        }
        let now = now_millis();
        commands::heartbeat(&store.client().await?, &store.node, now).await?;
        let back = commands::recover(&store.pool, Some(&store.node), 0).await?;
        if back > 0 {
            tracing::info!(
                items = back,
                "Items this node had in flight are pending again."
            );
        }
        let renewing = tokio::spawn(commands::keep_lease(
            store.pool.clone(),
            store.node.clone(),
            store.lease,
        ));
        *store
            .background
            .get_mut()
            .unwrap_or_else(|p| p.into_inner()) = Some(renewing);
        Ok(store)
    }

    /// Connects to an existing, migrated database for operator commands: no node, no
    /// lease, nothing recovered.
    pub async fn open_existing(config: &PostgresConfig) -> Result<PgStore, StoreError> {
        let store = Self::connect(config, String::new(), false).await?;
        let client = store.client().await?;
        let version = schema::version(&**client)
            .await
            .map_err(|e| store_error(e, "cannot read the schema version"))?;
        if version != schema::VERSION {
            return Err(StoreError::Schema(crate::store::wrong_version(
                version,
                schema::VERSION,
            )));
        }
        Ok(store)
    }

    /// Creates or upgrades the schema (`dovepush-receiver migrate`).
    pub async fn migrate(config: &PostgresConfig) -> Result<Migrated, StoreError> {
        let store = Self::connect(config, String::new(), false).await?;
        let mut client = store.client().await?;
        schema::migrate(&mut client).await
    }

    async fn connect(
        config: &PostgresConfig,
        node: String,
        serving: bool,
    ) -> Result<PgStore, StoreError> {
        let size = if serving { config.pool_size } else { 2 };
        let store = PgStore {
            pool: pool(config, size)?,
            node: node.into(),
            lease: config.lease,
            url: config.url.clone(),
            background: std::sync::Mutex::new(None),
        };
        // Fail now, naming the database, rather than at the first request.
        let _client = store.client().await.map_err(|e| StoreError::Open {
            path: config.url.clone(),
            message: e.to_string(),
        })?;
        Ok(store)
    }

    /// This process's node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        get(&self.pool).await
    }

    /// Makes pending again the in-flight items of nodes whose lease ended before `now`
    /// (the background task does this every third of the lease with the real clock).
    pub async fn recover_orphans(&self, now: i64) -> Result<u64, StoreError> {
        let cutoff = now - self.lease.as_millis() as i64;
        commands::recover(&self.pool, None, cutoff).await
    }

    /// Renews this node's lease as of `now`.
    pub async fn heartbeat(&self, now: i64) -> Result<(), StoreError> {
        commands::heartbeat(&self.client().await?, &self.node, now).await
    }
}

impl PgStore {
    /// Stops renewing the lease.
    fn stop_renewing(&self) {
        let task = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

/// A pooled connection.
async fn get(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => store_error(e, "cannot connect"),
        e => StoreError::Unavailable(e.to_string()),
    })
}

/// The server's message for `e` (with its detail), or the client's.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        },
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// Whether `e` means the database cannot be reached now (rather than refused the work).
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQL state: an I/O or protocol failure on the connection.
        None => e.as_db_error().is_none(),
        Some(code) => {
            let code = code.code();
            code.starts_with("08") // connection exceptions
                || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || code == SqlState::TOO_MANY_CONNECTIONS.code()
        }
    }
}

/// `e` as a store error: unavailable or a database error, with `what` before it.
pub(super) fn store_error(e: tokio_postgres::Error, what: &str) -> StoreError {
    if is_unavailable(&e) {
        StoreError::Unavailable(format!("{what}: {}", describe(&e)))
    } else {
        StoreError::Database(format!("{what}: {}", describe(&e)))
    }
}

/// A failed transaction: PostgreSQL's error (maybe worth another try) or ours.
#[derive(Debug)]
pub(super) enum Fail {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl Fail {
    /// A deadlock or serialization failure: the transaction may be run again.
    fn retryable(&self) -> bool {
        matches!(self, Fail::Pg(e) if e.code().is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
        }))
    }

    pub(super) fn into_store(self, what: &str) -> StoreError {
        match self {
            Fail::Pg(e) => store_error(e, what),
            Fail::Store(e) => e,
        }
    }
}

impl Store for PgStore {
    fn ingest(
        &self,
        event: NewMailEvent,
        due_at: i64,
        in_flight_limit: usize,
    ) -> BoxFuture<'static, Ingested> {
        let pool = self.pool.clone();
        let node = self.node.clone();
        Box::pin(async move {
            let mut tries = 0;
            loop {
                let attempt = commands::ingest(&pool, &node, &event, due_at, in_flight_limit).await;
                match attempt {
                    Err((e, _)) if e.retryable() && tries < RETRIES => tries += 1,
                    Err((e, in_flight)) => {
                        break Ingested {
                            in_flight,
                            result: Err(e.into_store("ingest")),
                        }
                    }
                    Ok((outcome, in_flight)) => {
                        break Ingested {
                            in_flight,
                            result: Ok(outcome),
                        }
                    }
                }
            }
        })
    }

    fn register_device(
        &self,
        registration: DeviceRegistration,
        now: i64,
    ) -> BoxFuture<'_, Result<RegisterOutcome, StoreError>> {
        Box::pin(async move {
            retrying!(
                "register",
                commands::register(&self.pool, &registration, now)
            )
        })
    }

    fn remove_device(
        &self,
        user: String,
        token: String,
    ) -> BoxFuture<'_, Result<RemoveOutcome, StoreError>> {
        Box::pin(async move { retrying!("remove", commands::remove(&self.pool, &user, &token)) })
    }

    fn devices_of(&self, user: String) -> BoxFuture<'_, Result<Vec<RegisteredDevice>, StoreError>> {
        Box::pin(async move {
            queries::devices(&self.client().await?, Some(&user))
                .await
                .map_err(|e| e.into_store("read devices"))
        })
    }

    fn remove_idle_devices(
        &self,
        seen_before: i64,
        limit: usize,
        reason: String,
        now: i64,
    ) -> BoxFuture<'_, Result<IdleRemoval, StoreError>> {
        Box::pin(async move {
            retrying!(
                "remove idle devices",
                commands::remove_idle(&self.pool, seen_before, limit, &reason, now)
            )
        })
    }

    fn claim_due(
        &self,
        now: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxItem>, StoreError>> {
        Box::pin(
            async move { retrying!("claim", commands::claim(&self.pool, &self.node, now, limit)) },
        )
    }

    fn complete(&self, done: Vec<Completed>) -> BoxFuture<'_, Result<CompleteOutcome, StoreError>> {
        Box::pin(async move {
            retrying!(
                "complete",
                commands::complete(&self.pool, &self.node, &done)
            )
        })
    }

    fn next_due_at(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        Box::pin(async move {
            queries::next_due_at(&self.client().await?)
                .await
                .map_err(|e| store_error(e, "read the outbox"))
        })
    }

    fn subscriptions(
        &self,
        user: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<UserStatus>, StoreError>> {
        Box::pin(async move {
            queries::subscriptions(&self.client().await?, user.as_deref())
                .await
                .map_err(|e| e.into_store("read subscriptions"))
        })
    }

    fn queue_list(&self, limit: usize) -> BoxFuture<'_, Result<Vec<QueueEntry>, StoreError>> {
        Box::pin(async move {
            queries::queue_list(&self.client().await?, limit)
                .await
                .map_err(|e| store_error(e, "read the outbox"))
        })
    }

    fn queue_retry(&self, id: i64, now: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let n = self
                .client()
                .await?
                .execute(
                    "UPDATE outbox SET due_at = $2 WHERE id = $1 AND state = 0",
                    &[&id, &now],
                )
                .await
                .map_err(|e| store_error(e, "queue retry"))?;
            Ok(n > 0)
        })
    }

    fn queue_drop(&self, id: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let n = self
                .client()
                .await?
                .execute("DELETE FROM outbox WHERE id = $1", &[&id])
                .await
                .map_err(|e| store_error(e, "queue drop"))?;
            Ok(n > 0)
        })
    }

    fn prune_events(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            // Events are appended in (nearly) arrival order: find the first id to keep by
            // scanning from the start, as the SQLite store does (no index on the time).
            self.client()
                .await?
                .execute(
                    "DELETE FROM events WHERE id < coalesce(
                         (SELECT id FROM events WHERE received_at >= $1 ORDER BY id LIMIT 1),
                         (SELECT max(id) + 1 FROM events), 0)",
                    &[&before],
                )
                .await
                .map_err(|e| store_error(e, "prune events"))
        })
    }

    fn outbox_depth(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let n: i64 = self
                .client()
                .await?
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .map_err(|e| store_error(e, "count the outbox"))?
                .get(0);
            Ok(n as u64)
        })
    }

    fn lock_user(&self, user: String) -> BoxFuture<'_, Result<Option<HeldLock>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "SELECT pg_advisory_lock($1, hashtext($2))",
                    &[&schema::LOCK_USER, &user],
                )
                .await
                .map_err(|e| store_error(e, "lock the user"))?;
            Ok(Some(HeldLock::new(commands::AdvisoryLock::new(
                client, user,
            ))))
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // No heartbeat may bring the lease back after it is removed.
            self.stop_renewing();
            match commands::release(&self.pool, &self.node).await {
                Ok(n) if n > 0 => {
                    tracing::info!(
                        items = n,
                        "Items in flight given back to the other receivers."
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "Cannot give back the items in flight; other receivers take them over after the lease."
                ),
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::domain::event::NewMailEvent;
    use crate::domain::store::Completion;
    use crate::store::conformance::Backend;
    use dovepush_testkit::postgres;

    /// The config of a fresh database on this test binary's private PostgreSQL.
    pub(crate) fn fresh_config() -> PostgresConfig {
        let pg = postgres::shared();
        let db = pg.fresh_database("store").expect("a fresh database");
        PostgresConfig {
            url: pg.url(&db),
            password: Some(Secret::new(postgres::PASSWORD)),
            sslmode: SslMode::Disable,
            ca_file: None,
            pool_size: 4,
            lease: Duration::from_secs(30),
        }
    }

    /// A database of its own; "reopening" connects again as the same node (a restart).
    pub(crate) struct Pg {
        config: PostgresConfig,
    }

    impl Backend for Pg {
        type S = PgStore;

        async fn new() -> Self {
            Pg {
                config: fresh_config(),
            }
        }

        async fn open(&self) -> PgStore {
            PgStore::open(&self.config, "test-node".into())
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }

        async fn event_ids(&self) -> std::collections::HashSet<String> {
            let store = PgStore::open_existing(&self.config).await.unwrap();
            let client = store.client().await.unwrap();
            client
                .query(
                    "SELECT event_id FROM events WHERE event_id IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
    }

    crate::store_conformance_tests!(Pg);

    fn event(user: &str, id: &str, uid: u32, at: i64) -> NewMailEvent {
        NewMailEvent {
            event_id: Some(id.into()),
            kind: crate::domain::event::EventKind::MessageNew,
            user: user.into(),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid,
            from: None,
            subject: None,
            snippet: None,
            unseen: Some(uid),
            time_ms: None,
            received_at: at,
        }
    }

    async fn node(config: &PostgresConfig, name: &str) -> PgStore {
        PgStore::open(config, name.into()).await.unwrap()
    }

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let config = fresh_config();
        assert_eq!(
            PgStore::migrate(&config).await.unwrap(),
            Migrated {
                from: 0,
                to: schema::VERSION
            }
        );
        // Three receivers starting at once: one migrates, the others find it done.
        let opened = futures_util::future::join_all(
            ["a", "b", "c"].map(|n| PgStore::open(&config, n.into())),
        )
        .await;
        assert!(opened.iter().all(Result::is_ok));
        assert_eq!(
            PgStore::migrate(&config).await.unwrap(),
            Migrated {
                from: schema::VERSION,
                to: schema::VERSION
            }
        );
        let store = PgStore::open_existing(&config).await.unwrap();
        store
            .client()
            .await
            .unwrap()
            .execute(
                "INSERT INTO dovepush_schema (version, name) VALUES (7, 'future')",
                &[],
            )
            .await
            .unwrap();
        let err = PgStore::open(&config, "d".into())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 7, newer"), "{err}");
        let err = PgStore::open_existing(&config)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 7, newer"), "{err}");
    }

    #[tokio::test]
    async fn operator_commands_want_a_migrated_database() {
        let config = fresh_config();
        let err = PgStore::open_existing(&config)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("dovepush-receiver migrate"), "{err}");
    }

    #[tokio::test]
    async fn nodes_claim_disjoint_items_and_see_each_others_devices() {
        let config = fresh_config();
        let (a, b) = (node(&config, "a").await, node(&config, "b").await);
        for n in 0..40 {
            a.register_device(
                DeviceRegistration::for_tests(&format!("u{n}"), &format!("t{n}")),
                1,
            )
            .await
            .unwrap();
        }
        assert_eq!(b.devices_of("u7".into()).await.unwrap().len(), 1);
        for n in 0..40 {
            let s = if n % 2 == 0 { &a } else { &b };
            let o = s
                .ingest(event(&format!("u{n}"), &format!("e{n}"), 1, 10), 10, 0)
                .await
                .result
                .unwrap();
            assert_eq!(o.queued, 1);
        }
        // The same event through the other node: a duplicate.
        let o = b
            .ingest(event("u0", "e0", 1, 10), 10, 0)
            .await
            .result
            .unwrap();
        assert!(o.duplicate);
        assert_eq!(a.outbox_depth().await.unwrap(), 40);
        assert_eq!(b.outbox_depth().await.unwrap(), 40);
        let (from_a, from_b) = tokio::join!(a.claim_due(100, 25), b.claim_due(100, 25));
        let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
        assert_eq!(from_a.len() + from_b.len(), 40);
        let mut ids: Vec<i64> = from_a.iter().chain(&from_b).map(|i| i.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 40, "no item claimed twice");
        assert!(a.claim_due(100, 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_dead_nodes_items_are_taken_over_after_its_lease() {
        let config = fresh_config();
        let lease = config.lease.as_millis() as i64;
        let (a, b) = (node(&config, "a").await, node(&config, "b").await);
        a.register_device(DeviceRegistration::for_tests("alice", "t1"), 1)
            .await
            .unwrap();
        a.register_device(DeviceRegistration::for_tests("bob", "t2"), 1)
            .await
            .unwrap();
        let now = now_millis();
        a.heartbeat(now).await.unwrap();
        b.heartbeat(now).await.unwrap();
        // a: alice's item handed over at ingest, bob's claimed.
        let alice = a.ingest(event("alice", "e1", 1, now), now, 5).await;
        assert_eq!(alice.in_flight.len(), 1);
        a.ingest(event("bob", "e2", 1, now), now, 0)
            .await
            .result
            .unwrap();
        assert_eq!(a.claim_due(now, 10).await.unwrap().len(), 1);
        // alice gets a second event while hers is in flight: pending.
        b.ingest(event("alice", "e3", 2, now), now, 5)
            .await
            .result
            .unwrap();
        drop(a); // killed: no close, no more heartbeats
                 // Within the lease nothing moves (b's clock is injected).
        assert_eq!(b.recover_orphans(now + lease - 1).await.unwrap(), 0);
        assert!(b.claim_due(now, 10).await.unwrap().len() == 1, "only e3");
        b.heartbeat(now + lease + 1).await.unwrap();
        assert_eq!(b.recover_orphans(now + lease + 1).await.unwrap(), 2);
        let items = b.claim_due(now + lease + 1, 10).await.unwrap();
        let mut got: Vec<_> = items
            .iter()
            .map(|i| i.content.event_id.clone().unwrap())
            .collect();
        got.sort();
        // e1 could not fold into e3 (that one was in flight on b already).
        assert_eq!(got, vec!["e1", "e2"]);
    }

    #[tokio::test]
    async fn a_node_that_stops_gives_its_items_back_at_once() {
        let config = fresh_config();
        let (a, b) = (node(&config, "a").await, node(&config, "b").await);
        a.register_device(DeviceRegistration::for_tests("alice", "t1"), 1)
            .await
            .unwrap();
        let now = now_millis();
        a.ingest(event("alice", "e1", 1, now), now, 0)
            .await
            .result
            .unwrap();
        let items = a.claim_due(now, 10).await.unwrap();
        assert_eq!(items.len(), 1);
        a.close().await;
        let nodes: Vec<String> = b
            .client()
            .await
            .unwrap()
            .query("SELECT id FROM nodes ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(nodes, vec!["b"], "a's lease is gone and stays gone");
        let taken = b.claim_due(now, 10).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, items[0].id);
        // a's late outcome cannot requeue what b now holds.
        a.complete(vec![Completed {
            item_id: items[0].id,
            device_id: items[0].device.id,
            user: "alice".into(),
            at: now,
            completion: Completion::Retry {
                due_at: now,
                reason: "late".into(),
            },
        }])
        .await
        .unwrap();
        assert!(b.claim_due(now + 1000, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_users_lock_excludes_other_nodes_until_dropped() {
        let config = fresh_config();
        let (a, b) = (node(&config, "a").await, node(&config, "b").await);
        let held = a.lock_user("alice".into()).await.unwrap();
        assert!(held.is_some());
        let other = b.lock_user("bob".into()).await.unwrap();
        drop(other);
        let waiting = b.lock_user("alice".into());
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiting)
                .await
                .is_err(),
            "b waits while a holds alice's lock"
        );
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("released");
        assert!(got.unwrap().is_some());
    }

    #[tokio::test]
    async fn tls_modes_connect_as_libpq_means_them() {
        use std::os::unix::fs::PermissionsExt;
        let pki = dovepush_mocks::TestPki::new();
        let files = tempfile::tempdir().unwrap();
        let server = pki.server_cert();
        let (cert, key, ca) = (
            files.path().join("server.pem"),
            files.path().join("server.key"),
            files.path().join("ca.pem"),
        );
        std::fs::write(&cert, &server.cert_pem).unwrap();
        std::fs::write(&key, &server.key_pem).unwrap();
        pki.write_ca(&ca).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if is_root() {
            let (uid, gid) = dovepush_testkit::dovecot::system_user("postgres").unwrap();
            for f in [&cert, &key] {
                std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
            }
        }
        let options = postgres::Options {
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), cert.display().to_string()),
                ("ssl_key_file".into(), key.display().to_string()),
            ],
            ..Default::default()
        };
        let pg = tokio::task::spawn_blocking(move || postgres::Postgres::start_with(options))
            .await
            .unwrap()
            .unwrap();
        pg.create_database("tls").unwrap();
        let config =
            |host: &str, sslmode: SslMode, ca_file: Option<&std::path::Path>| PostgresConfig {
                url: pg.url("tls").replace("127.0.0.1", host),
                password: Some(Secret::new(postgres::PASSWORD)),
                sslmode,
                ca_file: ca_file.map(std::path::Path::to_path_buf),
                pool_size: 1,
                lease: Duration::from_secs(30),
            };
        let encrypted = |c: PostgresConfig| async move {
            let store = PgStore::connect(&c, String::new(), false).await?;
            let client = store.client().await?;
            let ssl: bool = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| store_error(e, "query"))?
                .get(0);
            Ok::<bool, StoreError>(ssl)
        };
        let ca = Some(ca.as_path());
        assert!(!encrypted(config("127.0.0.1", SslMode::Disable, None))
            .await
            .unwrap());
        assert!(encrypted(config("127.0.0.1", SslMode::Prefer, None))
            .await
            .unwrap());
        assert!(encrypted(config("127.0.0.1", SslMode::Require, None))
            .await
            .unwrap());
        assert!(encrypted(config("127.0.0.1", SslMode::VerifyFull, ca))
            .await
            .unwrap());
        assert!(encrypted(config("localhost", SslMode::VerifyFull, ca))
            .await
            .unwrap());
        assert!(encrypted(config("127.0.0.1", SslMode::VerifyCa, ca))
            .await
            .unwrap());
        // Not our CA: refused, and said so.
        let err = encrypted(config("127.0.0.1", SslMode::VerifyFull, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate"), "{err}");
        let err = encrypted(config("127.0.0.1", SslMode::VerifyCa, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate"), "{err}");
    }

    /// Whether the tests run as root.
    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn a_stopped_database_is_unavailable_and_found_again() {
        let mut pg = postgres::Postgres::start().unwrap();
        pg.create_database("d").unwrap();
        let config = PostgresConfig {
            url: pg.url("d"),
            password: Some(Secret::new(postgres::PASSWORD)),
            sslmode: SslMode::Prefer,
            ca_file: None,
            pool_size: 2,
            lease: Duration::from_secs(30),
        };
        let s = node(&config, "a").await;
        s.register_device(DeviceRegistration::for_tests("alice", "t1"), 1)
            .await
            .unwrap();
        pg.stop();
        let failed = s.ingest(event("alice", "e1", 1, 10), 10, 0).await;
        assert!(
            matches!(failed.result, Err(StoreError::Unavailable(_))),
            "{:?}",
            failed.result
        );
        assert!(failed.in_flight.is_empty());
        pg.restart().unwrap();
        let o = s
            .ingest(event("alice", "e1", 1, 10), 10, 0)
            .await
            .result
            .unwrap();
        assert_eq!(o.queued, 1, "the failed attempt committed nothing");
        // Wrong password: named as such.
        let bad = PostgresConfig {
            password: Some(Secret::new("wrong")),
            ..config
        };
        let err = PgStore::open(&bad, "b".into())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("password authentication failed"), "{err}");
        assert!(!err.contains("wrong"), "{err}");
    }
}
