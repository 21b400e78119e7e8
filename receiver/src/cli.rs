//! The command line: `serve`, `check-config`, `migrate`, `subscriptions list`, `resync`,
//! `queue list|retry|drop`, `store copy`.
//!
//! Exit codes: 0 success, 64 (EX_USAGE) for a bad config (every bad key named with its
//! file), 2 for bad arguments (clap), 1 for anything else. Operator commands open the store
//! file directly (safe while the server runs: SQLite WAL, a busy timeout, and no recovery
//! of the server's in-flight items).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::domain::device::shorten_token;
use crate::domain::store::{Store, UserStatus};
use crate::domain::{format_millis, now_millis};
use crate::transport::push::transports_from_config;
use crate::transport::Transports;
use std::sync::Arc;

/// Exit code for configuration errors (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "dovepush-receiver",
    version,
    about = "Dovecot push notification receiver"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the receiver.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the config file and exit.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Create the store's schema, or upgrade it to this version's, and exit (`serve` does
    /// the same at start).
    Migrate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Registered devices per user.
    Subscriptions {
        #[command(subcommand)]
        action: SubscriptionsCommand,
    },
    /// Compare the registry with Dovecot's subscription METADATA and fix the users on
    /// which they disagree (through the doveadm HTTP API, or the IMAP master user).
    Resync {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this user.
        #[arg(long, value_name = "U")]
        user: Option<String>,
        /// Only list what would change.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The durable outbox.
    Queue {
        #[command(subcommand)]
        action: QueueCommand,
    },
    /// Moving a store.
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a SQLite store's devices and outbox into an empty PostgreSQL database (stop
    /// the receiver first).
    Copy {
        /// The SQLite file (`[store] path` of the single-box receiver).
        #[arg(long, value_name = "SQLITE_FILE")]
        from: PathBuf,
        /// postgresql://user@host[:port]/database (as `[store] url`).
        #[arg(long, value_name = "URL")]
        to: String,
        /// File holding the database user's password.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// disable, prefer, require, verify-ca or verify-full (as `[store] sslmode`).
        #[arg(long, default_value = "prefer")]
        sslmode: String,
        /// PEM CAs for verify-ca and verify-full.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// List users with their devices (as `GET /v1/status/subscriptions`).
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this user.
        #[arg(long, value_name = "U")]
        user: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List outbox items, oldest due first.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Make a pending item due now.
    Retry {
        id: i64,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Delete an item.
    Drop {
        id: i64,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// The binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(execute(cli.command))
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("Invalid configuration:\n{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The push transports of `config` (key files are read again; a failure is a config error).
fn transports(config: &Config) -> Result<Transports, ExitCode> {
    transports_from_config(config).map_err(|e| {
        eprintln!("Invalid configuration:\n{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The files the config names and only `serve` reads (the server's certificate and key,
/// the CA for the IMAP connection): read now, so that a bad one is a config error named
/// with its key and file (exit 64), in `check-config` and before `serve` says it listens.
fn check_files(config: &Config) -> Result<(), ExitCode> {
    let mut problems = Vec::new();
    if let Some(files) = &config.server.tls {
        if let Err(e) = crate::server_tls(files) {
            let key = match &e {
                crate::RunError::Tls { key, .. } => key,
                _ => "server.tls_cert",
            };
            problems.push((key, e.to_string()));
        }
    }
    // The address was checked with the config: what can fail now is the CA file (or,
    // with TLS, the host as a server name; its message names the host).
    if let Err(e) = crate::mailserver::ImapMailServer::new(&config.dovecot) {
        let key = match config.dovecot.ca_file {
            Some(_) => "dovecot.ca_file",
            None => "dovecot.imap",
        };
        problems.push((key, e.to_string()));
    }
    // The database's CA file (the connection itself is `serve`'s business: the database
    // may be down while the config is checked).
    if let crate::config::StoreBackend::Postgres(pg) = &config.store.backend {
        if let Err(e) =
            crate::store::postgres::tls::MakeRustls::new(pg.sslmode, pg.ca_file.as_deref())
        {
            problems.push(("store.ca_file", e));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    eprintln!("Invalid configuration:");
    for (key, problem) in problems {
        eprintln!("{}: `{key}`: {problem}", config.source.display());
    }
    Err(ExitCode::from(EXIT_CONFIG))
}

/// What `check-config` prints about the configured credentials: each one's kind, app,
/// file and expiry (with days left), or why its certificate could not be read.
fn credentials_table(config: &Config, now: std::time::SystemTime) -> String {
    use crate::domain::credential_watch::CredentialWatch;
    let watch = CredentialWatch::from_config(config, Default::default());
    watch.refresh(now);
    let records = watch.snapshot();
    if records.is_empty() {
        return String::new();
    }
    let mut out = String::from("credentials:\n");
    for r in records {
        let app = if r.app.is_empty() { "-" } else { &r.app };
        let file = r
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        let expiry = match (&r.read_error, r.not_after, r.seconds_left(now)) {
            (Some(e), _, _) => format!("unreadable: {e}"),
            (None, Some(t), Some(left)) => format!(
                "expires {} ({:.1} days)",
                crate::domain::format_millis(t.saturating_mul(1000)),
                left as f64 / 86_400.0
            ),
            _ => "does not expire".to_owned(),
        };
        out.push_str(&format!(
            "  {:<20} {app:<24} {file}: {expiry}\n",
            r.kind.as_str()
        ));
    }
    out
}

async fn open_store(config: &Config) -> Result<Arc<dyn Store>, ExitCode> {
    crate::store::open_existing(&config.store)
        .await
        .map_err(|e| {
            eprintln!("{e}");
            ExitCode::FAILURE
        })
}

/// Runs one command.
pub async fn execute(command: Command) -> ExitCode {
    match run_command(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

async fn run_command(command: Command) -> Result<(), ExitCode> {
    match command {
        Command::CheckConfig { config } => {
            let c = load(&config)?;
            transports(&c)?;
            check_files(&c)?;
            println!("{}: OK", c.source.display());
            print!("{}", credentials_table(&c, std::time::SystemTime::now()));
            Ok(())
        }
        Command::Serve { config } => serve(load(&config)?).await,
        Command::Migrate { config } => {
            let c = load(&config)?;
            let migrated = crate::store::migrate(&c.store).await.map_err(|e| {
                eprintln!("{e}");
                ExitCode::FAILURE
            })?;
            let store = c.store.describe();
            if migrated.from == migrated.to {
                println!("{store}: schema is at version {} already", migrated.to);
            } else {
                println!(
                    "{store}: schema migrated from version {} to {}",
                    migrated.from, migrated.to
                );
            }
            Ok(())
        }
        Command::Subscriptions {
            action: SubscriptionsCommand::List { config, user, json },
        } => {
            let store = open_store(&load(&config)?).await?;
            let users = store.subscriptions(user).await.map_err(|e| {
                eprintln!("{e}");
                ExitCode::FAILURE
            })?;
            if json {
                let v = crate::http::status::subscriptions_json(&users);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", subscriptions_table(&users));
            }
            Ok(())
        }
        Command::Resync {
            config,
            user,
            dry_run,
            json,
        } => resync(&load(&config)?, user.as_deref(), dry_run, json).await,
        Command::Queue { action } => queue(action).await,
        Command::Store {
            action:
                StoreCommand::Copy {
                    from,
                    to,
                    password_file,
                    sslmode,
                    ca_file,
                },
        } => store_copy(from, to, password_file, &sslmode, ca_file).await,
    }
}

async fn resync(
    config: &Config,
    user: Option<&str>,
    dry_run: bool,
    json: bool,
) -> Result<(), ExitCode> {
    use crate::domain::resync::{find_drift, fix};
    let directory = match crate::directory::from_config(&config.dovecot) {
        Ok(Some(d)) => d,
        Ok(None) => {
            eprintln!(
                "{}: resync needs `dovecot.doveadm_url` (doveadm HTTP API) or `dovecot.master_user`",
                config.source.display()
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => {
            eprintln!("{e}");
            return Err(ExitCode::FAILURE);
        }
    };
    let store = open_store(config).await?;
    let drift = find_drift(store.as_ref(), directory.as_ref(), user)
        .await
        .map_err(|e| {
            eprintln!("{e}");
            ExitCode::FAILURE
        })?;
    let results = if dry_run {
        Vec::new()
    } else {
        fix(store.as_ref(), directory.as_ref(), &drift).await
    };
    if json {
        let mut v = crate::http::status::drift_json(directory.name(), &drift);
        v["applied"] = (!dry_run).into();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", drift_table(&drift, &results, dry_run));
    }
    if results.iter().any(Result::is_err) {
        return Err(ExitCode::FAILURE);
    }
    Ok(())
}

/// `user registry dovecot action` rows (action marked done, failed, or to do).
fn drift_table(
    drift: &[crate::domain::resync::Drift],
    results: &[Result<(), crate::domain::resync::ResyncError>],
    dry_run: bool,
) -> String {
    let mut out = format!(
        "{:<32} {:<10} {:<40} ACTION\n",
        "USER", "REGISTRY", "DOVECOT"
    );
    for (i, d) in drift.iter().enumerate() {
        let state = match (dry_run, results.get(i)) {
            (true, _) | (false, None) => "(dry run)".to_owned(),
            (false, Some(Ok(()))) => "done".to_owned(),
            (false, Some(Err(e))) => format!("FAILED: {e}"),
        };
        out.push_str(&format!(
            "{:<32} {:<10} {:<40} {} {state}\n",
            d.user,
            format!("{} device(s)", d.devices),
            d.dovecot.as_deref().unwrap_or("-"),
            d.action.describe(),
        ));
    }
    if drift.is_empty() {
        out.push_str("(registry and Dovecot agree)\n");
    }
    out
}

async fn store_copy(
    from: PathBuf,
    to: String,
    password_file: Option<PathBuf>,
    sslmode: &str,
    ca_file: Option<PathBuf>,
) -> Result<(), ExitCode> {
    // The target is checked as the config file's `[store]` would be.
    let mut text = format!(
        "[store]\nurl = {}\nsslmode = {}\n",
        toml_str(&to),
        toml_str(sslmode)
    );
    if let Some(f) = &password_file {
        text.push_str(&format!(
            "password_file = {}\n",
            toml_str(&f.display().to_string())
        ));
    }
    if let Some(f) = &ca_file {
        text.push_str(&format!(
            "ca_file = {}\n",
            toml_str(&f.display().to_string())
        ));
    }
    let target = crate::config::Config::parse_store(&text).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let copied = crate::store::copy::sqlite_to_postgres(&from, &target)
        .await
        .map_err(|e| {
            eprintln!("{e}");
            ExitCode::FAILURE
        })?;
    println!(
        "copied {} devices, {} users with a last error and {} outbox items from {} to {}",
        copied.devices,
        copied.users,
        copied.items,
        from.display(),
        target.url
    );
    Ok(())
}

/// `s` as a TOML string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

async fn serve(config: Config) -> Result<(), ExitCode> {
    let transports = transports(&config)?;
    check_files(&config)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| {
            eprintln!("cannot listen on {}: {e}", config.server.listen);
            ExitCode::FAILURE
        })?;
    let addr = listener.local_addr().map_err(|_| ExitCode::FAILURE)?;
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // One line on stdout once the port accepts (tests and scripts wait for it).
    println!("dovepush-receiver listening on {scheme}://{addr}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    crate::run(listener, config, transports, shutdown_signal())
        .await
        .map_err(|e| {
            eprintln!("{e}");
            ExitCode::FAILURE
        })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn queue(action: QueueCommand) -> Result<(), ExitCode> {
    let fail = |e: crate::domain::store::StoreError| {
        eprintln!("{e}");
        ExitCode::FAILURE
    };
    match action {
        QueueCommand::List {
            config,
            limit,
            json,
        } => {
            let store = open_store(&load(&config)?).await?;
            let items = store.queue_list(limit).await.map_err(fail)?;
            if json {
                let v: Vec<_> = items
                    .iter()
                    .map(|q| {
                        serde_json::json!({
                            "id": q.id,
                            "user": q.user,
                            "app": q.app,
                            "transport": q.transport,
                            "token": shorten_token(&q.token),
                            "state": if q.in_flight { "in-flight" } else { "pending" },
                            "attempts": q.attempts,
                            "created": format_millis(q.created_at),
                            "due": format_millis(q.due_at),
                            "last_error": q.last_error,
                            "event_id": q.event_id,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let mut rows = vec![row(&[
                    "ID",
                    "USER",
                    "APP",
                    "TRANSPORT",
                    "TOKEN",
                    "STATE",
                    "ATTEMPTS",
                    "DUE",
                    "LAST ERROR",
                ])];
                for q in &items {
                    rows.push(vec![
                        q.id.to_string(),
                        q.user.clone(),
                        q.app.clone(),
                        q.transport.clone(),
                        shorten_token(&q.token),
                        if q.in_flight { "in-flight" } else { "pending" }.to_owned(),
                        q.attempts.to_string(),
                        format_millis(q.due_at),
                        q.last_error.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
                print!("{}", table(&rows));
            }
            Ok(())
        }
        QueueCommand::Retry { id, config } => {
            let store = open_store(&load(&config)?).await?;
            if store.queue_retry(id, now_millis()).await.map_err(fail)? {
                println!("item {id} is due now");
                Ok(())
            } else {
                eprintln!("no pending item {id}");
                Err(ExitCode::FAILURE)
            }
        }
        QueueCommand::Drop { id, config } => {
            let store = open_store(&load(&config)?).await?;
            if store.queue_drop(id).await.map_err(fail)? {
                println!("item {id} dropped");
                Ok(())
            } else {
                eprintln!("no item {id}");
                Err(ExitCode::FAILURE)
            }
        }
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|s| s.to_string()).collect()
}

/// The subscriptions listing as a text table (one line per device).
pub fn subscriptions_table(users: &[UserStatus]) -> String {
    let mut rows = vec![row(&[
        "USER",
        "APP",
        "TRANSPORT",
        "TOKEN",
        "CREATED",
        "LAST SEEN",
        "LAST SUCCESS",
        "LAST ERROR",
        "PENDING",
    ])];
    let opt_time = |t: Option<i64>| t.map(format_millis).unwrap_or_else(|| "-".into());
    for u in users {
        if u.devices.is_empty() {
            rows.push(vec![
                u.user.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                u.last_error.clone().unwrap_or_else(|| "-".into()),
                "0".into(),
            ]);
        }
        for d in &u.devices {
            rows.push(vec![
                u.user.clone(),
                d.device.app_id.clone(),
                d.device.kind.as_str().to_owned(),
                shorten_token(&d.device.token),
                format_millis(d.created_at),
                format_millis(d.last_seen_at()),
                opt_time(d.last_success_at),
                d.last_error
                    .clone()
                    .or_else(|| u.last_error.clone())
                    .unwrap_or_else(|| "-".into()),
                d.pending.to_string(),
            ]);
        }
    }
    table(&rows)
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::RegisteredDevice;
    use clap::CommandFactory;
    use dovepush_push::DeviceKind;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "dovepush-receiver",
            "subscriptions",
            "list",
            "--config",
            "c.toml",
            "--user",
            "alice",
            "--json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Subscriptions {
                action: SubscriptionsCommand::List { json: true, .. }
            }
        ));
        let cli =
            Cli::try_parse_from(["dovepush-receiver", "queue", "retry", "7", "--config", "c"])
                .unwrap();
        assert!(matches!(
            cli.command,
            Command::Queue {
                action: QueueCommand::Retry { id: 7, .. }
            }
        ));
    }

    #[test]
    fn table_lists_devices_and_users_without_devices() {
        let users = vec![
            UserStatus {
                user: "alice".into(),
                last_error: None,
                last_error_at: None,
                devices: vec![RegisteredDevice {
                    pending: 2,
                    ..RegisteredDevice::for_tests(
                        "alice",
                        DeviceKind::Apns,
                        "0123456789abcdef0123456789",
                    )
                }],
            },
            UserStatus {
                user: "bob".into(),
                last_error: Some("Unregistered".into()),
                last_error_at: Some(0),
                devices: vec![],
            },
        ];
        let t = subscriptions_table(&users);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("USER"));
        assert!(lines[1].contains("012345…456789"));
        assert!(!lines[1].contains("0123456789abcdef0123456789"));
        assert!(lines[1].trim_end().ends_with('2'));
        assert!(lines[2].contains("Unregistered"));
    }
}
