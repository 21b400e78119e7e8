//! From TOML text to a validated [`Config`], naming every bad key at once.
//!
//! Two steps. [`read_file`] deserializes the text into [`ConfigFile`] (serde,
//! `deny_unknown_fields`); where serde stops at a bad key, that key is noted and taken out
//! (a missing required key gets a blank stand-in) and the file is read again, until it
//! reads. [`check`] then runs every rule on the typed values: required keys, ranges,
//! secrets and their files, and for each app with a transport, building its push senders
//! (key files readable, endpoints well-formed). Problems are listed in the order the keys
//! are declared in [`super::file`], unknown keys after the known ones of their table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dovepush_push::{AppConfig, Pusher};
use serde_path_to_error::Segment;
use toml::{Table, Value};

use super::file::{table_keys, ConfigFile};
use super::*;

/// Problems found so far; at most one per key, and none under a key whose value was
/// refused (a table that is no table, a bad array entry).
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<ConfigProblem>);

impl Problems {
    pub(super) fn bad(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if !self.reported(&key) {
            self.0.push(ConfigProblem {
                key,
                message: message.into(),
            });
        }
    }

    /// Whether `key` or a table it is in has a problem (a missing section does not hide
    /// its keys: they are missing too).
    fn reported(&self, key: &str) -> bool {
        self.0.iter().any(|p| {
            key == p.key
                || (p.message != MISSING_SECTION
                    && key
                        .strip_prefix(p.key.as_str())
                        .is_some_and(|rest| rest.starts_with(['.', '['])))
        })
    }

    /// Whether a problem was reported at or under `key`.
    fn any_under(&self, key: &str) -> bool {
        self.0.iter().any(|p| {
            p.key == key
                || p.key
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    }

    /// The problems in the declared order of their keys.
    pub(super) fn sorted(mut self) -> Vec<ConfigProblem> {
        self.0.sort_by_cached_key(|p| rank(&p.key));
        self.0
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where `key` (`apps[1].apns.colour`) comes in the file's declared order: per segment, the
/// key's index in its table (unknown keys after the known ones, by name) or the array index.
fn rank(key: &str) -> Vec<(usize, String)> {
    let mut table = String::new();
    let mut rank = Vec::new();
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, index)) => (name, index.trim_end_matches(']').parse().ok()),
            None => (part, None),
        };
        let keys = table_keys(&table).unwrap_or_default();
        match keys.iter().position(|k| *k == name) {
            Some(i) => rank.push((i, String::new())),
            None => rank.push((keys.len(), name.to_owned())),
        }
        if let Some(i) = index {
            rank.push((i, String::new()));
        }
        if !table.is_empty() {
            table.push('.');
        }
        table.push_str(name);
    }
    rank
}

/// One segment of a key path as serde_path_to_error reports it.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn key_of(steps: &[Step]) -> String {
    let mut key = String::new();
    for step in steps {
        match step {
            Step::Key(k) if key.is_empty() => key.push_str(k),
            Step::Key(k) => {
                key.push('.');
                key.push_str(k);
            }
            Step::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    key
}

/// The value at `steps` below `root`, and the step to it from its parent.
fn parent_of<'v>(root: &'v mut Value, steps: &[Step]) -> Option<(&'v mut Value, Step)> {
    let (last, parents) = steps.split_last()?;
    let mut at = root;
    for step in parents {
        at = match (step, at) {
            (Step::Key(k), Value::Table(t)) => t.get_mut(k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some((at, last.clone()))
}

/// The text between `prefix` and the next backtick in a serde message
/// (``missing field `topic` `` → `topic`).
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(&rest[..rest.find('`')?])
}

/// A serde message in the words of a config file: `expected u64` is a non-negative
/// integer, `expected struct ApnsConfig` a table.
fn in_config_words(message: &str) -> String {
    match message.split_once(", expected ") {
        Some((what, "u64" | "u32")) => format!("{what}, expected a non-negative integer"),
        Some((what, expected)) if expected.starts_with("struct ") => {
            format!("{what}, expected a table")
        }
        Some((what, "a sequence")) => format!("{what}, expected an array of tables"),
        _ => message.to_owned(),
    }
}

/// What a missing required key is told: dovepush-push's two keys say what they hold.
fn required(steps: &[Step]) -> &'static str {
    let names: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(k.as_str()),
            Step::Index(_) => None,
        })
        .collect();
    match names[..] {
        ["apps", "apns", "topic"] => "required (the app's bundle id)",
        ["apps", "fcm", "service_account_file"] => {
            "required (the service-account JSON from the Firebase console)"
        }
        ["apps", "webpush", "vapid_private_key_file"] => {
            "required (the app's VAPID key: a P-256 private key, PEM)"
        }
        ["apps", "webpush", "subject"] => {
            "required (the operator's contact for push services: \"mailto:…\")"
        }
        _ => "required",
    }
}

