//! The background sender's logic: it sends jobs with hyper, retries, spools what it
//! cannot send and replays the spool. It runs on a small tokio runtime in the sender
//! process ([`crate::process`]), never in a Dovecot process's own threads, and never
//! touches Dovecot: its log lines go into a [`LogQueue`] that the sender process passes
//! back to Dovecot's thread.
//!
//! Outcomes (as the ox driver's lib-http, but with backoff and a spool):
//! - 2xx: delivered; a success also starts a replay of that endpoint's spooled events;
//! - connection errors, timeouts, 408, 429, 5xx: retried `max_retries` times with
//!   backoff, then spooled;
//! - any other status: final, logged with the user, not retried.
//!
//! When told to stop (plugin deinit, or the Dovecot process gone), in-flight jobs get a
//! bounded time, then whatever is still unsent is spooled.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot, Semaphore};

use dovepush_ffi::LogLevel as Level;

use crate::config::Endpoint;
use crate::event::EVENT_ID_HEADER;
use crate::job::Job;
use crate::spool::Spool;

/// How many requests one process has in flight at most.
const MAX_IN_FLIGHT: usize = 128;
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const USER_AGENT: &str = concat!("dovepush/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

/// Log lines made in the sender process, waiting to be passed to Dovecot's thread.
#[derive(Debug, Clone, Default)]
pub struct LogQueue(Arc<LogQueueInner>);

#[derive(Debug, Default)]
pub struct LogQueueInner {
    lines: Mutex<Vec<LogLine>>,
    /// Wakes whoever passes the lines on (nothing polls an idle queue).
    added: tokio::sync::Notify,
}

impl LogQueue {
    pub fn push(&self, level: Level, text: String) {
        {
            let mut lines = self.0.lines.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded: a flood of identical failures must not grow memory without end.
            if lines.len() < 10_000 {
                lines.push(LogLine { level, text });
            }
        }
        self.0.added.notify_one();
    }

    pub fn take(&self) -> Vec<LogLine> {
        std::mem::take(&mut *self.0.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Return lines that could not be passed on yet, ahead of newer ones.
    pub fn put_back(&self, mut older: Vec<LogLine>) {
        let mut lines = self.0.lines.lock().unwrap_or_else(|e| e.into_inner());
        older.append(&mut lines);
        older.truncate(10_000);
        *lines = older;
    }

    /// Resolves once lines were pushed since the last call.
    pub async fn added(&self) {
        self.0.added.notified().await;
    }
}

/// What one request attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered(StatusCode),
    Retry(String),
    Final(String),
}

/// Sort an HTTP status into the outcome classes.
pub fn classify(status: StatusCode) -> Attempt {
    if status.is_success() {
        Attempt::Delivered(status)
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Attempt::Retry(format!("HTTP {status}"))
    } else {
        Attempt::Final(format!("HTTP {status}"))
    }
}

/// Delay before retry number `attempt` (0-based).
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client that verifies TLS against `roots` (an empty store for the plain-HTTP one).
fn build_client(roots: rustls::RootCertStore) -> Result<HttpClient, String> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(32)
        .build(https))
}

/// The HTTP clients of a sender: one for `http://` receivers, made at start, and one for
/// `https://` receivers, made at the first such request. Only the second loads the
/// system trust store, which takes milliseconds of CPU in every new sender process.
struct Clients {
    plain: HttpClient,
    tls: OnceLock<Result<HttpClient, String>>,
}

impl Clients {
    fn new() -> Result<Clients, String> {
        Ok(Clients {
            plain: build_client(rustls::RootCertStore::empty())?,
            tls: OnceLock::new(),
        })
    }

    /// The client for `url` (a URL as [`crate::config::Endpoint`] normalises it).
    fn for_url(&self, url: &str) -> Result<&HttpClient, &str> {
        if !url.starts_with("https:") {
            return Ok(&self.plain);
        }
        let tls = self.tls.get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            build_client(roots)
        });
        tls.as_ref().map_err(String::as_str)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Send `job` once.
async fn attempt(clients: &Clients, job: &Job) -> Attempt {
    let client = match clients.for_url(&job.endpoint.display_url) {
        Ok(client) => client,
        Err(e) => return Attempt::Retry(e.to_string()),
    };
    let mut request = Request::put(job.endpoint.display_url.as_str())
        .header("content-type", "application/json; charset=utf-8")
        .header("user-agent", USER_AGENT)
        .header(EVENT_ID_HEADER, job.event_id.as_str());
    if let Some(authorization) = &job.endpoint.authorization {
        request = request.header("authorization", authorization.as_str());
    }
    let request = match request.body(Full::new(Bytes::from(job.body.clone()))) {
        Ok(request) => request,
        Err(e) => return Attempt::Final(format!("cannot build the request: {e}")),
    };
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status();
        // Read the (small) answer so the connection can be reused.
        let _ = response.into_body().collect().await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    };
    match tokio::time::timeout(job.endpoint.timeout, exchange).await {
        Err(_) => Attempt::Retry(format!(
            "no answer within {} ms",
            job.endpoint.timeout.as_millis()
        )),
        Ok(Err(e)) => Attempt::Retry(error_chain(&e)),
        Ok(Ok(status)) => classify(status),
    }
}

