//! dovepush's Dovecot plugin (`lib20_dovepush_plugin.so`).
//!
//! On each MTA delivery (LMTP, LDA) into a watched mailbox of a user who has the ox
//! driver's METADATA subscription, it copies the facts out of Dovecot and hands one
//! ox-compatible notification per endpoint to a background sender. The delivery never
//! waits for the network; what cannot be sent is spooled and sent later.
//!
//! Modules: [`config`] (settings), [`subscription`] (METADATA value and cache),
//! [`event`] (the JSON body), [`job`] (a send unit), [`sender`] (sending, retries,
//! replays), [`process`] (the sender process it runs in), [`spool`] (on-disk fallback). This file only wires them to Dovecot's hooks through
//! `dovepush-ffi`; everything else is safe Rust tested without Dovecot.

#![deny(unsafe_code)]

pub mod config;
pub mod event;
pub mod job;
#[allow(unsafe_code)] // fork, socket and signal calls (libc)
pub mod process;
pub mod sender;
pub mod spool;
pub mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovepush_ffi::{Commit, LogLevel, Mailbox, Plugin, SavedMail, User};

use crate::config::{Config, Endpoint};
use crate::event::{Event, EventIds};
use crate::job::{now_ms, Job};
use crate::process::Sender;
use crate::sender::Submission;
use crate::spool::Spool;
use crate::subscription::{SubscriptionCache, METADATA_KEY};

/// A parsed configuration with what is derived from it once.
struct Active {
    config: Config,
    endpoints: Vec<Arc<Endpoint>>,
    spool: Arc<Spool>,
    /// Whether this process has looked at the spool (at its first delivery with this
    /// config) for records left by earlier processes.
    spool_looked_at: AtomicBool,
}

/// The plugin's per-process state (lives on Dovecot's thread).
pub struct Dovepush {
    sender: Option<Sender>,
    /// Parsed configs by their raw settings, so each distinct config is parsed (and its
    /// problems reported) once per process.
    configs: HashMap<Vec<(String, String)>, Arc<Active>>,
    subscriptions: SubscriptionCache,
    ids: EventIds,
    /// Longest endpoint timeout seen: the bound of the flush at deinit.
    flush: Duration,
}

/// One followed delivery transaction.
pub struct Delivery {
    username: String,
    folder: String,
    subscriber: String,
    active: Arc<Active>,
    mails: Vec<SavedMail>,
}

/// The raw `dovepush*` settings of a user: the fixed names plus the numbered endpoints.
fn raw_settings(user: &User<'_>) -> Vec<(String, String)> {
    let mut raw = Vec::new();
    let mut add = |name: String| -> bool {
        match user.setting(&name) {
            Some(value) if !value.is_empty() => {
                raw.push((name, value));
                true
            }
            _ => false,
        }
    };
    for name in config::SETTING_NAMES {
        add(name.to_string());
    }
    for base in ["dovepush", "dovepush_url"] {
        for n in 1..=config::MAX_ENDPOINTS {
            let name = if n == 1 {
                base.to_string()
            } else {
                format!("{base}{n}")
            };
            if !add(name) {
                break;
            }
        }
    }
    raw
}

impl Dovepush {
    fn flush_logs(&mut self) {
        if let Some(sender) = &mut self.sender {
            for line in sender.take_logs() {
                dovepush_ffi::log(line.level, &line.text);
            }
        }
    }

    fn debug(active: &Active, user: &User<'_>, text: &str) {
        if active.config.debug {
            user.log(LogLevel::Info, &format!("debug: {text}"));
        } else {
            user.log(LogLevel::Debug, text);
        }
    }

    fn active_config(&mut self, user: &User<'_>) -> Arc<Active> {
        let raw = raw_settings(user);
        if let Some(active) = self.configs.get(&raw) {
            return active.clone();
        }
        let map: HashMap<String, String> = raw.iter().cloned().collect();
        let get = |name: &str| map.get(name).cloned();
        let (config, problems) = Config::from_settings(&get, dovepush_ffi::DOVECOT_STATE_DIR);
        for problem in problems {
            user.log(LogLevel::Error, &problem.to_string());
        }
        let active = Arc::new(Active {
            endpoints: config.endpoints.iter().cloned().map(Arc::new).collect(),
            spool: Arc::new(Spool::new(config.spool.clone())),
            config,
            spool_looked_at: AtomicBool::new(false),
        });
        if self.configs.len() > 64 {
            self.configs.clear();
        }
        self.configs.insert(raw, active.clone());
        active
    }