/// Deserializes `root` into the file's types, noting every key serde refuses; `None` if
/// some refusal could not be worked around (its problem is noted).
pub(super) fn read_file(root: Table, problems: &mut Problems) -> Option<ConfigFile> {
    let mut root = Value::Table(root);
    let mut stand_ins = HashSet::new();
    loop {
        let error = match serde_path_to_error::deserialize::<_, ConfigFile>(root.clone()) {
            Ok(file) => return Some(file),
            Err(e) => e,
        };
        let mut steps: Vec<Step> = error
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Map { key } => Some(Step::Key(key.clone())),
                Segment::Seq { index } => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        let message = error.into_inner().message().to_owned();
        if let Some(field) = quoted_after(&message, "missing field `") {
            // A required key: noted, and a blank stand-in lets the rest be read.
            steps.push(Step::Key(field.to_owned()));
            let key = key_of(&steps);
            problems.bad(&key, required(&steps));
            let Some((Value::Table(table), Step::Key(field))) = parent_of(&mut root, &steps) else {
                return None;
            };
            if !stand_ins.insert(key) {
                return None; // the stand-in was refused too
            }
            table.insert(field, Value::String(String::new()));
            continue;
        }
        let key = key_of(&steps);
        if quoted_after(&message, "unknown field `").is_some() {
            problems.bad(&key, "unknown key");
        } else {
            problems.bad(&key, in_config_words(&message));
        }
        match parent_of(&mut root, &steps) {
            Some((Value::Table(table), Step::Key(k))) => {
                table.remove(&k);
            }
            // A bad array entry becomes an empty table (its keys are then "required", and
            // not reported again under the entry's own problem).
            Some((Value::Array(entries), Step::Index(i))) if i < entries.len() => {
                entries[i] = Value::Table(Table::new());
            }
            _ => return None,
        }
    }
}

const MISSING_SECTION: &str = "required section is missing";

/// A secret given inline (`key`) or as a file (`key_file`).
enum SecretValue {
    Absent,
    /// Given, but unusable (reported).
    Bad,
    Given(Secret),
}

struct Checker<'a> {
    problems: Problems,
    base_dir: &'a Path,
}