/// A job plus the spool it falls back to.
#[derive(Debug, Clone)]
pub struct Submission {
    pub job: Job,
    pub spool: Arc<Spool>,
    /// Log successes too (`dovepush_debug`).
    pub debug: bool,
}

struct SpoolState {
    spool: Arc<Spool>,
    draining: AtomicBool,
    /// Set when files may be waiting; cleared by a replay that emptied the spool.
    maybe_waiting: AtomicBool,
    last_replay: Mutex<Instant>,
}

impl SpoolState {
    /// A spool not replayed yet in this process: files may be waiting.
    fn new(spool: &Arc<Spool>) -> Arc<SpoolState> {
        Arc::new(SpoolState {
            spool: spool.clone(),
            draining: AtomicBool::new(false),
            maybe_waiting: AtomicBool::new(true),
            last_replay: Mutex::new(Instant::now()),
        })
    }
}

/// What the sender process's frame reader hands the worker.
pub enum Input {
    /// An event to send.
    Job(Submission),
    /// An endpoint and its spool, named by the Dovecot process before its first job for
    /// them, or without one (a new process whose spool holds events): the worker replays
    /// that spool's records for the endpoint.
    Endpoint {
        endpoint: Arc<Endpoint>,
        spool: Arc<Spool>,
    },
}

struct Worker {
    clients: Clients,
    logs: LogQueue,
    limit: Semaphore,
    /// Jobs accepted and not finished, for the spool at stop (shared with their tasks).
    pending: Mutex<HashMap<u64, Arc<Submission>>>,
    next_key: AtomicU64,
    spools: Mutex<HashMap<PathBuf, Arc<SpoolState>>>,
    /// Wakes the run loop when events were spooled (it replays only while some wait).
    spooled: tokio::sync::Notify,
    /// The endpoints (full URLs) the Dovecot process named ([`Input::Endpoint`], which
    /// comes before any job for them). The spool directory is writable by every uid: a
    /// record for any other URL (a local user's forgery, or an endpoint since
    /// reconfigured) is never sent by this process.
    endpoints: Mutex<HashSet<String>>,
}

impl Worker {
    fn log(&self, level: Level, text: String) {
        self.logs.push(level, text);
    }

    fn spool_state(self: &Arc<Self>, spool: &Arc<Spool>) -> Arc<SpoolState> {
        let mut spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = spools.get(spool.dir()) {
            return state.clone();
        }
        let state = SpoolState::new(spool);
        spools.insert(spool.dir().to_path_buf(), state.clone());
        // A spool seen for the first time in this process: replay what earlier
        // processes left.
        tokio::spawn(self.clone().replay(state.clone(), None));
        state
    }

    fn take(self: &Arc<Self>, input: Input) {
        match input {
            Input::Job(submission) => self.accept(submission),
            Input::Endpoint { endpoint, spool } => {
                self.know(&endpoint);
                self.spool_state(&spool);
            }
        }
    }

    /// Records for `endpoint` found in a spool may be sent.
    fn know(&self, endpoint: &Endpoint) {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if !endpoints.contains(&endpoint.url) {
            endpoints.insert(endpoint.url.clone());
        }
    }

