//! The dispatcher: every event the service holds, per endpoint, from arrival to the
//! receiver's answer.
//!
//! One task owns all state (no locks): records from the socket ([`Input`]), records
//! claimed from the drop spool, requests' answers, retry timers and replay rounds all
//! come to it in turn. A record (one event) becomes one [`Job`] per configured endpoint,
//! whose [`Origin`] says who else holds it:
//! - `Socket`: only the plugin that sent it, until the record is acknowledged, which
//!   happens once every job of the record is settled or written to `queue/`;
//! - `Queued`: a file in the service's `queue/`, removed once the job is settled.
//!
//! Per endpoint, at most [`MAX_SINGLE_IN_FLIGHT`] single requests run at once; a
//! batching endpoint has one request in flight, and what queues meanwhile goes in the
//! next (at most [`MAX_BATCH_ITEMS`]). An event that fails is written to `queue/` (and
//! acknowledged) before it is retried, so that neither a restart nor a kill loses it;
//! after `max_retries` retries it waits there. Replay rounds send `queue/` oldest first:
//! at start, every `dovepush_spool_retry_interval`, and soon after any success while
//! something waits. One event is one replay: only this process replays, a record is in
//! memory at most once ([`Dispatcher::live`]), and one already sent recently is not sent
//! again when a copy turns up ([`Recent`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use dovepush_protocol::batch::MAX_BATCH_ITEMS;
use dovepush_protocol::record::Record;
use dovepush_settings::Endpoint;

use crate::http::{backoff, Attempt, Clients};
use crate::spool::Spool;
use crate::trust::Trust;

/// Single (ox) requests in flight per endpoint.
pub const MAX_SINGLE_IN_FLIGHT: usize = 64;
/// Records loaded from `queue/` per replay round.
const REPLAY_CHUNK: usize = 500;
/// How long a sent event's name is remembered, to drop copies that turn up later.
const RECENT_TTL: Duration = Duration::from_secs(600);
const RECENT_MAX: usize = 200_000;
/// How often `drop/` is looked at.
const DROP_SCAN: Duration = Duration::from_secs(1);
/// After a success, how soon a replay round may start when something waits.
const REPLAY_AFTER_SUCCESS: Duration = Duration::from_secs(1);

/// Acknowledges one record to the connection it came on.
#[derive(Debug)]
pub struct Ack {
    pub to: mpsc::UnboundedSender<u64>,
    pub seq: u64,
    /// The connection's number (to find its records when it closes).
    pub conn: u64,
}

impl Ack {
    pub fn send(self) {
        let _ = self.to.send(self.seq);
    }
}

/// An [`Ack`] shared by the jobs of one record: sent when the last of them lets go.
#[derive(Debug)]
pub struct SharedAck(Option<Ack>);

impl SharedAck {
    fn conn(&self) -> u64 {
        self.0.as_ref().map_or(0, |ack| ack.conn)
    }
}

impl Drop for SharedAck {
    fn drop(&mut self) {
        if let Some(ack) = self.0.take() {
            ack.send();
        }
    }
}

/// Who else holds a job's event.
#[derive(Debug)]
enum Origin {
    Socket(Arc<SharedAck>),
    Queued(PathBuf),
}

/// What the socket's connections hand the dispatcher.
#[derive(Debug)]
pub enum Input {
    /// A record from a trusted peer.
    Record { record: Box<Record>, ack: Ack },
    /// The peer of connection `conn` is gone: its records still held only here are
    /// written to `queue/` (nobody else has them now).
    Closed { conn: u64 },
}

/// One event for one endpoint.
#[derive(Debug)]
struct Job {
    /// The copy for this job's endpoint ([`Record::for_endpoint`]).
    record: Arc<Record>,
    /// The record's file name: its identity.
    key: String,
    origin: Origin,
    attempts: u32,
    max_attempts: u32,
    /// Loaded by a replay round: one attempt, and a failure ends the endpoint's round.
    replay: bool,
}

struct EndpointState {
    endpoint: Arc<Endpoint>,
    queue: VecDeque<Job>,
    in_flight: usize,
    /// The receiver answered 404/405 to a batch: send one by one.
    no_batch: bool,
    /// A replayed event failed in the current round.
    replay_blocked: bool,
}

/// Names of events sent (or refused for good) lately.
#[derive(Default)]
struct Recent {
    names: HashSet<String>,
    order: VecDeque<(Instant, String)>,
}

impl Recent {
    fn insert(&mut self, name: String, now: Instant) {
        if self.names.insert(name.clone()) {
            self.order.push_back((now, name));
        }
        while self.order.len() > RECENT_MAX {
            self.pop();
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn prune(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_TTL)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, name)) = self.order.pop_front() {
            self.names.remove(&name);
        }
    }
}