impl Checker<'_> {
    fn resolve(&self, path: PathBuf) -> PathBuf {
        if path.is_absolute() {
            path
        } else {
            self.base_dir.join(path)
        }
    }

    /// A path key: not empty, resolved against the config file's directory.
    fn path(&mut self, key: &str, path: Option<PathBuf>) -> Option<PathBuf> {
        let path = path?;
        if path.as_os_str().is_empty() {
            self.problems.bad(key, "must not be empty");
            return None;
        }
        Some(self.resolve(path))
    }

    /// `prefix.name` inline or `prefix.name_file`, one of them.
    fn secret(
        &mut self,
        prefix: &str,
        name: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
    ) -> SecretValue {
        let key = format!("{prefix}.{name}");
        let file_key = format!("{key}_file");
        let file = self.path(&file_key, file);
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.problems.bad(
                    &file_key,
                    format!("give either `{name}` or `{name}_file`, not both"),
                );
                SecretValue::Bad
            }
            (Some(v), None) if v.is_empty() => {
                self.problems.bad(&key, "must not be empty");
                SecretValue::Bad
            }
            (Some(v), None) => SecretValue::Given(Secret::new(v)),
            (None, Some(f)) => match std::fs::read_to_string(&f) {
                Ok(v) => {
                    let v = v.trim_end_matches(['\n', '\r']);
                    if v.is_empty() {
                        self.problems
                            .bad(&file_key, format!("{} is empty", f.display()));
                        SecretValue::Bad
                    } else {
                        SecretValue::Given(Secret::new(v))
                    }
                }
                Err(e) => {
                    self.problems
                        .bad(&file_key, format!("cannot read {}: {e}", f.display()));
                    SecretValue::Bad
                }
            },
            (None, None) => SecretValue::Absent,
        }
    }

    /// A required secret.
    fn required_secret(
        &mut self,
        prefix: &str,
        name: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
    ) -> Option<Secret> {
        match self.secret(prefix, name, inline, file) {
            SecretValue::Given(s) => Some(s),
            SecretValue::Bad => None,
            SecretValue::Absent => {
                self.problems.bad(
                    format!("{prefix}.{name}"),
                    format!("required (or `{name}_file`)"),
                );
                None
            }
        }
    }

    /// A section that must be there (its keys are then checked as if it were empty).
    fn required_section<T: Default>(&mut self, name: &str, section: Option<T>) -> T {
        section.unwrap_or_else(|| {
            self.problems.bad(name, MISSING_SECTION);
            T::default()
        })
    }
}