    fn accept(self: &Arc<Self>, submission: Submission) {
        let state = self.spool_state(&submission.spool);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let submission = Arc::new(submission);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, submission.clone());
        tokio::spawn(self.clone().deliver(key, submission, state));
    }

    fn finish(&self, key: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    fn spool(&self, submission: &Submission, state: &SpoolState, why: &str) {
        let job = &submission.job;
        match submission.spool.store(job) {
            Ok(_) => {
                state.maybe_waiting.store(true, Ordering::Relaxed);
                self.spooled.notify_one();
                self.log(
                    Level::Warning,
                    format!(
                        "user {}: event {} for {} spooled in {} ({why}); it is sent when the receiver answers again",
                        job.user,
                        job.event_id,
                        job.endpoint.display_url,
                        submission.spool.dir().display()
                    ),
                );
            }
            Err(e) => self.log(
                Level::Error,
                format!(
                    "user {}: event {} for {} could not be spooled in {}: {e} (event lost: {why})",
                    job.user,
                    job.event_id,
                    job.endpoint.display_url,
                    submission.spool.dir().display()
                ),
            ),
        }
    }

    async fn deliver(
        self: Arc<Self>,
        key: u64,
        submission: Arc<Submission>,
        state: Arc<SpoolState>,
    ) {
        let Ok(_permit) = self.limit.acquire().await else {
            return;
        };
        let job = &submission.job;
        let attempts = job.endpoint.max_retries.saturating_add(1);
        let mut last_problem = String::new();
        for n in 0..attempts {
            match attempt(&self.clients, job).await {
                Attempt::Delivered(status) => {
                    self.finish(key);
                    if submission.debug {
                        self.log(
                            Level::Info,
                            format!(
                                "user {}: event {} sent to {}: {status}",
                                job.user, job.event_id, job.endpoint.display_url
                            ),
                        );
                    }
                    if state.maybe_waiting.load(Ordering::Relaxed) {
                        tokio::spawn(
                            self.clone()
                                .replay(state.clone(), Some(job.endpoint.display_url.clone())),
                        );
                    }
                    return;
                }
                Attempt::Final(problem) => {
                    self.finish(key);
                    self.log(
                        Level::Error,
                        format!(
                            "user {}: {} refused event {}: {problem}; not retried",
                            job.user, job.endpoint.display_url, job.event_id
                        ),
                    );
                    return;
                }
                Attempt::Retry(problem) => {
                    last_problem = problem;
                    if n + 1 < attempts {
                        tokio::time::sleep(backoff(n)).await;
                    }
                }
            }
        }
        self.spool(
            &submission,
            &state,
            &format!("{attempts} attempts failed, last: {last_problem}"),
        );
        self.finish(key);
    }

    /// Send spooled events, oldest first (only `endpoint`'s when given). An endpoint
    /// that fails is skipped for the rest of this round.
    async fn replay(self: Arc<Self>, state: Arc<SpoolState>, endpoint: Option<String>) {
        if state.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        *state.last_replay.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        // Cleared before the files are listed: an event spooled meanwhile sets it again,
        // so this round's result cannot hide it.
        state.maybe_waiting.store(false, Ordering::Relaxed);
        let spool = &state.spool;
        match spool.enforce_limits() {
            Ok(dropped) if dropped.too_old + dropped.over_size > 0 => self.log(
                Level::Error,
                format!(
                    "spool {}: dropped {} events older than {:?} and {} beyond the size limit of {} bytes",
                    spool.dir().display(),
                    dropped.too_old,
                    spool.settings.max_age,
                    dropped.over_size,
                    spool.settings.max_size
                ),
            ),
            Ok(_) => {}
            Err(e) => self.log(
                Level::Error,
                format!("spool {}: cannot read: {e}", spool.dir().display()),
            ),
        }
        let entries = spool.entries().unwrap_or_default();
        let mut failing: HashSet<String> = HashSet::new();
        let (mut sent, mut left, mut foreign) = (0usize, 0usize, 0usize);
        for path in entries {
            let job = match Spool::load(&path) {
                Ok(job) => job,
                Err(e) => {
                    if !e.contains("ermission denied") {
                        self.log(
                            Level::Error,
                            format!(
                                "spool file {} is unreadable and was set aside: {e}",
                                path.display()
                            ),
                        );
                        let aside = path.with_file_name(format!(
                            ".bad-{}",
                            path.file_name()
                                .and_then(|n| n.to_str())
                                .unwrap_or("record")
                        ));
                        let _ = std::fs::rename(&path, aside);
                    } else {
                        left += 1;
                    }
                    continue;
                }
            };
            if !self.configured(&job.endpoint.url) {
                // Not waited for either: it stays until the spool's age limit.
                foreign += 1;
                continue;
            }
            let url = &job.endpoint.display_url;
            if endpoint.as_ref().is_some_and(|e| e != url) || failing.contains(url) {
                left += 1;
                continue;
            }
            match attempt(&self.clients, &job).await {
                Attempt::Delivered(_) => {
                    Spool::remove(&path);
                    sent += 1;
                }
                Attempt::Final(problem) => {
                    Spool::remove(&path);
                    self.log(
                        Level::Error,
                        format!(
                            "user {}: {url} refused spooled event {}: {problem}; dropped",
                            job.user, job.event_id
                        ),
                    );
                }
                Attempt::Retry(_) => {
                    failing.insert(url.clone());
                    left += 1;
                }
            }
        }
        if sent > 0 {
            self.log(
                Level::Info,
                format!(
                    "sent {sent} spooled events from {} ({left} still waiting)",
                    spool.dir().display()
                ),
            );
        }
        if foreign > 0 {
            self.log(
                Level::Warning,
                format!(
                    "spool {}: {foreign} events for endpoints this process is not configured for were left there",
                    spool.dir().display()
                ),
            );
        }
        if left > 0 {
            state.maybe_waiting.store(true, Ordering::Relaxed);
        }
        state.draining.store(false, Ordering::Release);
    }

    /// Whether some spool may hold events (or is being replayed).
    fn spool_waiting(&self) -> bool {
        self.spools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|s| s.maybe_waiting.load(Ordering::Relaxed) || s.draining.load(Ordering::Acquire))
    }

    /// When the next periodic replay of a known spool is due.
    fn next_round(&self) -> Option<Instant> {
        self.spools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| {
                *s.last_replay.lock().unwrap_or_else(|e| e.into_inner())
                    + s.spool.settings.retry_interval
            })
            .min()
    }

    fn configured(&self, url: &str) -> bool {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(url)
    }

    fn sending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn replaying(&self) -> bool {
        self.spools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|state| state.draining.load(Ordering::Acquire))
    }

    fn replay_due(self: &Arc<Self>) {
        let states: Vec<Arc<SpoolState>> = self
            .spools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for state in states {
            let mut last = state.last_replay.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= state.spool.settings.retry_interval;
            if due && !state.draining.load(Ordering::Acquire) {
                // Now, not when the task runs: the run loop's next round moves on at once.
                *last = Instant::now();
                drop(last);
                tokio::spawn(self.clone().replay(state, None));
            }
        }
    }

    async fn run(
        self: Arc<Self>,
        mut jobs: mpsc::Receiver<Input>,
        mut stop: oneshot::Receiver<Duration>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let flush = loop {
            // While its own events wait in a spool, the sender looks every second whether a
            // replay is due; otherwise only once per retry interval of the spools it knows
            // (others spool there too: the Dovecot process when this queue is full, other
            // processes at exit). A sender that knows no spool never wakes on its own.
            let waiting = self.spool_waiting();
            let next_round = self.next_round();
            let round = tokio::time::sleep_until(tokio::time::Instant::from_std(
                next_round.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            tokio::select! {
                input = jobs.recv() => match input {
                    Some(input) => self.take(input),
                    None => break Duration::ZERO,
                },
                flush = &mut stop => break flush.unwrap_or(Duration::ZERO),
                _ = tick.tick(), if waiting => self.replay_due(),
                _ = round, if !waiting && next_round.is_some() => self.replay_due(),
                _ = self.spooled.notified(), if !waiting => {}
            }
        };
        jobs.close();
        while let Ok(input) = jobs.try_recv() {
            self.take(input);
        }
        // Jobs in flight and replays under way (a short-lived process such as
        // dovecot-lda would otherwise drain one spooled file per run) get the flush time;
        // a replay cut short leaves its unsent files in the spool.
        let deadline = Instant::now() + flush;
        while Instant::now() < deadline && (self.sending() || self.replaying()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unsent: Vec<Arc<Submission>> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for submission in &unsent {
            let state = self.spool_state_quiet(&submission.spool);
            self.spool(submission, &state, "the process is exiting");
        }
    }

    fn spool_state_quiet(&self, spool: &Arc<Spool>) -> Arc<SpoolState> {
        self.spools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(spool.dir())
            .cloned()
            .unwrap_or_else(|| SpoolState::new(spool))
    }
}

/// The sender's whole life: make the HTTP clients, then take jobs until `stop` says how
/// long in-flight jobs may still take, spool what is left and return. Runs on the
/// sender process's runtime ([`crate::process`]).
pub async fn run(
    jobs: mpsc::Receiver<Input>,
    stop: oneshot::Receiver<Duration>,
    logs: LogQueue,
) -> Result<(), String> {
    let worker = Arc::new(Worker {
        clients: Clients::new()?,
        logs,
        limit: Semaphore::new(MAX_IN_FLIGHT),
        pending: Mutex::new(HashMap::new()),
        next_key: AtomicU64::new(0),
        spools: Mutex::new(HashMap::new()),
        spooled: tokio::sync::Notify::new(),
        endpoints: Mutex::new(HashSet::new()),
    });
    worker.run(jobs, stop).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify(StatusCode::OK), Attempt::Delivered(StatusCode::OK));
        assert_eq!(
            classify(StatusCode::NO_CONTENT),
            Attempt::Delivered(StatusCode::NO_CONTENT)
        );
        for retry in [408, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(retry).unwrap();
            assert!(matches!(classify(status), Attempt::Retry(_)), "{retry}");
        }
        for fatal in [400, 401, 403, 404, 413, 301] {
            let status = StatusCode::from_u16(fatal).unwrap();
            assert!(matches!(classify(status), Attempt::Final(_)), "{fatal}");
        }
    }

    #[test]
    fn the_trust_store_is_loaded_only_for_https() {
        let clients = Clients::new().unwrap();
        assert!(clients.for_url("http://127.0.0.1:9/notify").is_ok());
        assert!(
            clients.tls.get().is_none(),
            "plain HTTP needs no trust store"
        );
        assert!(clients.for_url("https://push.example/notify").is_ok());
        assert!(clients.tls.get().is_some());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