    /// The subscriber identity (`user=` of the METADATA), or `None` when the user has
    /// no (usable) subscription.
    fn subscriber(
        &mut self,
        active: &Active,
        user: &User<'_>,
        mailbox: &Mailbox<'_>,
        username: &str,
    ) -> Option<String> {
        let now = Instant::now();
        let config = &active.config;
        if let Some(cached) = self.subscriptions.get(
            username,
            now,
            config.cache_lifetime,
            config.negative_cache_lifetime,
        ) {
            return cached.map(|s| s.user);
        }
        let found = match mailbox.server_metadata(METADATA_KEY) {
            Ok(found) => found,
            Err(e) => {
                user.log(
                    LogLevel::Error,
                    &format!("push skipped: cannot read the http-notify METADATA: {e}"),
                );
                return None;
            }
        };
        let subscription = match found.as_deref().map(subscription::parse) {
            None => {
                Self::debug(
                    active,
                    user,
                    "push skipped: no http-notify METADATA subscription",
                );
                None
            }
            Some(Ok(subscription)) => Some(subscription),
            Some(Err(e)) => {
                user.log(LogLevel::Error, &format!("push skipped: {e}"));
                None
            }
        };
        self.subscriptions
            .insert(username, now, subscription.clone());
        subscription.map(|s| s.user)
    }

    /// A new process sends what earlier ones left in the spool: at its first delivery
    /// with a config, whoever it is for, it starts its sender if the spool holds records
    /// and names the endpoints to it (the sender then replays their records).
    fn replay_at_start(&mut self, active: &Active, user: &User<'_>) {
        if active.spool_looked_at.swap(true, Ordering::Relaxed) || !active.spool.holds_records() {
            return;
        }
        let log = |level: LogLevel, text: &str| user.log(level, text);
        let mut flush = self.flush;
        let Some(sender) = self.sender_running(active.config.queue_size, &log) else {
            return;
        };
        for endpoint in &active.endpoints {
            if let Err(why) = sender.announce(endpoint, &active.spool, active.config.debug) {
                log(
                    LogLevel::Warning,
                    &format!("cannot ask the sender to replay the spool: {why}"),
                );
                break;
            }
            flush = flush.max(endpoint.timeout);
        }
        self.flush = flush;
    }

    /// The sender process, started (again) if need be.
    fn sender_running(
        &mut self,
        queue_size: usize,
        log: &dyn Fn(LogLevel, &str),
    ) -> Option<&mut Sender> {
        if self.sender.as_ref().is_some_and(Sender::is_gone) {
            self.flush_logs();
            dovepush_ffi::watch_fd(None);
            self.sender = None;
            log(
                LogLevel::Warning,
                "the sender process has exited; starting a new one",
            );
        }
        if self.sender.is_none() {
            match Sender::start(queue_size) {
                Ok(sender) => {
                    // Its log lines reach Dovecot's log as they come, between deliveries
                    // too.
                    dovepush_ffi::watch_fd(Some(sender.log_fd()));
                    self.sender = Some(sender);
                }
                Err(e) => log(
                    LogLevel::Error,
                    &format!("cannot start the sender process: {e}; spooling instead"),
                ),
            }
        }
        self.sender.as_mut()
    }

    fn submit(&mut self, submission: Submission, queue_size: usize, log: &dyn Fn(LogLevel, &str)) {
        let refused = match self.sender_running(queue_size, log) {
            Some(sender) => sender.submit(&submission).err(),
            None => Some(process::Refused::Gone("it could not be started".into())),
        };
        if let Some(why) = refused {
            let job = &submission.job;
            match submission.spool.store(job) {
                Ok(_) => log(
                    LogLevel::Warning,
                    &format!(
                        "{why}: event {} spooled in {}",
                        job.event_id,
                        submission.spool.dir().display()
                    ),
                ),
                Err(e) => log(
                    LogLevel::Error,
                    &format!(
                        "{why} and event {} could not be spooled in {}: {e}",
                        job.event_id,
                        submission.spool.dir().display()
                    ),
                ),
            }
        }
    }
}

