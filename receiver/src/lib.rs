//! dovepush-receiver: accepts Dovecot's ox-style push notifications, keeps a registry of
//! users' devices, and delivers pushes through a durable outbox.
//!
//! # Layering
//!
//! ```text
//!   main.rs ─ cli ─────────────────────────────┐  (thin binary: parse args, load config)
//!                                               ▼
//!   run / run_with ──► http  (hyper: routing, auth, body limits, JSON errors)
//!                       │
//!                       ▼
//!                     domain (events, devices, registry, ingest, outbox; owns the
//!                       ▲      Store port: domain::store)
//!                       │            │                 │
//!                     store          ▼                 ▼
//!                  (SQLite,      transport          mailserver
//!                   implements   (app/kind →        (trait + IMAP via async-imap:
//!                   the port)    dovepush-push       logins, METADATA)
//!                                Transport)
//!
//!   directory ─► doveadm (HTTP API) | mailserver (master user): the resync port
//!                (domain::resync::SubscriptionDirectory)
//! ```
//!
//! `config` turns the TOML file into typed values; `telemetry` owns the metrics registry
//! and tracing set-up. Dependencies point one way: the domain defines the persistence port
//! and `store` implements it, the transports and the outcome they return are
//! dovepush-push's, and nothing below `http` knows HTTP. `tests/layering.rs` fails on an
//! import cycle between modules.
//!
//! The library entry point is [`run`] (or [`run_with`] to inject the mail server). Both
//! take an already bound listener, so tests bind port 0, the transports (the real ones:
//! [`transport::push::transports_from_config`]) and a shutdown future.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod directory;
pub mod domain;
pub mod doveadm;
pub mod http;
pub mod mailserver;
pub mod store;
pub mod telemetry;
pub mod transport;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;

use config::{Config, TlsFiles};
use domain::credential_watch::{self, CredentialWatch};
use domain::credentials::CredentialCache;
use domain::ingest::Ingest;
use domain::lifetime::IdleSweep;
use domain::outbox::{Dispatcher, HandOver, RetryPolicy, SEND_TIMEOUT};
use domain::registry::Registry;
use domain::resync::SubscriptionDirectory;
use domain::store::{Store, StoreError};
use mailserver::{ImapMailServer, MailError, MailServer};
use telemetry::Metrics;
use transport::Transports;

/// How often old event ids are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `key` is the config key of the file (or pair) that could not be used.
    #[error("server TLS: {message}")]
    Tls { key: &'static str, message: String },
    #[error("mail server client: {0}")]
    MailServer(#[from] MailError),
}

/// Runs the receiver on `listener` until `shutdown` resolves, with the IMAP mail server
/// from `config.dovecot` and the given `transports`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    transports: Transports,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let mail: Arc<dyn MailServer> = Arc::new(ImapMailServer::new(&config.dovecot)?);
    run_with(listener, config, transports, mail, shutdown).await
}

/// [`run`] with an injected [`MailServer`].
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    transports: Transports,
    mail: Arc<dyn MailServer>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let directory = directory::from_config(&config.dovecot)?;
    run_with_directory(listener, config, transports, mail, directory, shutdown).await
}

