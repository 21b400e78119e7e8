//! dovepush's Dovecot plugin (`lib20_dovepush_plugin.so`).
//!
//! On each MTA delivery (LMTP, LDA) into a watched mailbox of a user who has the ox
//! driver's METADATA subscription, it copies the facts out of Dovecot and hands one
//! record per mail to the sender service (`service dovepush`, the `dovepush-sender`
//! binary): one non-blocking write to its socket, or a file in its drop spool when the
//! socket cannot take it. The plugin never waits, forks, starts a thread or touches the
//! network; the service sends to the endpoints its own settings name, retries and
//! spools. So the plugin needs no endpoint setting (`dovepush_url` and its password can
//! live in a file only root reads).
//!
//! Loaded in `imap` as well, it reports what an IMAP command did to a watched mailbox's
//! unseen count (`\Seen` set or cleared, unseen mails expunged or moved out, unseen
//! mails appended, copied or moved in) as one `messageRead`, `messageExpunge` or
//! `messageAppend` record per command ([`badge`]). The service sends those only to
//! endpoints whose `dovepush_events` names them.
//!
//! Modules: [`subscription`] (the METADATA cache), [`event`] (event ids), [`client`]
//! (the service's socket and the drop spool), [`badge`] (which changes are events). The settings are `dovepush-settings`', the
//! wire formats `dovepush-protocol`'s. This file only wires them to Dovecot's hooks
//! through `dovepush-ffi`; everything else is safe Rust tested without Dovecot.

#![deny(unsafe_code)] // the module symbols dovecot_plugin! exports are the one exception

pub mod badge;
pub mod client;
pub mod event;
pub mod subscription;

pub use dovepush_settings as config;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dovepush_ffi::{Change, Commit, LogLevel, Mailbox, Plugin, SavedMail, User};
use dovepush_protocol::notification::{EventKind, Notification};
use dovepush_protocol::record::Record;

use crate::client::{Handed, ServiceClient, DROP_DIR, SOCKET_NAME};
use crate::config::Config;
use crate::event::EventIds;
use crate::subscription::{Subscription, SubscriptionCache, METADATA_KEY};

/// A parsed configuration with what is derived from it once.
struct Active {
    config: Config,
    /// `<dovepush_spool_dir>/drop`.
    drop_dir: Arc<PathBuf>,
}

/// The plugin's per-process state (lives on Dovecot's thread).
pub struct Dovepush {
    client: ServiceClient,
    /// The service's socket, from the first user's `base_dir`.
    socket: Option<PathBuf>,
    /// Parsed configs by their raw settings, so each distinct config is parsed (and its
    /// problems reported) once per process.
    configs: HashMap<Vec<(String, String)>, Arc<Active>>,
    subscriptions: SubscriptionCache,
    ids: EventIds,
    /// What [`raw_settings`] asks for.
    setting_names: Vec<String>,
}

/// One followed change transaction (an IMAP command's) of a watched mailbox.
pub struct Followed {
    username: String,
    folder: String,
    subscriber: String,
    active: Arc<Active>,
}

/// One followed delivery transaction.
pub struct Delivery {
    username: String,
    folder: String,
    subscriber: String,
    active: Arc<Active>,
    mails: Vec<SavedMail>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The names the plugin asks Dovecot for: the fixed names plus the numbered ox lines of
/// 2.3 (for their `cache_lifetime`; 2.4 has none). The `dovepush_url`s are the
/// service's alone.
fn setting_names() -> Vec<String> {
    let mut names: Vec<String> = config::SETTING_NAMES
        .iter()
        .map(|n| n.to_string())
        .collect();
    names.push("dovepush".into());
    names.extend((2..=config::MAX_ENDPOINTS).map(|n| format!("dovepush{n}")));
    names
}

/// The raw `dovepush*` settings of a user that are set (empty values left out). When
/// Dovecot cannot give them (2.4: `settings_get()` failed), the error is logged and
/// the defaults apply.
fn raw_settings(user: &User<'_>, names: &[String]) -> Vec<(String, String)> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    match user.settings(&names) {
        Ok(mut raw) => {
            raw.retain(|(_, value)| !value.is_empty());
            raw
        }
        Err(e) => {
            user.log(
                LogLevel::Error,
                &format!("cannot read the dovepush settings, using the defaults: {e}"),
            );
            Vec::new()
        }
    }
}

/// Log what happened to records that did not go to the socket.
fn report(log: &dyn Fn(LogLevel, &str), handed: &Handed, record: &Record) {
    match handed {
        Handed::Socket => {}
        Handed::Dropped { path, why } => log(
            LogLevel::Warning,
            &format!(
                "{why}: event {} left in {}",
                record.id,
                path.parent().unwrap_or(Path::new("")).display()
            ),
        ),
        Handed::Lost { why } => log(
            LogLevel::Error,
            &format!("{why}: event {} is lost", record.id),
        ),
    }
}