/// Runs every rule on `file`; relative paths are resolved against `base_dir`.
pub(super) fn check(
    file: ConfigFile,
    base_dir: &Path,
    problems: Problems,
) -> Result<Checked, Problems> {
    let mut c = Checker { problems, base_dir };

    let server = file.server.unwrap_or_default();
    let listen = server
        .listen
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned())
        .parse::<SocketAddr>()
        .map_err(|_| {
            c.problems.bad(
                "server.listen",
                "expected an IP address and port, e.g. \"127.0.0.1:8025\"",
            )
        })
        .ok();
    let cert = c.path("server.tls_cert", server.tls_cert);
    let key = c.path("server.tls_key", server.tls_key);
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (Some(_), None) => {
            c.problems
                .bad("server.tls_key", "required when `server.tls_cert` is set");
            None
        }
        (None, Some(_)) => {
            c.problems
                .bad("server.tls_cert", "required when `server.tls_key` is set");
            None
        }
        (None, None) => None,
    };
    let seconds = |c: &mut Checker<'_>, key: &str, value: Option<u64>, default: u64| {
        let value = value.unwrap_or(default);
        if value == 0 {
            c.problems.bad(key, "must be at least 1");
        }
        Duration::from_secs(value)
    };
    let header_read_timeout = seconds(
        &mut c,
        "server.header_read_timeout_seconds",
        server.header_read_timeout_seconds,
        DEFAULT_HEADER_READ_TIMEOUT_SECONDS,
    );
    let idle_timeout = seconds(
        &mut c,
        "server.idle_timeout_seconds",
        server.idle_timeout_seconds,
        DEFAULT_IDLE_TIMEOUT_SECONDS,
    );
    let max_connections = server.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 || max_connections > 1_000_000 {
        c.problems
            .bad("server.max_connections", "must be between 1 and 1000000");
    }
    let mut trusted_proxies = Vec::new();
    for (i, proxy) in server
        .trusted_proxies
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let parsed = proxy
            .parse::<ipnet::IpNet>()
            .or_else(|_| proxy.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => c.problems.bad(
                format!("server.trusted_proxies[{i}]"),
                format!("{proxy:?} is not an IP address or network (e.g. \"10.0.0.0/8\")"),
            ),
        }
    }

    let devices = file.devices.unwrap_or_default();
    let max_failures = devices
        .max_failed_logins
        .unwrap_or(DEFAULT_MAX_FAILED_LOGINS);
    if max_failures == 0 || max_failures > 1000 {
        c.problems
            .bad("devices.max_failed_logins", "must be between 1 and 1000");
    }
    let lock = seconds(
        &mut c,
        "devices.lock_seconds",
        devices.lock_seconds,
        DEFAULT_LOCK_SECONDS,
    );
    let max_concurrent_logins = devices
        .max_concurrent_logins
        .unwrap_or(DEFAULT_MAX_CONCURRENT_LOGINS);
    if max_concurrent_logins == 0 || max_concurrent_logins > 10_000 {
        c.problems.bad(
            "devices.max_concurrent_logins",
            "must be between 1 and 10000",
        );
    }
    let max_idle_days = devices.max_idle_days.unwrap_or(DEFAULT_MAX_IDLE_DAYS);
    if max_idle_days > MAX_MAX_IDLE_DAYS {
        c.problems.bad(
            "devices.max_idle_days",
            format!("must be between 0 (never) and {MAX_MAX_IDLE_DAYS}"),
        );
    }
    let devices = DevicesConfig {
        max_idle: (max_idle_days > 0)
            .then(|| Duration::from_secs(max_idle_days.min(MAX_MAX_IDLE_DAYS) * 86_400)),
        max_failed_logins: max_failures.min(1000) as u32,
        failure_delay: Duration::from_millis(
            devices
                .failure_delay_milliseconds
                .unwrap_or(DEFAULT_FAILURE_DELAY_MILLISECONDS),
        ),
        lock,
        max_concurrent_logins: max_concurrent_logins as usize,
    };

    let notify = c.required_section("notify", file.notify);
    match notify.username.as_deref() {
        None => c.problems.bad("notify.username", "required"),
        Some(u) if u.is_empty() || u.contains(':') => c
            .problems
            .bad("notify.username", "must be non-empty and contain no ':'"),
        Some(_) => {}
    }
    let password = c.required_secret("notify", "password", notify.password, notify.password_file);

    let admin = c.required_section("admin", file.admin);
    let token = c.required_secret("admin", "token", admin.token, admin.token_file);
    if token
        .as_ref()
        .is_some_and(|t| t.expose().len() < MIN_ADMIN_TOKEN_LEN)
    {
        c.problems.bad(
            "admin.token",
            format!("too short: use at least {MIN_ADMIN_TOKEN_LEN} characters"),
        );
    }

    let store = check_store(&mut c, file.store.unwrap_or_default());

    let dovecot = file.dovecot.unwrap_or_default();
    let imap = dovecot.imap.unwrap_or_else(|| DEFAULT_IMAP.to_owned());
    if split_host_port(&imap).is_none() {
        c.problems
            .bad("dovecot.imap", "expected host:port, e.g. \"127.0.0.1:143\"");
    }
    let ca_file = c.path("dovecot.ca_file", dovecot.ca_file);
    let master_password = c.secret(
        "dovecot",
        "master_password",
        dovecot.master_password,
        dovecot.master_password_file,
    );
    let master_password = match (&dovecot.master_user, master_password) {
        (Some(_), SecretValue::Absent) => {
            c.problems.bad(
                "dovecot.master_password",
                "required when `dovecot.master_user` is set",
            );
            None
        }
        (None, SecretValue::Given(_)) => {
            c.problems.bad(
                "dovecot.master_user",
                "required when `dovecot.master_password` is set",
            );
            None
        }
        (_, SecretValue::Given(s)) => Some(s),
        (_, SecretValue::Absent | SecretValue::Bad) => None,
    };
    let timeout = dovecot
        .timeout_seconds
        .unwrap_or(DEFAULT_IMAP_TIMEOUT_SECONDS);
    if timeout == 0 {
        c.problems
            .bad("dovecot.timeout_seconds", "must be at least 1");
    }
    let oauth_user_claim = dovecot
        .oauth_user_claim
        .unwrap_or_else(|| DEFAULT_OAUTH_USER_CLAIM.to_owned());
    if oauth_user_claim.is_empty() || oauth_user_claim.len() > 64 {
        c.problems.bad(
            "dovecot.oauth_user_claim",
            "expected a JWT claim name of 1 to 64 characters, e.g. \"email\"",
        );
    }
    let doveadm_key = c.secret(
        "dovecot",
        "doveadm_api_key",
        dovecot.doveadm_api_key,
        dovecot.doveadm_api_key_file,
    );
    let doveadm = match (dovecot.doveadm_url, doveadm_key) {
        (None, SecretValue::Absent) => None,
        (Some(url), key) => {
            if !valid_doveadm_url(&url) {
                c.problems.bad(
                    "dovecot.doveadm_url",
                    "expected http://host:port/doveadm/v1 (doveadm's HTTP listener)",
                );
            }
            match key {
                SecretValue::Given(api_key) => Some(DoveadmConfig { url, api_key }),
                SecretValue::Absent => {
                    c.problems.bad(
                        "dovecot.doveadm_api_key",
                        "required when `dovecot.doveadm_url` is set (Dovecot's doveadm_api_key)",
                    );
                    None
                }
                SecretValue::Bad => None,
            }
        }
        (None, SecretValue::Given(_)) => {
            c.problems.bad(
                "dovecot.doveadm_url",
                "required when `dovecot.doveadm_api_key` is set",
            );
            None
        }
        (None, SecretValue::Bad) => None,
    };
    let dovecot = DovecotConfig {
        imap,
        tls: dovecot.tls.unwrap_or(ImapTls::None),
        ca_file,
        master_user: dovecot.master_user,
        master_password,
        auth_cache: Duration::from_secs(
            dovecot
                .auth_cache_seconds
                .unwrap_or(DEFAULT_AUTH_CACHE_SECONDS),
        ),
        timeout: Duration::from_secs(timeout),
        oauth_mechanism: dovecot.oauth_mechanism.unwrap_or_default(),
        oauth_user_claim,
        doveadm,
    };

    let outbox = file.outbox.unwrap_or_default();
    let retry_initial = outbox
        .retry_initial_seconds
        .unwrap_or(DEFAULT_RETRY_INITIAL_SECONDS);
    let retry_max = outbox
        .retry_max_seconds
        .unwrap_or(DEFAULT_RETRY_MAX_SECONDS);
    let deadline = outbox.deadline_seconds.unwrap_or(DEFAULT_DEADLINE_SECONDS);
    let concurrency = outbox.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if retry_initial == 0 {
        c.problems
            .bad("outbox.retry_initial_seconds", "must be at least 1");
    }
    if retry_max < retry_initial {
        c.problems.bad(
            "outbox.retry_max_seconds",
            "must not be less than `outbox.retry_initial_seconds`",
        );
    }
    if deadline == 0 {
        c.problems
            .bad("outbox.deadline_seconds", "must be at least 1");
    }
    if concurrency == 0 || concurrency > 10_000 {
        c.problems
            .bad("outbox.concurrency", "must be between 1 and 10000");
    }
    let mut wait = |key: &str, value: Option<u64>, default: u64| {
        let value = value.unwrap_or(default);
        if value > MAX_WAIT_MILLISECONDS {
            c.problems.bad(
                format!("outbox.{key}"),
                format!("must be at most {MAX_WAIT_MILLISECONDS}"),
            );
        }
        value
    };
    let coalesce = wait(
        "coalesce_milliseconds",
        outbox.coalesce_milliseconds,
        DEFAULT_COALESCE_MILLISECONDS,
    );
    let badge_wait = wait(
        "badge_wait_milliseconds",
        outbox.badge_wait_milliseconds,
        DEFAULT_BADGE_WAIT_MILLISECONDS,
    );
    // An item older than the deadline is dropped unsent: no wait may reach it (a wait
    // out of bounds is reported above already).
    let longest_wait = coalesce.max(badge_wait);
    if deadline > 0
        && longest_wait <= MAX_WAIT_MILLISECONDS
        && deadline.saturating_mul(1000) <= longest_wait
    {
        c.problems.bad(
            "outbox.deadline_seconds",
            format!(
                "must be longer than the outbox's waits ({longest_wait} ms: \
                 `outbox.coalesce_milliseconds`, `outbox.badge_wait_milliseconds`)"
            ),
        );
    }
    let outbox = OutboxConfig {
        retry_initial: Duration::from_secs(retry_initial),
        retry_max: Duration::from_secs(retry_max),
        deadline: Duration::from_secs(deadline),
        coalesce: Duration::from_millis(coalesce),
        badge_wait: Duration::from_millis(badge_wait),
        concurrency: concurrency as usize,
    };

    let webpush = check_webpush(&mut c, file.webpush.unwrap_or_default());
    let apps = check_apps(&mut c, file.apps);

    match (listen, notify.username, password, token) {
        (Some(listen), Some(username), Some(password), Some(token)) if c.problems.is_empty() => {
            Ok(Checked {
                server: ServerConfig {
                    listen,
                    tls,
                    header_read_timeout,
                    idle_timeout,
                    max_connections: max_connections as usize,
                    trusted_proxies,
                },
                notify: NotifyConfig { username, password },
                admin: AdminConfig { token },
                store,
                dovecot,
                outbox,
                devices,
                webpush,
                apps,
            })
        }
        _ => Err(c.problems),
    }
}