/// [`run_with`] with an injected [`SubscriptionDirectory`] (for `/v1/status/drift`)
/// instead of the one `[dovecot]` configures.
pub async fn run_with_directory(
    listener: TcpListener,
    config: Config,
    transports: Transports,
    mail: Arc<dyn MailServer>,
    directory: Option<Arc<dyn SubscriptionDirectory>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let tls = config.server.tls.as_ref().map(server_tls).transpose()?;
    let store: Arc<dyn Store> = store::open(&config.store).await?;
    let metrics = Arc::new(Metrics::with_push_outcomes(transports.push_outcomes()));
    let wake = Arc::new(Notify::new());
    let (hand_over, handed) = HandOver::new(Arc::new(Semaphore::new(config.outbox.concurrency)));
    if transports.is_empty() {
        tracing::warn!("No push transports configured: pushes stay queued until their deadline.");
    }

    let apps: HashMap<_, _> = config
        .apps
        .iter()
        .map(|a| (a.id.clone(), Some(a.privacy)))
        .collect();
    let app_transports: HashMap<_, _> = config
        .apps
        .iter()
        .filter(|a| a.has_transport())
        .map(|a| (a.id.clone(), a.kinds()))
        .collect();
    let registry = Registry::new(
        store.clone(),
        mail.clone(),
        CredentialCache::new(config.dovecot.auth_cache),
        apps,
    )
    .with_app_transports(app_transports)
    .with_max_concurrent_logins(config.devices.max_concurrent_logins)
    .with_webpush_guard(
        config.webpush.policy(),
        Arc::new(dovepush_push::webpush::SystemResolver),
    );
    let vapid_keys = transports.vapid_keys().clone();
    let user_locks = registry.user_locks();
    let credentials = Arc::new(CredentialWatch::from_config(&config, metrics.clone()));
    credentials.refresh(SystemTime::now());
    let state = Arc::new(http::AppState {
        notify_user: config.notify.username.clone(),
        notify_password: config.notify.password.clone(),
        admin_token: config.admin.token.clone(),
        ingest: Ingest::new(
            store.clone(),
            metrics.clone(),
            config.outbox.coalesce,
            config.outbox.badge_wait,
            wake.clone(),
            hand_over.clone(),
        ),
        registry,
        store: store.clone(),
        metrics: metrics.clone(),
        server: config.server.clone(),
        throttle: domain::throttle::LoginThrottle::new(domain::throttle::ThrottleSettings {
            max_failures: config.devices.max_failed_logins,
            failure_delay: config.devices.failure_delay,
            lock: config.devices.lock,
        }),
        oauth_user_claim: config.dovecot.oauth_user_claim.clone(),
        credentials: credentials.clone(),
        directory,
        vapid_keys,
    });
    let idle_sweep = config.devices.max_idle.map(|max_idle| IdleSweep {
        store: store.clone(),
        user_locks: user_locks.clone(),
        mail: mail.clone(),
        metrics: metrics.clone(),
        max_idle,
    });
    let dispatcher = Dispatcher {
        user_locks,
        store: store.clone(),
        transports,
        policy: RetryPolicy::from_config(&config.outbox),
        metrics,
        mail,
        wake,
        hand_over,
        concurrency: config.outbox.concurrency,
        send_timeout: SEND_TIMEOUT,
        credentials: credentials.clone(),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let dispatcher = tokio::spawn(dispatcher.run(handed, stop_rx.clone()));
    let pruner = tokio::spawn(prune_events(
        store.clone(),
        config.store.event_retention,
        stop_rx.clone(),
    ));
    let watcher = tokio::spawn(refresh_credentials(credentials, stop_rx.clone()));
    let sweeper = idle_sweep.map(|sweep| tokio::spawn(sweep.run(stop_rx.clone())));
    let addr = listener.local_addr().ok();
    tracing::info!(address = ?addr, tls = tls.is_some(), store = %config.store.describe(), "Receiver running.");
    let server = tokio::spawn(http::serve(listener, tls, state, stop_rx));

    shutdown.await;
    tracing::info!("Shutting down.");
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = dispatcher.await;
    let _ = pruner.await;
    let _ = watcher.await;
    if let Some(sweeper) = sweeper {
        let _ = sweeper.await;
    }
    // What the dispatcher left in flight goes back to the other receivers now.
    store.close().await;
    Ok(())
}

/// Re-reads the watched certificates daily (the first read happened at start).
async fn refresh_credentials(credentials: Arc<CredentialWatch>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(credential_watch::REFRESH_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        credentials.refresh(SystemTime::now());
    }
}

async fn prune_events(store: Arc<dyn Store>, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let before = domain::now_millis() - retention.as_millis() as i64;
        match store.prune_events(before).await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "Old event ids pruned."),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Cannot prune event ids."),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The server TLS acceptor (TLS 1.2 and 1.3, ring provider, ALPN h2 + http/1.1).
pub fn server_tls(files: &TlsFiles) -> Result<TlsAcceptor, RunError> {
    let tls = |key: &'static str, message: String| RunError::Tls { key, message };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls("server.tls_cert", format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(tls(
            "server.tls_cert",
            format!("{}: no certificate found", files.cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| tls("server.tls_key", format!("{}: {e}", files.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| tls("server.tls_cert", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls("server.tls_key", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