impl Dovepush {
    /// The service's socket (from the first followed user's `base_dir`).
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/dovecot").join(SOCKET_NAME))
    }

    /// Hand one record to the service (or the drop spool), logging what did not go to
    /// the socket.
    fn hand_over(&mut self, active: &Active, log: &dyn Fn(LogLevel, &str), record: Record) {
        let socket = self.socket();
        self.client.set_max_pending(active.config.queue_size);
        let (handed, spilled) = self
            .client
            .submit(&socket, &active.drop_dir, record.clone());
        for earlier in &spilled {
            if let Handed::Lost { why } = earlier {
                log(LogLevel::Error, &format!("an earlier event is lost: {why}"));
            }
        }
        if !spilled.is_empty() {
            log(
                LogLevel::Warning,
                &format!(
                    "{} events the sender service had not taken yet were left in {}",
                    spilled.len(),
                    active.drop_dir.display()
                ),
            );
        }
        report(log, &handed, &record);
    }

    /// The user's subscriber identity when `mailbox` is watched and the user subscribed
    /// (`what` begins the debug line: `delivery to`); remembers the socket's place.
    fn follow(
        &mut self,
        user: &User<'_>,
        mailbox: &Mailbox<'_>,
        what: &str,
    ) -> Option<(Arc<Active>, String, String, String)> {
        let active = self.active_config(user);
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
        if self.socket.is_none() {
            let base_dir = user.base_dir().unwrap_or_else(|| "/run/dovecot".into());
            self.socket = Some(Path::new(&base_dir).join(SOCKET_NAME));
        }
        Self::debug(
            &active,
            user,
            &format!("{what} {folder} followed (subscriber {subscriber})"),
        );
        Some((active, username, folder, subscriber))
    }

    fn debug(active: &Active, user: &User<'_>, text: &str) {
        if active.config.debug {
            user.log(LogLevel::Info, &format!("debug: {text}"));
        } else {
            user.log(LogLevel::Debug, text);
        }
    }

    fn active_config(&mut self, user: &User<'_>) -> Arc<Active> {
        let raw = raw_settings(user, &self.setting_names);
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
            drop_dir: Arc::new(config.spool.dir.join(DROP_DIR)),
            config,
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
        let subscription = match found.as_deref().map(Subscription::parse) {
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
}

impl Plugin for Dovepush {
    type Delivery = Delivery;
    type Change = Followed;

    fn init() -> Self {
        Dovepush {
            client: ServiceClient::new(config::DEFAULT_QUEUE_SIZE),
            socket: None,
            configs: HashMap::new(),
            subscriptions: SubscriptionCache::default(),
            ids: EventIds::new(),
            setting_names: setting_names(),
        }
    }

    fn deinit(mut self) {
        // Records the service acknowledged are its own; a live connection keeps the
        // rest (the service reads them after this process is gone); a broken one's go to
        // the drop spool.
        let log = |level: LogLevel, text: &str| dovepush_ffi::log(level, text);
        for handed in self.client.finish() {
            if let Handed::Lost { why } = &handed {
                log(LogLevel::Error, &format!("an event is lost: {why}"));
            }
        }
    }

    fn delivery_begin(&mut self, user: &User<'_>, mailbox: &Mailbox<'_>) -> Option<Delivery> {
        let (active, username, folder, subscriber) = self.follow(user, mailbox, "delivery to")?;
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
        let created_ms = now_ms();
        for (i, mail) in delivery.mails.into_iter().enumerate() {
            let uid = commit.uids.get(i).copied().unwrap_or(0);
            if uid == 0 {
                log(
                    LogLevel::Warning,
                    &format!("no UID could be found for a mail in {}", delivery.folder),
                );
            }
            let body = Notification {
                user: delivery.username.clone(),
                event: EventKind::MessageNew,
                folder: delivery.folder.clone(),
                uidvalidity: commit.uid_validity,
                uid,
                from: mail.from.clone(),
                subject: mail.subject.clone(),
                snippet: mail.snippet.clone(),
                unseen,
                time_ms: None,
            }
            .within_limits();
            let record = Record::new(
                self.ids.next(),
                delivery.username.clone(),
                delivery.subscriber.clone(),
                created_ms,
                body,
            );
            self.hand_over(&active, &log, record);
        }
    }

    fn change_begin(&mut self, user: &User<'_>, mailbox: &Mailbox<'_>) -> Option<Followed> {
        let (active, username, folder, subscriber) =
            self.follow(user, mailbox, "unseen change in")?;
        Some(Followed {
            username,
            folder,
            subscriber,
            active,
        })
    }

    fn change_commit(
        &mut self,
        change: Followed,
        user: &User<'_>,
        _mailbox: &Mailbox<'_>,
        facts: &Change,
    ) {
        let log = |level: LogLevel, text: &str| user.log(level, text);
        let (event, unseen) = match badge::badge_event(facts) {
            Ok(found) => found,
            Err(badge::Skip::UnseenUnchanged) => {
                Self::debug(
                    &change.active,
                    user,
                    &format!("unseen count of {} unchanged: no event", change.folder),
                );
                return;
            }
            Err(badge::Skip::UnseenUnknown) => {
                log(
                    LogLevel::Warning,
                    &format!(
                        "unseen count of {} unavailable: no badge event",
                        change.folder
                    ),
                );
                return;
            }
        };
        let created_ms = now_ms();
        let body = Notification {
            user: change.username.clone(),
            event,
            folder: change.folder,
            uidvalidity: facts.uid_validity,
            uid: facts.last_uid,
            from: None,
            subject: None,
            snippet: None,
            unseen: Some(unseen),
            // Orders crossing badge events at the receiver.
            time_ms: Some(created_ms),
        };
        let record = Record::new(
            self.ids.next(),
            change.username,
            change.subscriber,
            created_ms,
            body,
        );
        Self::debug(
            &change.active,
            user,
            &format!("{event} event {} (unseen {unseen})", record.id),
        );
        let active = change.active.clone();
        self.hand_over(&active, &log, record);
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