/// `[store]`: `path` (SQLite, also the default) or `url` (PostgreSQL) with its keys.
fn check_store(c: &mut Checker<'_>, store: super::file::StoreSection) -> StoreConfig {
    let event_retention = Duration::from_secs(
        store
            .event_retention_seconds
            .unwrap_or(DEFAULT_EVENT_RETENTION_SECONDS),
    );
    let path = c.path("store.path", store.path);
    let Some(url) = store.url else {
        // SQLite: the PostgreSQL keys mean nothing here.
        for (key, given) in [
            ("password", store.password.is_some()),
            ("password_file", store.password_file.is_some()),
            ("sslmode", store.sslmode.is_some()),
            ("ca_file", store.ca_file.is_some()),
            ("pool_size", store.pool_size.is_some()),
            ("lease_seconds", store.lease_seconds.is_some()),
        ] {
            if given {
                c.problems.bad(
                    format!("store.{key}"),
                    "only for a PostgreSQL store (`store.url`)",
                );
            }
        }
        return StoreConfig {
            backend: StoreBackend::Sqlite(
                path.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)),
            ),
            event_retention,
        };
    };
    if path.is_some() {
        c.problems.bad(
            "store.url",
            "give either `path` (SQLite) or `url` (PostgreSQL), not both",
        );
    } else if let Err(message) = check_postgres_url(&url) {
        c.problems.bad("store.url", message);
    }
    let password = match c.secret("store", "password", store.password, store.password_file) {
        SecretValue::Given(s) => Some(s),
        SecretValue::Absent | SecretValue::Bad => None,
    };
    let sslmode = match store.sslmode.as_deref() {
        None => SslMode::Prefer,
        Some(s) => SslMode::parse(s).unwrap_or_else(|| {
            let names: Vec<_> = SslMode::ALL.iter().map(|(n, _)| *n).collect();
            c.problems.bad(
                "store.sslmode",
                format!("unknown mode {s:?}: use one of {}", names.join(", ")),
            );
            SslMode::Prefer
        }),
    };
    let ca_file = c.path("store.ca_file", store.ca_file);
    let pool_size = store.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
    if pool_size == 0 || pool_size > 1000 {
        c.problems
            .bad("store.pool_size", "must be between 1 and 1000");
    }
    let lease = store.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS);
    if !(3..=86_400).contains(&lease) {
        c.problems
            .bad("store.lease_seconds", "must be between 3 and 86400");
    }
    StoreConfig {
        backend: StoreBackend::Postgres(PostgresConfig {
            url,
            password,
            sslmode,
            ca_file,
            pool_size: pool_size as usize,
            lease: Duration::from_secs(lease),
        }),
        event_retention,
    }
}

