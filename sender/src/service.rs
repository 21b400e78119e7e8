//! The service process from start to exit.
//!
//! 1. Take what the master passed (environment, fds 5-7); without it, explain and exit.
//! 2. Still root: read the settings (from the config process on Dovecot 2.3, with
//!    `doveconf` on 2.4), and create or repair the spool's directories for the
//!    service's user.
//! 3. Drop to that user for good (never run as root), tell the master it is up.
//! 4. Serve: connections hand records to the dispatcher; the drop spool is looked at
//!    every second; `queue/` is replayed at start and then periodically.
//! 5. On SIGTERM or SIGINT from the master, or when the master is gone: stop taking
//!    records, give requests in flight their timeout, keep the rest in `queue/`, exit 0.
//!
//! A start-up failure is logged (with the setting or file at fault) and exits 75: the
//! master throttles restarts and logs them.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::dispatch::Dispatcher;
use crate::dovecot_config::{self, ServiceSettings};
use crate::http::Clients;
use crate::log;
use crate::master::{self, ConfigSource, Inherited, MasterEnv};
use crate::server;
use crate::spool::Spool;
use crate::trust;

/// `EX_USAGE`: not started by Dovecot.
const EXIT_USAGE: i32 = 64;
/// `EX_TEMPFAIL`: could not start; the master tries again later.
const EXIT_START_FAILED: i32 = 75;
/// Records waiting between the connections and the dispatcher.
const INPUT_QUEUE: usize = 10_000;

/// The longest a stopping service waits for requests in flight.
fn grace(settings: &ServiceSettings) -> Duration {
    settings
        .config
        .endpoints
        .iter()
        .map(|e| e.timeout)
        .max()
        .unwrap_or(Duration::from_secs(2))
        .clamp(Duration::from_millis(500), Duration::from_secs(10))
}

/// A line in Dovecot's log before `tracing` is set up (or when it could not be).
fn early_error(service: &str, text: &str) {
    let line = log::format_line(
        tracing::Level::ERROR,
        std::process::id(),
        service,
        None,
        text,
    );
    let _ = std::io::stderr().write_all(&line);
}

pub fn main() -> i32 {
    let env = match MasterEnv::read(|name| std::env::var(name).ok()) {
        Ok(Some(env)) => env,
        Ok(None) => {
            eprintln!(
                "dovepush-sender is started by Dovecot's master as `service dovepush` \
                 (see /etc/dovecot/conf.d/90-dovepush.conf), not by hand."
            );
            return EXIT_USAGE;
        }
        Err(e) => {
            early_error("dovepush", &e.to_string());
            return EXIT_START_FAILED;
        }
    };
    match start(&env) {
        Ok(()) => 0,
        Err(why) => {
            early_error(&env.service_name, &why);
            EXIT_START_FAILED
        }
    }
}

fn start(env: &MasterEnv) -> Result<(), String> {
    let mut inherited = Inherited::adopt(env.listener_fd).map_err(|e| e.to_string())?;
    let dovecot = match &env.config {
        ConfigSource::Socket(socket) => dovecot_config::request(socket, &env.service_name),
        ConfigSource::File(file) => {
            dovecot_config::doveconf(&dovecot_config::doveconf_path(), file)
        }
    }
    .map_err(|e| format!("cannot read Dovecot's settings: {e}"))?;
    let settings = ServiceSettings::from_dovecot(&dovecot, &trust::system_uid)?;
    log::init(&env.service_name, settings.config.debug);
    for problem in &settings.problems {
        tracing::error!("{problem}");
    }
    let (uid, gid) = env.run_as.ok_or(
        "refusing to run as root: give the service block a user (service dovepush { user = dovepush })",
    )?;
    let spool = Spool::new(settings.config.spool.clone());
    let notes = spool
        .prepare(uid, gid)
        .map_err(|e| format!("dovepush_spool_dir {}: {e}", spool.dir().display()))?;
    for note in notes {
        tracing::warn!("{note}");
    }
    master::drop_privileges(uid, gid).map_err(|e| e.to_string())?;
    master::report_status(&mut inherited.status, env)
        .map_err(|e| format!("cannot report to the master: {e}"))?;
    if settings.config.endpoints.is_empty() {
        tracing::warn!(
            "no dovepush_url (or dovepush = ox:…) is set globally: nothing will be sent"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no runtime: {e}"))?;
    runtime.block_on(serve(inherited, settings, spool))
}

async fn serve(
    inherited: Inherited,
    settings: ServiceSettings,
    spool: Spool,
) -> Result<(), String> {
    let listener = tokio::net::UnixListener::from_std(inherited.listener)
        .map_err(|e| format!("the listener: {e}"))?;
    let clients = Arc::new(Clients::new()?);
    let grace = grace(&settings);
    let dispatcher = Dispatcher::new(
        &settings.config.endpoints,
        spool,
        settings.trust,
        clients,
        settings.config.debug,
    );
    let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(server::serve(listener, input, settings.trust, stop_rx));
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    // SAFETY: an OwnedFd's descriptor stays open and the same until it is dropped, and
    // the AsyncFd owns it.
    #[allow(unsafe_code)]
    let dead = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inherited.dead, tokio::io::Interest::ERROR)
    }
    .map_err(|e| format!("the master's death pipe: {e}"))?;
    let stop = async move {
        let why = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            _ = master_gone(&dead) => "the master is gone",
        };
        tracing::debug!("stopping ({why})");
        let _ = stop_tx.send(true);
    };
    dispatcher.run(input_rx, stop, grace).await;
    Ok(())
}

/// Resolves when the master's (reading) end of the death pipe closes: our writing end
/// then reports an error.
async fn master_gone(dead: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>) {
    let _ = dead.ready(tokio::io::Interest::ERROR).await;
}