/// A finished request: its number and one outcome per event (or `Err` when a batch URL
/// does not exist).
struct Done {
    request: u64,
    outcomes: Result<Vec<Attempt>, String>,
}

/// Counters, for tests and the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub refused: u64,
    pub requests: u64,
    pub persisted: u64,
    pub replayed: u64,
    pub duplicates: u64,
}

/// The dispatcher's state.
pub struct Dispatcher {
    endpoints: Vec<EndpointState>,
    by_url: HashMap<String, usize>,
    spool: Spool,
    trust: Trust,
    clients: Arc<Clients>,
    debug: bool,
    /// Names of the events held in memory (queued, waiting to retry, in flight).
    live: HashSet<String>,
    recent: Recent,
    requests: HashMap<u64, (usize, Vec<Job>)>,
    next_request: u64,
    /// Events waiting to be retried, by when.
    delayed: BTreeMap<(Instant, u64), (usize, Job)>,
    next_delayed: u64,
    /// `queue/` may hold events no round has looked at yet.
    queue_waiting: bool,
    /// Replayed events not settled yet (a round runs while this is non-zero).
    replaying: usize,
    next_round: Instant,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: Option<mpsc::UnboundedReceiver<Done>>,
    stopping: bool,
    pub counts: Counts,
}

fn uid_of(name: &str) -> Option<u32> {
    crate::trust::system_uid(name)
}