/// A PostgreSQL URL the receiver can use and log: `postgresql://` or `postgres://`, a
/// user and a host, no password (`password_file` holds it) and no `sslmode` (its own key).
fn check_postgres_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .ok_or("expected postgresql://user@host[:port]/database")?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return Err("name the user: postgresql://user@host[:port]/database".into());
    };
    if userinfo.contains(':') {
        return Err("the URL must not hold the password: put it in `store.password_file`".into());
    }
    if userinfo.is_empty() || host.is_empty() {
        return Err("expected postgresql://user@host[:port]/database".into());
    }
    let query = rest.split_once('?').map(|(_, q)| q).unwrap_or_default();
    if query.split('&').any(|kv| kv.starts_with("sslmode=")) {
        return Err("set TLS with `store.sslmode`, not in the URL".into());
    }
    if query.split('&').any(|kv| kv.starts_with("password=")) {
        return Err("the URL must not hold the password: put it in `store.password_file`".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a usable PostgreSQL URL: {e}"))
}

/// The checked sections, for [`Config`].
pub(super) struct Checked {
    pub server: ServerConfig,
    pub notify: NotifyConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub dovecot: DovecotConfig,
    pub outbox: OutboxConfig,
    pub devices: DevicesConfig,
    pub webpush: WebPushSettings,
    pub apps: Vec<AppConfig>,
}

/// `[webpush]`: host names or IP addresses in `allow_hosts`, a readable `ca_file`.
fn check_webpush(c: &mut Checker<'_>, section: super::file::WebPushSection) -> WebPushSettings {
    let mut allow_hosts = Vec::new();
    for (i, host) in section.allow_hosts.unwrap_or_default().iter().enumerate() {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = !bare.is_empty()
            && bare.len() <= 253
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if name || bare.parse::<std::net::IpAddr>().is_ok() {
            allow_hosts.push(host.clone());
        } else {
            c.problems.bad(
                format!("webpush.allow_hosts[{i}]"),
                format!(
                    "{host:?} is not a host name or IP address (no scheme, port or path: \
                     e.g. \"push.example.net\")"
                ),
            );
        }
    }
    let ca_file = c.path("webpush.ca_file", section.ca_file);
    if let Some(path) = &ca_file {
        if let Err(e) = dovepush_push::read_ca_file(path) {
            c.problems
                .bad("webpush.ca_file", format!("{}: {e}", path.display()));
        }
    }
    let timeout = section
        .timeout_seconds
        .unwrap_or(DEFAULT_WEBPUSH_TIMEOUT_SECONDS);
    if timeout == 0 || timeout > 300 {
        c.problems
            .bad("webpush.timeout_seconds", "must be between 1 and 300");
    }
    WebPushSettings {
        allow_hosts,
        deny_private: section.deny_private.unwrap_or(true),
        ca_file,
        timeout: Duration::from_secs(timeout),
    }
}

/// `[[apps]]`: ids, texts and paths; then, for each app without a problem that has a
/// transport, its push senders are built once.
fn check_apps(c: &mut Checker<'_>, mut apps: Vec<AppConfig>) -> Vec<AppConfig> {
    let mut seen = HashSet::new();
    for (i, app) in apps.iter_mut().enumerate() {
        let prefix = format!("apps[{i}]");
        if !valid_app_id(&app.id) {
            c.problems.bad(
                format!("{prefix}.id"),
                "use 1-64 characters of a-z, A-Z, 0-9, '.', '_' or '-'",
            );
        } else if !seen.insert(app.id.clone()) {
            c.problems.bad(format!("{prefix}.id"), "duplicate app id");
        }
        if app.generic_text.trim().is_empty() {
            c.problems
                .bad(format!("{prefix}.generic_text"), "must not be empty");
        }
        if let Some(apns) = &mut app.apns {
            let key = |k: &str| format!("{prefix}.apns.{k}");
            if apns.topic.trim().is_empty() {
                c.problems.bad(key("topic"), "must not be empty");
            }
            for (name, path) in [
                ("key_file", &mut apns.key_file),
                ("cert_file", &mut apns.cert_file),
                ("cert_key_file", &mut apns.cert_key_file),
                ("cert_password_file", &mut apns.cert_password_file),
                ("ca_file", &mut apns.ca_file),
            ] {
                *path = c.path(&key(name), path.take());
            }
        }
        if let Some(fcm) = &mut app.fcm {
            let key = |k: &str| format!("{prefix}.fcm.{k}");
            let path = std::mem::take(&mut fcm.service_account_file);
            if let Some(path) = c.path(&key("service_account_file"), Some(path)) {
                fcm.service_account_file = path;
            }
            fcm.ca_file = c.path(&key("ca_file"), fcm.ca_file.take());
        }
        if let Some(webpush) = &mut app.webpush {
            let key = format!("{prefix}.webpush.vapid_private_key_file");
            let path = std::mem::take(&mut webpush.vapid_private_key_file);
            if let Some(path) = c.path(&key, Some(path)) {
                webpush.vapid_private_key_file = path;
            }
        }
        if !c.problems.any_under(&prefix) && app.has_transport() {
            if let Err(e) = Pusher::from_config(std::slice::from_ref(app), c.base_dir) {
                let problem = push_problem(Some(i), &e);
                c.problems.bad(problem.key, problem.message);
            }
        }
    }
    apps
}

/// `http://host:port/path`: doveadm's HTTP listener speaks plain HTTP (keep it on
/// loopback or a private network).
fn valid_doveadm_url(url: &str) -> bool {
    url.strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(authority, _)| split_host_port(authority).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rank_in_declared_order_unknown_ones_last() {
        let mut keys = vec![
            "apps[1].id",
            "apps[0].apns.colour",
            "apps[0].apns.topic",
            "server.colour",
            "bogus",
            "notify.password",
            "notify",
            "server.listen",
            "apps[0].ttl_secs",
        ];
        keys.sort_by_key(|k| rank(k));
        assert_eq!(
            keys,
            vec![
                "server.listen",
                "server.colour",
                "notify",
                "notify.password",
                "apps[0].ttl_secs",
                "apps[0].apns.topic",
                "apps[0].apns.colour",
                "apps[1].id",
                "bogus",
            ]
        );
    }

    #[test]
    fn serde_words_become_config_words() {
        assert_eq!(
            in_config_words("invalid type: string \"long\", expected u64"),
            "invalid type: string \"long\", expected a non-negative integer"
        );
        assert_eq!(
            in_config_words("invalid type: string \"nope\", expected struct FcmConfig"),
            "invalid type: string \"nope\", expected a table"
        );
        let other = "unknown variant `loud`, expected one of `full`, `generic`, `silent`";
        assert_eq!(in_config_words(other), other);
    }

    #[test]
    fn a_problem_hides_the_ones_under_its_key() {
        let mut p = Problems::default();
        p.bad("apps[0]", "expected a table");
        p.bad("apps[0].id", "required");
        p.bad("apps[0]", "again");
        p.bad("apps[01]", "another key");
        assert_eq!(p.sorted().len(), 2);
    }
}