impl Plugin for Dovepush {
    type Delivery = Delivery;

    fn init() -> Self {
        Dovepush {
            sender: None,
            configs: HashMap::new(),
            subscriptions: SubscriptionCache::default(),
            ids: EventIds::new(),
            // Raised to the longest timeout of the endpoints jobs went to.
            flush: Duration::ZERO,
        }
    }

    fn deinit(mut self) {
        self.flush_logs();
        if let Some(sender) = self.sender.take() {
            for line in sender.shutdown(self.flush) {
                dovepush_ffi::log(line.level, &line.text);
            }
        }
    }

    fn fd_readable(&mut self) {
        self.flush_logs();
        if self.sender.as_ref().is_some_and(Sender::is_gone) {
            // Its socket stays readable (closed): the next job starts a new sender.
            dovepush_ffi::watch_fd(None);
        }
    }

    fn delivery_begin(&mut self, user: &User<'_>, mailbox: &Mailbox<'_>) -> Option<Delivery> {
        self.flush_logs();
        let active = self.active_config(user);
        if active.endpoints.is_empty() {
            return None;
        }
        self.replay_at_start(&active, user);
        let folder = mailbox.vname();
        if !active.config.watches(&folder) {
            Self::debug(
                &active,
                user,
                &format!("push skipped: {folder} is not a watched mailbox"),
            );
            return None;
        }
        let username = user.name();
        let subscriber = self.subscriber(&active, user, mailbox, &username)?;
        Self::debug(
            &active,
            user,
            &format!("delivery to {folder} followed (subscriber {subscriber})"),
        );
        Some(Delivery {
            username,
            folder,
            subscriber,
            active,
            mails: Vec::new(),
        })
    }

    fn mail_saved(&mut self, delivery: &mut Delivery, mail: &SavedMail) {
        delivery.mails.push(mail.clone());
    }

    fn delivery_commit(
        &mut self,
        delivery: Delivery,
        user: Option<&User<'_>>,
        mailbox: Option<&Mailbox<'_>>,
        commit: &Commit,
    ) {
        let username = delivery.username.clone();
        let log = |level: LogLevel, text: &str| match user {
            Some(user) => user.log(level, text),
            None => dovepush_ffi::log(level, &format!("user {username}: {text}")),
        };
        let unseen = match commit
            .unseen
            .map(Ok)
            .or_else(|| mailbox.map(Mailbox::unseen))
        {
            Some(Ok(n)) => Some(n),
            Some(Err(e)) => {
                log(LogLevel::Warning, &format!("unseen count unavailable: {e}"));
                None
            }
            None => None,
        };
        let active = delivery.active.clone();
        for endpoint in &active.endpoints {
            self.flush = self.flush.max(endpoint.timeout);
        }
        let created_ms = now_ms();
        for (i, mail) in delivery.mails.into_iter().enumerate() {
            let uid = commit.uids.get(i).copied().unwrap_or(0);
            if uid == 0 {
                log(
                    LogLevel::Warning,
                    &format!("no UID could be found for a mail in {}", delivery.folder),
                );
            }
            let event_id = self.ids.next();
            for endpoint in &active.endpoints {
                let event = Event {
                    id: event_id.clone(),
                    user: if endpoint.user_from_metadata {
                        delivery.subscriber.clone()
                    } else {
                        delivery.username.clone()
                    },
                    folder: delivery.folder.clone(),
                    uid_validity: commit.uid_validity,
                    uid,
                    from: mail.from.clone(),
                    subject: mail.subject.clone(),
                    snippet: mail.snippet.clone(),
                    unseen,
                };
                let submission = Submission {
                    job: Job {
                        event_id: event_id.clone(),
                        user: delivery.username.clone(),
                        endpoint: endpoint.clone(),
                        body: event.to_json(),
                        created_ms,
                    },
                    spool: active.spool.clone(),
                    debug: active.config.debug,
                };
                self.submit(submission, active.config.queue_size, &log);
            }
        }
    }
}

dovepush_ffi::dovecot_plugin!(
    Dovepush,
    version: dovepush_plugin_version,
    dependencies: dovepush_plugin_dependencies,
    init: dovepush_plugin_init,
    deinit: dovepush_plugin_deinit,
    requires: ["notify"]
);