impl Dispatcher {
    pub fn new(
        endpoints: &[Endpoint],
        spool: Spool,
        trust: Trust,
        clients: Arc<Clients>,
        debug: bool,
    ) -> Dispatcher {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let endpoints: Vec<EndpointState> = endpoints
            .iter()
            .map(|e| EndpointState {
                endpoint: Arc::new(e.clone()),
                queue: VecDeque::new(),
                in_flight: 0,
                no_batch: false,
                replay_blocked: false,
            })
            .collect();
        let by_url = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.endpoint.display_url.clone(), i))
            .collect();
        Dispatcher {
            endpoints,
            by_url,
            spool,
            trust,
            clients,
            debug,
            live: HashSet::new(),
            recent: Recent::default(),
            requests: HashMap::new(),
            next_request: 0,
            delayed: BTreeMap::new(),
            next_delayed: 0,
            queue_waiting: true,
            replaying: 0,
            next_round: Instant::now(),
            done_tx,
            done_rx: Some(done_rx),
            stopping: false,
            counts: Counts::default(),
        }
    }

    /// Run until `stop` resolves (or every sender of `input` is gone); then take what
    /// `input` still brings until its senders are gone, give requests in flight up to
    /// `grace` in all, write what is still held only in memory to `queue/`, acknowledge
    /// it and return.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        stop: impl std::future::Future<Output = ()>,
        grace: Duration,
    ) -> Counts {
        let mut done_rx = self.done_rx.take().expect("run once");
        let mut tick = tokio::time::interval(DROP_SCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            self.pump();
            let next_delayed = self.delayed.keys().next().map(|(at, _)| *at);
            let retry = tokio::time::sleep_until(next_delayed.unwrap_or_else(Instant::now));
            tokio::select! {
                message = input.recv() => match message {
                    Some(message) => self.take(message),
                    None => break,
                },
                Some(done) = done_rx.recv() => self.settle_request(done),
                _ = retry, if next_delayed.is_some() => self.release_delayed(),
                _ = tick.tick() => self.every_second(),
                _ = &mut stop => break,
            }
        }
        // Stopping: no new requests; connections hand over what their peers already
        // wrote, requests in flight get `grace`.
        self.stopping = true;
        let deadline = Instant::now() + grace;
        let mut input_open = true;
        while input_open || !self.requests.is_empty() {
            tokio::select! {
                message = input.recv(), if input_open => match message {
                    Some(message) => self.take(message),
                    None => input_open = false,
                },
                Some(done) = done_rx.recv() => self.settle_request(done),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.keep_everything();
        self.counts
    }

    fn every_second(&mut self) {
        let now = Instant::now();
        self.recent.prune(now);
        self.claim_drops();
        if self.replaying == 0 && now >= self.next_round {
            self.replay_round();
        }
    }

    /// A message from a connection.
    pub fn take(&mut self, message: Input) {
        match message {
            Input::Record { record, ack } => self.accept(*record, ack),
            Input::Closed { conn } => self.keep_records_of(conn),
        }
    }

    fn accept(&mut self, record: Record, ack: Ack) {
        if self.endpoints.is_empty() {
            tracing::error!(
                user = %record.user,
                "event {} dropped: no dovepush_url (or dovepush = ox:…) is set globally",
                record.id
            );
            ack.send();
            return;
        }
        let ack = Arc::new(SharedAck(Some(ack)));
        for (index, copy, key) in self.fresh_copies(&record) {
            self.enqueue(index, copy, key, Origin::Socket(ack.clone()));
        }
    }

    /// The copies of `record` for each endpoint that takes its kind of event and that are
    /// neither held nor sent lately (those are repeats, counted), with their endpoints'
    /// indexes and names.
    fn fresh_copies(&mut self, record: &Record) -> Vec<(usize, Record, String)> {
        let mut fresh = Vec::with_capacity(self.endpoints.len());
        for (index, state) in self.endpoints.iter().enumerate() {
            let endpoint = &state.endpoint;
            if !endpoint.events.contains(record.body.event) {
                // Not an event this endpoint asked for (dovepush_events): the stock ox
                // receiver gets only messageNew.
                continue;
            }
            let copy = record.for_endpoint(&endpoint.display_url, endpoint.user_from_metadata);
            let key = copy.file_name();
            if self.live.contains(&key) || self.recent.contains(&key) {
                self.counts.duplicates += 1;
            } else {
                fresh.push((index, copy, key));
            }
        }
        fresh
    }

    /// Hold a new job for endpoint `index`, with that endpoint's attempts.
    fn enqueue(&mut self, index: usize, copy: Record, key: String, origin: Origin) {
        let max_attempts = self.endpoints[index].endpoint.max_retries.saturating_add(1);
        self.live.insert(key.clone());
        self.endpoints[index].queue.push_back(Job {
            record: Arc::new(copy),
            key,
            origin,
            attempts: 0,
            max_attempts,
            replay: false,
        });
    }

    /// Start the requests the endpoints have room for.
    fn pump(&mut self) {
        if self.stopping {
            return;
        }
        for index in 0..self.endpoints.len() {
            loop {
                let state = &mut self.endpoints[index];
                if state.queue.is_empty() {
                    break;
                }
                let batching = state.endpoint.batch && !state.no_batch;
                let jobs: Vec<Job> = if batching {
                    if state.in_flight > 0 {
                        break;
                    }
                    let n = state.queue.len().min(MAX_BATCH_ITEMS);
                    state.queue.drain(..n).collect()
                } else {
                    if state.in_flight >= MAX_SINGLE_IN_FLIGHT {
                        break;
                    }
                    state.queue.pop_front().into_iter().collect()
                };
                self.start(index, jobs, batching);
            }
        }
    }

    fn start(&mut self, index: usize, jobs: Vec<Job>, batching: bool) {
        let request = self.next_request;
        self.next_request += 1;
        self.counts.requests += 1;
        self.endpoints[index].in_flight += 1;
        let records: Vec<Arc<Record>> = jobs.iter().map(|j| j.record.clone()).collect();
        self.requests.insert(request, (index, jobs));
        let endpoint = self.endpoints[index].endpoint.clone();
        let clients = self.clients.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let outcomes = if batching {
                clients.send_batch(&endpoint, &records).await
            } else {
                Ok(vec![clients.send_one(&endpoint, &records[0]).await])
            };
            let _ = done.send(Done { request, outcomes });
        });
    }

    fn settle_request(&mut self, done: Done) {
        let Some((index, jobs)) = self.requests.remove(&done.request) else {
            return;
        };
        self.endpoints[index].in_flight -= 1;
        match done.outcomes {
            Err(why) => {
                let state = &mut self.endpoints[index];
                tracing::warn!(
                    "{} has no batch URL ({why}): sending its events one by one (set dovepush_batch = no for it)",
                    state.endpoint.display_url
                );
                state.no_batch = true;
                for job in jobs.into_iter().rev() {
                    state.queue.push_front(job);
                }
            }
            Ok(outcomes) => {
                for (job, attempt) in jobs.into_iter().zip(outcomes) {
                    self.settle(index, job, attempt);
                }
            }
        }
    }

    fn settle(&mut self, index: usize, mut job: Job, attempt: Attempt) {
        let url = self.endpoints[index].endpoint.display_url.clone();
        let record = job.record.clone();
        match attempt {
            Attempt::Delivered => {
                self.counts.sent += 1;
                if self.debug {
                    tracing::info!(user = %record.user, "event {} sent to {url}", record.id);
                }
                self.complete(job);
                if self.queue_waiting && self.replaying == 0 {
                    let soon = Instant::now() + REPLAY_AFTER_SUCCESS;
                    self.next_round = self.next_round.min(soon);
                }
            }
            Attempt::Final(why) => {
                self.counts.refused += 1;
                tracing::error!(
                    user = %record.user,
                    "{url} refused event {}: {why}; not retried",
                    record.id
                );
                self.complete(job);
            }
            Attempt::Retry(why) => {
                job.attempts += 1;
                if job.replay {
                    // The receiver still fails: this endpoint's round ends here.
                    self.end_replay_for(index);
                    self.let_go(job);
                    return;
                }
                let kept = self.keep(&mut job);
                if job.attempts < job.max_attempts {
                    let at = Instant::now() + backoff(job.attempts - 1);
                    self.delay(at, index, job);
                } else if kept {
                    tracing::warn!(
                        user = %record.user,
                        "event {} for {url} waits in {} ({} attempts failed, last: {why}); it is sent when the receiver answers again",
                        record.id,
                        self.spool.queue.display(),
                        job.attempts
                    );
                    self.queue_waiting = true;
                    self.live.remove(&job.key);
                } else {
                    // Not on disk (the spool failed): keep trying from memory.
                    let at = Instant::now() + self.spool.settings.retry_interval;
                    self.delay(at, index, job);
                }
            }
        }
    }

    fn delay(&mut self, at: Instant, index: usize, job: Job) {
        self.next_delayed += 1;
        self.delayed.insert((at, self.next_delayed), (index, job));
    }

    fn release_delayed(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (index, job) = entry.remove();
            self.endpoints[index].queue.push_back(job);
        }
    }

    /// Make sure `queue/` holds the event (and then acknowledge it). False when it could
    /// not be written.
    fn keep(&mut self, job: &mut Job) -> bool {
        if matches!(job.origin, Origin::Queued(_)) {
            return true;
        }
        match self.spool.persist(&job.record) {
            Ok(path) => {
                self.counts.persisted += 1;
                // The plugin's copy is no longer needed (once every job of it is kept).
                job.origin = Origin::Queued(path);
                true
            }
            Err(e) => {
                tracing::error!(
                    user = %job.record.user,
                    "event {} cannot be written to {}: {e}; it is kept in memory only",
                    job.record.id,
                    self.spool.queue.display()
                );
                false
            }
        }
    }

    /// The event is settled: sent, or refused for good.
    fn complete(&mut self, job: Job) {
        if job.replay {
            self.replaying = self.replaying.saturating_sub(1);
            self.counts.replayed += 1;
        }
        self.live.remove(&job.key);
        self.recent.insert(job.key, Instant::now());
        // A socket record is acknowledged when its last job lets go of it.
        if let Origin::Queued(path) = job.origin {
            Spool::remove(&path);
        }
    }

    /// Stop holding a queued event in memory (its file stays for a later round).
    fn let_go(&mut self, job: Job) {
        if job.replay {
            self.replaying = self.replaying.saturating_sub(1);
        }
        self.live.remove(&job.key);
        self.queue_waiting = true;
    }

    fn end_replay_for(&mut self, index: usize) {
        let state = &mut self.endpoints[index];
        state.replay_blocked = true;
        let (replayed, others): (Vec<Job>, Vec<Job>) =
            state.queue.drain(..).partition(|j| j.replay);
        state.queue = others.into();
        for job in replayed {
            self.let_go(job);
        }
    }

    /// Load the oldest records of `queue/` that are not in memory and queue them.
    fn replay_round(&mut self) {
        self.next_round = Instant::now() + self.spool.settings.retry_interval;
        for state in &mut self.endpoints {
            state.replay_blocked = false;
        }
        match self.spool.enforce_limits(&self.live) {
            Ok(d) if d.too_old + d.over_size > 0 => tracing::error!(
                "spool {}: dropped {} events older than {:?} and {} beyond the size limit of {} bytes",
                self.spool.queue.display(),
                d.too_old,
                self.spool.settings.max_age,
                d.over_size,
                self.spool.settings.max_size
            ),
            Ok(_) => {}
            Err(e) => tracing::error!("spool {}: cannot read: {e}", self.spool.queue.display()),
        }
        let files = match self.spool.queued() {
            Ok(files) => files,
            Err(e) => {
                tracing::error!("spool {}: cannot read: {e}", self.spool.queue.display());
                return;
            }
        };
        let (mut loaded, mut foreign) = (0usize, 0usize);
        for path in files {
            if loaded >= REPLAY_CHUNK {
                break;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if self.live.contains(&name) {
                continue;
            }
            let record = match Spool::load(&path) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(
                        "spool file {} is not a record ({e}); set aside",
                        path.display()
                    );
                    self.spool.set_aside(&path);
                    continue;
                }
            };
            let Some(&index) = record.endpoint.as_ref().and_then(|e| self.by_url.get(e)) else {
                foreign += 1;
                continue;
            };
            if self.recent.contains(&name) {
                Spool::remove(&path);
                continue;
            }
            self.live.insert(name.clone());
            self.replaying += 1;
            loaded += 1;
            self.endpoints[index].queue.push_back(Job {
                record: Arc::new(record),
                key: name,
                origin: Origin::Queued(path),
                attempts: 0,
                max_attempts: 1,
                replay: true,
            });
        }
        if foreign > 0 {
            tracing::warn!(
                "spool {}: {foreign} events for endpoints no longer configured wait there until dovepush_spool_max_age",
                self.spool.queue.display()
            );
        }
        self.queue_waiting = loaded >= REPLAY_CHUNK;
        if loaded >= REPLAY_CHUNK {
            // More wait: the next round starts as soon as this one is settled.
            self.next_round = Instant::now();
        }
        if loaded > 0 {
            tracing::info!(
                "replaying {loaded} events from {}",
                self.spool.queue.display()
            );
        }
    }

    /// Take what mail processes dropped into `drop/`: a copy per endpoint goes to
    /// `queue/` and is queued, then the dropped file goes.
    fn claim_drops(&mut self) {
        let claims = match self.spool.claim_drops(&self.trust, &uid_of) {
            Ok(claims) => claims,
            Err(e) => {
                tracing::error!("spool {}: cannot read: {e}", self.spool.drop.display());
                return;
            }
        };
        for refusal in claims.refused {
            tracing::warn!(
                "spool {}: {} of uid {} refused ({}); {}",
                self.spool.drop.display(),
                refusal.name,
                refusal.owner.map_or("?".to_string(), |u| u.to_string()),
                refusal.why,
                refusal.action
            );
        }
        for (dropped, record) in claims.claimed {
            let mut all_kept = true;
            // Copies already held or sent are the plugin's copies of socket records.
            for (index, copy, key) in self.fresh_copies(&record) {
                match self.spool.persist(&copy) {
                    Ok(path) => {
                        self.counts.persisted += 1;
                        self.enqueue(index, copy, key, Origin::Queued(path));
                    }
                    Err(e) => {
                        tracing::error!(
                            user = %record.user,
                            "event {} cannot be written to {}: {e}; it stays in {}",
                            record.id,
                            self.spool.queue.display(),
                            self.spool.drop.display()
                        );
                        all_kept = false;
                    }
                }
            }
            if all_kept {
                Spool::remove(&dropped);
            }
        }
    }

    /// Write the records of connection `conn` still held only in memory to `queue/`.
    fn keep_records_of(&mut self, conn: u64) {
        let of_conn = |job: &Job| matches!(&job.origin, Origin::Socket(ack) if ack.conn() == conn);
        let spool = &self.spool;
        let counts = &mut self.counts;
        let mut keep = |job: &mut Job| {
            if !of_conn(job) {
                return;
            }
            match spool.persist(&job.record) {
                Ok(path) => {
                    counts.persisted += 1;
                    job.origin = Origin::Queued(path);
                }
                Err(e) => tracing::error!(
                    user = %job.record.user,
                    "event {} cannot be written to {}: {e}",
                    job.record.id,
                    spool.queue.display()
                ),
            }
        };
        for state in &mut self.endpoints {
            state.queue.iter_mut().for_each(&mut keep);
        }
        for (_, job) in self.delayed.values_mut() {
            keep(job);
        }
        for (_, jobs) in self.requests.values_mut() {
            jobs.iter_mut().for_each(&mut keep);
        }
    }

    /// At exit: everything still held only in memory goes to `queue/` and is
    /// acknowledged; events in flight keep their files for the next start.
    fn keep_everything(&mut self) {
        let mut held: Vec<Job> = Vec::new();
        for state in &mut self.endpoints {
            held.extend(state.queue.drain(..));
        }
        held.extend(
            std::mem::take(&mut self.delayed)
                .into_values()
                .map(|(_, job)| job),
        );
        held.extend(self.requests.drain().flat_map(|(_, (_, jobs))| jobs));
        let mut kept = 0;
        for mut job in held {
            if self.keep(&mut job) {
                kept += 1;
            }
        }
        if kept > 0 {
            tracing::info!(
                "stopping: {kept} unsent events are kept in {}",
                self.spool.queue.display()
            );
        }
    }
}
