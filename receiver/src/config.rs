//! Configuration: the TOML file → a typed, validated [`Config`].
//!
//! Owns every config key, its default (the `DEFAULT_*` consts) and its checks. Loading is
//! strict and complete: unknown keys are errors, and every problem in the file is collected
//! before failing, so one [`ConfigError`] names every bad key together with the file.
//! Secrets may be given inline (`password`) or read from a file (`password_file`); they are
//! wrapped in [`Secret`], whose `Debug` never shows the value.
//!
//! Sections: `[server]`, `[notify]`, `[admin]`, `[store]`, `[dovecot]`, `[outbox]` and the
//! array `[[apps]]`, whose entries carry the push transports' sub-tables `[apps.apns]` and
//! `[apps.fcm]`. Those are read into dovepush-push's own config types
//! ([`dovepush_push::AppConfig`]) and validated by building the app's push senders once
//! (key files readable and loadable, endpoints well-formed), so `check-config` catches them.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dovepush_push::{ApnsConfig, ApnsEnvironment, FcmConfig, Pusher};
use toml::{Table, Value};

use crate::transport::Privacy;

/// Default `[server] listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8025";
/// Default `[store] path`.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/dovepush/receiver.sqlite";
/// Default `[store] event_retention_seconds`: how long event ids are kept for de-duplication.
pub const DEFAULT_EVENT_RETENTION_SECONDS: u64 = 86_400;
/// Default `[dovecot] imap`.
pub const DEFAULT_IMAP: &str = "127.0.0.1:143";
/// Default `[dovecot] auth_cache_seconds`.
pub const DEFAULT_AUTH_CACHE_SECONDS: u64 = 60;
/// Default `[dovecot] timeout_seconds`.
pub const DEFAULT_IMAP_TIMEOUT_SECONDS: u64 = 10;
/// Default `[outbox] retry_initial_seconds`.
pub const DEFAULT_RETRY_INITIAL_SECONDS: u64 = 1;
/// Default `[outbox] retry_max_seconds`.
pub const DEFAULT_RETRY_MAX_SECONDS: u64 = 600;
/// Default `[outbox] deadline_seconds` (5 hours, as chatmail does).
pub const DEFAULT_DEADLINE_SECONDS: u64 = 5 * 3600;
/// Default `[outbox] coalesce_milliseconds`: how long a new item waits for more events.
/// 0: a push leaves at once; events arriving while it is still pending (queued, in
/// backoff, or waiting for a free slot) still fold into it.
pub const DEFAULT_COALESCE_MILLISECONDS: u64 = 0;
/// Default `[outbox] concurrency`: pushes in flight at once.
pub const DEFAULT_CONCURRENCY: u64 = 64;
/// Shortest accepted admin token.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// A secret value (password, token). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole receiver configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (used in messages).
    pub source: PathBuf,
    pub server: ServerConfig,
    pub notify: NotifyConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub dovecot: DovecotConfig,
    pub outbox: OutboxConfig,
    pub apps: Vec<AppConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `tls_cert` + `tls_key` (PEM files); both or neither.
    pub tls: Option<TlsFiles>,
}

/// A server certificate chain and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[notify]`: the HTTP Basic credentials Dovecot sends on the ingest endpoint.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub username: String,
    pub password: Secret,
}

/// `[admin]`: the bearer token of the status and metrics endpoints.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub token: Secret,
}

/// `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The SQLite file (relative paths are resolved against the config file's directory).
    pub path: PathBuf,
    pub event_retention: Duration,
}

/// How the receiver talks TLS to Dovecot's IMAP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapTls {
    None,
    StartTls,
    Implicit,
}

/// `[dovecot]`.
#[derive(Debug, Clone)]
pub struct DovecotConfig {
    /// `host:port` of the IMAP listener.
    pub imap: String,
    pub tls: ImapTls,
    /// PEM bundle of CAs to trust for IMAP TLS (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    pub master_user: Option<String>,
    pub master_password: Option<Secret>,
    pub auth_cache: Duration,
    pub timeout: Duration,
}

/// `[outbox]`: retry, deadline and coalescing policy.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub deadline: Duration,
    pub coalesce: Duration,
    pub concurrency: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(DEFAULT_RETRY_INITIAL_SECONDS),
            retry_max: Duration::from_secs(DEFAULT_RETRY_MAX_SECONDS),
            deadline: Duration::from_secs(DEFAULT_DEADLINE_SECONDS),
            coalesce: Duration::from_millis(DEFAULT_COALESCE_MILLISECONDS),
            concurrency: DEFAULT_CONCURRENCY as usize,
        }
    }
}

/// Default `[[apps]] privacy`: what an app's devices get unless they choose.
pub const DEFAULT_APP_PRIVACY: Privacy = Privacy::Generic;

/// One `[[apps]]` entry: an app that may register devices, and how to push to them.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub id: String,
    /// Default privacy of the app's devices (a device may choose its own).
    pub privacy: Privacy,
    /// The entry as dovepush-push reads it (`generic_text`, `ttl_secs`, `[apps.apns]`,
    /// `[apps.fcm]`), with every path resolved against the config file's directory.
    pub push: dovepush_push::AppConfig,
}

impl AppConfig {
    /// True when the app has `[apps.apns]` or `[apps.fcm]`.
    pub fn has_transport(&self) -> bool {
        self.push.apns.is_some() || self.push.fcm.is_some()
    }
}

/// One bad key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `server.listen` or `apps[1].id`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: `{}`: {}", self.file.display(), p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![ConfigProblem {
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: path.to_owned(),
            problems,
        };
        let mut root: Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![ConfigProblem {
                key: "(syntax)".into(),
                message: e.message().to_owned()
                    + &e.span()
                        .map(|s| format!(" (at byte {})", s.start))
                        .unwrap_or_default(),
            }])
        })?;
        let base_dir = base_dir_of(path);
        let mut r = Reader {
            problems: Vec::new(),
            base_dir,
        };

        let server = {
            let mut t = r.section(&mut root, "server");
            let listen = r
                .string(&mut t, "server", "listen")
                .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
            let listen = match listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.bad(
                        "server.listen",
                        "expected an IP address and port, e.g. \"127.0.0.1:8025\"",
                    );
                    None
                }
            };
            let cert = r.path(&mut t, "server", "tls_cert");
            let key = r.path(&mut t, "server", "tls_key");
            let tls = match (cert, key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                (Some(_), None) => {
                    r.bad("server.tls_key", "required when `server.tls_cert` is set");
                    None
                }
                (None, Some(_)) => {
                    r.bad("server.tls_cert", "required when `server.tls_key` is set");
                    None
                }
            };
            r.finish(t, "server");
            listen.map(|listen| ServerConfig { listen, tls })
        };

        let notify = {
            let mut t = r.required_section(&mut root, "notify");
            let username = r.string(&mut t, "notify", "username");
            if username.is_none() {
                r.bad("notify.username", "required");
            }
            if let Some(u) = &username {
                if u.is_empty() || u.contains(':') {
                    r.bad("notify.username", "must be non-empty and contain no ':'");
                }
            }
            let password = r.secret(&mut t, "notify", "password", true);
            r.finish(t, "notify");
            match (username, password) {
                (Some(username), Some(password)) => Some(NotifyConfig { username, password }),
                _ => None,
            }
        };

        let admin = {
            let mut t = r.required_section(&mut root, "admin");
            let token = r.secret(&mut t, "admin", "token", true);
            if let Some(tok) = &token {
                if tok.expose().len() < MIN_ADMIN_TOKEN_LEN {
                    r.bad(
                        "admin.token",
                        &format!("too short: use at least {MIN_ADMIN_TOKEN_LEN} characters"),
                    );
                }
            }
            r.finish(t, "admin");
            token.map(|token| AdminConfig { token })
        };

        let store = {
            let mut t = r.section(&mut root, "store");
            let path = r
                .path(&mut t, "store", "path")
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH));
            let retention = r.seconds(
                &mut t,
                "store",
                "event_retention_seconds",
                DEFAULT_EVENT_RETENTION_SECONDS,
            );
            r.finish(t, "store");
            StoreConfig {
                path,
                event_retention: retention,
            }
        };

        let dovecot = {
            let mut t = r.section(&mut root, "dovecot");
            let imap = r
                .string(&mut t, "dovecot", "imap")
                .unwrap_or_else(|| DEFAULT_IMAP.to_owned());
            if split_host_port(&imap).is_none() {
                r.bad("dovecot.imap", "expected host:port, e.g. \"127.0.0.1:143\"");
            }
            let tls = match r.string(&mut t, "dovecot", "tls").as_deref() {
                None | Some("none") => ImapTls::None,
                Some("starttls") => ImapTls::StartTls,
                Some("implicit") => ImapTls::Implicit,
                Some(_) => {
                    r.bad(
                        "dovecot.tls",
                        "expected \"none\", \"starttls\" or \"implicit\"",
                    );
                    ImapTls::None
                }
            };
            let ca_file = r.path(&mut t, "dovecot", "ca_file");
            let master_user = r.string(&mut t, "dovecot", "master_user");
            let master_password = r.secret(&mut t, "dovecot", "master_password", false);
            let password_reported = r
                .problems
                .iter()
                .any(|p| p.key.starts_with("dovecot.master_password"));
            match (&master_user, &master_password) {
                (Some(_), None) if !password_reported => r.bad(
                    "dovecot.master_password",
                    "required when `dovecot.master_user` is set",
                ),
                (None, Some(_)) => r.bad(
                    "dovecot.master_user",
                    "required when `dovecot.master_password` is set",
                ),
                _ => {}
            }
            let auth_cache = r.seconds(
                &mut t,
                "dovecot",
                "auth_cache_seconds",
                DEFAULT_AUTH_CACHE_SECONDS,
            );
            let timeout = r.seconds(
                &mut t,
                "dovecot",
                "timeout_seconds",
                DEFAULT_IMAP_TIMEOUT_SECONDS,
            );
            if timeout.is_zero() {
                r.bad("dovecot.timeout_seconds", "must be at least 1");
            }
            r.finish(t, "dovecot");
            DovecotConfig {
                imap,
                tls,
                ca_file,
                master_user,
                master_password,
                auth_cache,
                timeout,
            }
        };

        let outbox = {
            let mut t = r.section(&mut root, "outbox");
            let retry_initial = r.seconds(
                &mut t,
                "outbox",
                "retry_initial_seconds",
                DEFAULT_RETRY_INITIAL_SECONDS,
            );
            let retry_max = r.seconds(
                &mut t,
                "outbox",
                "retry_max_seconds",
                DEFAULT_RETRY_MAX_SECONDS,
            );
            let deadline = r.seconds(
                &mut t,
                "outbox",
                "deadline_seconds",
                DEFAULT_DEADLINE_SECONDS,
            );
            let coalesce_ms = r.integer(
                &mut t,
                "outbox",
                "coalesce_milliseconds",
                DEFAULT_COALESCE_MILLISECONDS,
            );
            let concurrency = r.integer(&mut t, "outbox", "concurrency", DEFAULT_CONCURRENCY);
            if retry_initial.is_zero() {
                r.bad("outbox.retry_initial_seconds", "must be at least 1");
            }
            if retry_max < retry_initial {
                r.bad(
                    "outbox.retry_max_seconds",
                    "must not be less than `outbox.retry_initial_seconds`",
                );
            }
            if deadline.is_zero() {
                r.bad("outbox.deadline_seconds", "must be at least 1");
            }
            if concurrency == 0 || concurrency > 10_000 {
                r.bad("outbox.concurrency", "must be between 1 and 10000");
            }
            r.finish(t, "outbox");
            OutboxConfig {
                retry_initial,
                retry_max,
                deadline,
                coalesce: Duration::from_millis(coalesce_ms),
                concurrency: concurrency as usize,
            }
        };

        let apps = {
            let mut apps = Vec::new();
            match root.remove("apps") {
                None => {}
                Some(Value::Array(entries)) => {
                    let mut seen = HashSet::new();
                    for (i, entry) in entries.into_iter().enumerate() {
                        let prefix = format!("apps[{i}]");
                        match entry {
                            Value::Table(t) => {
                                if let Some(app) = parse_app(&mut r, t, i) {
                                    if !seen.insert(app.id.clone()) {
                                        r.bad(&format!("{prefix}.id"), "duplicate app id");
                                    }
                                    apps.push(app);
                                }
                            }
                            _ => r.bad(&prefix, "expected a table ([[apps]])"),
                        }
                    }
                }
                Some(_) => r.bad("apps", "expected an array of tables ([[apps]])"),
            }
            apps
        };

        r.finish(root, "");
        if !r.problems.is_empty() {
            return Err(fail(r.problems));
        }
        let (Some(server), Some(notify), Some(admin)) = (server, notify, admin) else {
            unreachable!("a missing required section is always reported as a problem");
        };
        let store = StoreConfig {
            path: r.resolve(store.path),
            ..store
        };
        Ok(Config {
            source: path.to_owned(),
            server,
            notify,
            admin,
            store,
            dovecot,
            outbox,
            apps,
        })
    }

    /// The app entry with this id.
    pub fn app(&self, id: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.id == id)
    }

    /// The directory relative paths were resolved against.
    pub fn base_dir(&self) -> PathBuf {
        base_dir_of(&self.source)
    }

    /// The `[[apps]]` that have a push transport, as dovepush-push reads them.
    pub fn push_apps(&self) -> Vec<dovepush_push::AppConfig> {
        self.apps
            .iter()
            .filter(|a| a.has_transport())
            .map(|a| a.push.clone())
            .collect()
    }

    /// Builds the push senders of every app (one [`Pusher`], so apps sharing an Apple key
    /// share its connection and provider token). A failure names the app's key and this file.
    pub fn pusher(&self) -> Result<Pusher, ConfigError> {
        let apps = self.push_apps();
        Pusher::from_config(&apps, &self.base_dir()).map_err(|e| {
            let index = self.apps.iter().position(|a| a.id == push_error_app(&e));
            ConfigError {
                file: self.source.clone(),
                problems: vec![push_problem(index, &e)],
            }
        })
    }
}

fn base_dir_of(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The app id a dovepush-push config error is about.
fn push_error_app(e: &dovepush_push::ConfigError) -> &str {
    match e {
        dovepush_push::ConfigError::Invalid { app, .. }
        | dovepush_push::ConfigError::File { app, .. } => app,
    }
}

/// A dovepush-push config error as one of our problems: its key (`apps.apns.key_file`)
/// becomes `apps[<index>].apns.key_file`; a file error names the file.
fn push_problem(index: Option<usize>, e: &dovepush_push::ConfigError) -> ConfigProblem {
    let key = e.key();
    let key = match (index, key.strip_prefix("apps.")) {
        (Some(i), Some(rest)) => format!("apps[{i}].{rest}"),
        _ => key.to_owned(),
    };
    let message = match e {
        dovepush_push::ConfigError::Invalid { message, .. } => message.clone(),
        dovepush_push::ConfigError::File { path, message, .. } => {
            format!("{}: {message}", path.display())
        }
    };
    ConfigProblem { key, message }
}

/// Parses one `[[apps]]` entry (`apps[index]`), its `[apps.apns]` and `[apps.fcm]`, and,
/// when the entry itself is fine, validates it by building its push senders.
fn parse_app(r: &mut Reader, mut t: Table, index: usize) -> Option<AppConfig> {
    let prefix = &format!("apps[{index}]");
    let problems_before = r.problems.len();
    let id = r.string(&mut t, prefix, "id");
    match &id {
        None => r.bad(&format!("{prefix}.id"), "required"),
        Some(id) if !valid_app_id(id) => r.bad(
            &format!("{prefix}.id"),
            "use 1-64 characters of a-z, A-Z, 0-9, '.', '_' or '-'",
        ),
        _ => {}
    }
    let privacy = match r.string(&mut t, prefix, "privacy") {
        None => DEFAULT_APP_PRIVACY,
        Some(p) => p.parse::<Privacy>().ok().unwrap_or_else(|| {
            r.bad(
                &format!("{prefix}.privacy"),
                "expected \"full\", \"generic\" or \"silent\"",
            );
            DEFAULT_APP_PRIVACY
        }),
    };
    let generic_text = r
        .string(&mut t, prefix, "generic_text")
        .unwrap_or_else(|| DEFAULT_GENERIC_TEXT.to_owned());
    if generic_text.trim().is_empty() {
        r.bad(&format!("{prefix}.generic_text"), "must not be empty");
    }
    let ttl_secs = r.optional_integer(&mut t, prefix, "ttl_secs");
    let apns = r
        .subtable(&mut t, prefix, "apns")
        .map(|sub| parse_apns(r, sub, &format!("{prefix}.apns")));
    let fcm = r
        .subtable(&mut t, prefix, "fcm")
        .map(|sub| parse_fcm(r, sub, &format!("{prefix}.fcm")));
    r.finish(t, prefix);
    let app = AppConfig {
        privacy,
        push: dovepush_push::AppConfig {
            id: id.clone()?,
            privacy,
            generic_text,
            ttl_secs,
            apns: apns.flatten(),
            fcm: fcm.flatten(),
        },
        id: id?,
    };
    if r.problems.len() == problems_before && app.has_transport() {
        if let Err(e) = Pusher::from_config(std::slice::from_ref(&app.push), &r.base_dir) {
            r.problems.push(push_problem(Some(index), &e));
        }
    }
    Some(app)
}

/// Default `[[apps]] generic_text`.
pub const DEFAULT_GENERIC_TEXT: &str = "New mail";

/// `[apps.apns]`. `None` when a required key is missing or malformed (reported).
fn parse_apns(r: &mut Reader, mut t: Table, prefix: &str) -> Option<ApnsConfig> {
    let before = r.problems.len();
    let topic = r.string(&mut t, prefix, "topic");
    match &topic {
        None => r.bad(
            &Reader::key(prefix, "topic"),
            "required (the app's bundle id)",
        ),
        Some(topic) if topic.trim().is_empty() => {
            r.bad(&Reader::key(prefix, "topic"), "must not be empty")
        }
        _ => {}
    }
    let environment = match r.string(&mut t, prefix, "environment").as_deref() {
        None | Some("production") => ApnsEnvironment::Production,
        Some("sandbox") => ApnsEnvironment::Sandbox,
        Some(_) => {
            r.bad(
                &Reader::key(prefix, "environment"),
                "expected \"production\" or \"sandbox\"",
            );
            ApnsEnvironment::Production
        }
    };
    let config = ApnsConfig {
        topic: topic.unwrap_or_default(),
        environment,
        team_id: r.string(&mut t, prefix, "team_id"),
        key_id: r.string(&mut t, prefix, "key_id"),
        key_file: r.path(&mut t, prefix, "key_file"),
        cert_file: r.path(&mut t, prefix, "cert_file"),
        cert_key_file: r.path(&mut t, prefix, "cert_key_file"),
        cert_password_file: r.path(&mut t, prefix, "cert_password_file"),
        endpoint: r.string(&mut t, prefix, "endpoint"),
        ca_file: r.path(&mut t, prefix, "ca_file"),
        request_timeout_secs: r.optional_integer(&mut t, prefix, "request_timeout_secs"),
    };
    r.finish(t, prefix);
    (r.problems.len() == before).then_some(config)
}

/// `[apps.fcm]`. `None` when a required key is missing or malformed (reported).
fn parse_fcm(r: &mut Reader, mut t: Table, prefix: &str) -> Option<FcmConfig> {
    let before = r.problems.len();
    let service_account_file = r.path(&mut t, prefix, "service_account_file");
    if service_account_file.is_none() && r.problems.len() == before {
        r.bad(
            &Reader::key(prefix, "service_account_file"),
            "required (the service-account JSON from the Firebase console)",
        );
    }
    let endpoint = r.string(&mut t, prefix, "endpoint");
    let ca_file = r.path(&mut t, prefix, "ca_file");
    let request_timeout_secs = r.optional_integer(&mut t, prefix, "request_timeout_secs");
    r.finish(t, prefix);
    let config = FcmConfig {
        service_account_file: service_account_file?,
        endpoint,
        ca_file,
        request_timeout_secs,
    };
    (r.problems.len() == before).then_some(config)
}

/// App ids: short, printable, safe in logs and metric labels.
pub fn valid_app_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Splits `host:port` (IPv6 as `[::1]:143`).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_owned(), port))
}

/// Collects problems while taking keys out of tables.
struct Reader {
    problems: Vec<ConfigProblem>,
    base_dir: PathBuf,
}

impl Reader {
    fn bad(&mut self, key: &str, message: &str) {
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            message: message.to_owned(),
        });
    }

    fn key(prefix: &str, key: &str) -> String {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    }

    fn section(&mut self, root: &mut Table, name: &str) -> Table {
        match root.remove(name) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(_) => {
                self.bad(name, "expected a table");
                Table::new()
            }
        }
    }

    fn required_section(&mut self, root: &mut Table, name: &str) -> Table {
        if !root.contains_key(name) {
            self.bad(name, "required section is missing");
        }
        self.section(root, name)
    }

    /// Every key left in `t` is unknown.
    fn finish(&mut self, t: Table, prefix: &str) {
        let mut keys: Vec<_> = t.keys().cloned().collect();
        keys.sort();
        for k in keys {
            self.bad(&Self::key(prefix, &k), "unknown key");
        }
    }

    fn string(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<String> {
        match t.remove(key) {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.bad(&Self::key(prefix, key), "expected a string");
                None
            }
        }
    }

    fn path(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<PathBuf> {
        let s = self.string(t, prefix, key)?;
        if s.is_empty() {
            self.bad(&Self::key(prefix, key), "must not be empty");
            return None;
        }
        Some(self.resolve(PathBuf::from(s)))
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    fn integer(&mut self, t: &mut Table, prefix: &str, key: &str, default: u64) -> u64 {
        self.optional_integer(t, prefix, key).unwrap_or(default)
    }

    fn optional_integer(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<u64> {
        match t.remove(key) {
            None => None,
            Some(Value::Integer(i)) if i >= 0 => Some(i as u64),
            Some(_) => {
                self.bad(&Self::key(prefix, key), "expected a non-negative integer");
                None
            }
        }
    }

    /// A sub-table `key` of `t`, if present.
    fn subtable(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<Table> {
        match t.remove(key) {
            None => None,
            Some(Value::Table(sub)) => Some(sub),
            Some(_) => {
                self.bad(&Self::key(prefix, key), "expected a table");
                None
            }
        }
    }

    fn seconds(&mut self, t: &mut Table, prefix: &str, key: &str, default: u64) -> Duration {
        Duration::from_secs(self.integer(t, prefix, key, default))
    }

    /// `key` inline or `key_file`; exactly one of them (when `required`).
    fn secret(&mut self, t: &mut Table, prefix: &str, key: &str, required: bool) -> Option<Secret> {
        let file_key = format!("{key}_file");
        let inline = self.string(t, prefix, key);
        let file = self.path(t, prefix, &file_key);
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.bad(
                    &Self::key(prefix, &file_key),
                    &format!("give either `{}` or `{}`, not both", key, file_key),
                );
                None
            }
            (Some(v), None) => {
                if v.is_empty() {
                    self.bad(&Self::key(prefix, key), "must not be empty");
                    None
                } else {
                    Some(Secret(v))
                }
            }
            (None, Some(f)) => match std::fs::read_to_string(&f) {
                Ok(v) => {
                    let v = v.trim_end_matches(['\n', '\r']).to_owned();
                    if v.is_empty() {
                        self.bad(
                            &Self::key(prefix, &file_key),
                            &format!("{} is empty", f.display()),
                        );
                        None
                    } else {
                        Some(Secret(v))
                    }
                }
                Err(e) => {
                    self.bad(
                        &Self::key(prefix, &file_key),
                        &format!("cannot read {}: {e}", f.display()),
                    );
                    None
                }
            },
            (None, None) => {
                if required {
                    self.bad(
                        &Self::key(prefix, key),
                        &format!("required (or `{file_key}`)"),
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[notify]
username = "dovecot"
password = "secret"
[admin]
token = "0123456789abcdef"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/dovepush/receiver.toml"))
    }

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.server.tls.is_none());
        assert_eq!(c.store.path, PathBuf::from(DEFAULT_STORE_PATH));
        assert_eq!(c.dovecot.imap, DEFAULT_IMAP);
        assert_eq!(c.dovecot.tls, ImapTls::None);
        assert_eq!(c.notify.password.expose(), "secret");
        assert!(c.apps.is_empty());
    }

    #[test]
    fn every_bad_key_is_reported_with_the_file() {
        let err = parse(
            r#"
[server]
listen = "nonsense"
colour = "blue"
[notify]
username = "dovecot"
[admin]
token = "short"
[dovecot]
tls = "sometimes"
[[apps]]
privacy = "loud"
[[apps]]
id = "x"
apns = { topic = "a", colour = "red" }
"#,
        )
        .unwrap_err();
        assert_eq!(
            keys(&err),
            vec![
                "server.listen",
                "server.colour",
                "notify.password",
                "admin.token",
                "dovecot.tls",
                "apps[0].id",
                "apps[0].privacy",
                "apps[1].apns.colour",
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("/etc/dovepush/receiver.toml: `server.listen`: "));
        assert_eq!(text.lines().count(), 8);
    }

    #[test]
    fn missing_required_sections_are_named() {
        let err = parse("").unwrap_err();
        assert_eq!(
            keys(&err),
            vec![
                "notify",
                "notify.username",
                "notify.password",
                "admin",
                "admin.token"
            ]
        );
    }

    #[test]
    fn unknown_top_level_section_is_an_error() {
        let err = parse(&format!("{MINIMAL}\n[bogus]\na = 1\n")).unwrap_err();
        assert_eq!(keys(&err), vec!["bogus"]);
    }

    #[test]
    fn secrets_from_files_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "from-file\n").unwrap();
        std::fs::write(dir.path().join("tok"), "0123456789abcdef0123").unwrap();
        let text = r#"
[notify]
username = "dovecot"
password_file = "pw"
[admin]
token_file = "tok"
[store]
path = "state/receiver.sqlite"
[dovecot]
master_user = "master"
master_password_file = "missing"
"#;
        let path = dir.path().join("receiver.toml");
        let err = Config::parse(text, &path).unwrap_err();
        assert_eq!(keys(&err), vec!["dovecot.master_password_file"]);
        let ok = text.replace(
            "master_password_file = \"missing\"",
            "master_password = \"m\"",
        );
        let c = Config::parse(&ok, &path).unwrap();
        assert_eq!(c.notify.password.expose(), "from-file");
        assert_eq!(c.admin.token.expose(), "0123456789abcdef0123");
        assert_eq!(c.store.path, dir.path().join("state/receiver.sqlite"));
        assert_eq!(c.dovecot.master_user.as_deref(), Some("master"));
    }

    #[test]
    fn both_inline_and_file_secret_is_an_error() {
        let err = parse(&MINIMAL.replace(
            "password = \"secret\"",
            "password = \"a\"\npassword_file = \"/x\"",
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["notify.password_file"]);
    }

    #[test]
    fn apps_and_outbox() {
        let c = parse(&format!(
            "{MINIMAL}\n[outbox]\nretry_initial_seconds = 2\ncoalesce_milliseconds = 0\n\
             [[apps]]\nid = \"mail.example\"\nprivacy = \"generic\"\n[[apps]]\nid = \"other\"\n"
        ))
        .unwrap();
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.app("mail.example").unwrap().privacy, Privacy::Generic);
        assert_eq!(c.app("other").unwrap().privacy, DEFAULT_APP_PRIVACY);
        assert!(!c.app("other").unwrap().has_transport());
        assert!(c.push_apps().is_empty());
        assert_eq!(c.outbox.retry_initial, Duration::from_secs(2));
        assert_eq!(c.outbox.coalesce, Duration::ZERO);
        let err = parse(&format!(
            "{MINIMAL}\n[[apps]]\nid = \"a\"\n[[apps]]\nid = \"a\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["apps[1].id"]);
    }

    /// A P-256 key in PKCS#8 PEM, like Apple's `.p8`.
    fn p8_key() -> String {
        use base64::Engine;
        let rng = ring::rand::SystemRandom::new();
        let der = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<_> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    const APPS: &str = r#"
[[apps]]
id = "com.example.mail"
privacy = "full"
generic_text = "You have mail"
ttl_secs = 3600
[apps.apns]
topic = "com.example.mail"
environment = "sandbox"
team_id = "ABCDE12345"
key_id = "KEY1234567"
key_file = "keys/AuthKey.p8"
endpoint = "https://127.0.0.1:9443"
request_timeout_secs = 5
[apps.fcm]
service_account_file = "firebase.json"
endpoint = "https://127.0.0.1:9444"
"#;

    fn service_account() -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "k",
            "private_key": dovepush_mocks::TEST_ONLY_SERVICE_ACCOUNT_KEY,
            "client_email": "x@p.iam.gserviceaccount.com",
            "token_uri": "https://127.0.0.1:9444/token",
        })
        .to_string()
    }

    #[test]
    fn documented_apps_tables_are_read_with_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/AuthKey.p8"), p8_key()).unwrap();
        let path = dir.path().join("receiver.toml");
        // Without the FCM file: the error names the key, the file and our config file.
        let err = Config::parse(&format!("{MINIMAL}{APPS}"), &path).unwrap_err();
        assert_eq!(keys(&err), vec!["apps[0].fcm.service_account_file"]);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "{}: `apps[0].fcm.service_account_file`: {}",
                path.display(),
                dir.path().join("firebase.json").display()
            )),
            "{text}"
        );
        std::fs::write(dir.path().join("firebase.json"), service_account()).unwrap();
        let c = Config::parse(&format!("{MINIMAL}{APPS}"), &path).unwrap_or_else(|e| panic!("{e}"));
        let app = c.app("com.example.mail").unwrap();
        assert_eq!(app.privacy, Privacy::Full);
        assert!(app.has_transport());
        assert_eq!(app.push.generic_text, "You have mail");
        assert_eq!(app.push.ttl_secs, Some(3600));
        assert_eq!(app.push.privacy, Privacy::Full);
        let apns = app.push.apns.as_ref().unwrap();
        assert_eq!(apns.environment, ApnsEnvironment::Sandbox);
        assert_eq!(
            apns.key_file.as_deref(),
            Some(dir.path().join("keys/AuthKey.p8").as_path())
        );
        assert_eq!(apns.request_timeout_secs, Some(5));
        assert_eq!(
            app.push.fcm.as_ref().unwrap().service_account_file,
            dir.path().join("firebase.json")
        );
        assert!(c.pusher().is_ok());
    }

    #[test]
    fn bad_apps_tables_name_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receiver.toml");
        let text = format!(
            r#"{MINIMAL}
[[apps]]
id = "a"
ttl_secs = "long"
[apps.apns]
environment = "staging"
colour = 1
[apps.fcm]
endpoint = "https://x"
[[apps]]
id = "b"
[apps.apns]
topic = "b"
team_id = "T"
key_id = "K"
key_file = "missing.p8"
[[apps]]
id = "c"
fcm = "nope"
[[apps]]
id = "d"
[apps.apns]
topic = "d"
cert_file = "push.p12"
"#
        );
        let err = Config::parse(&text, &path).unwrap_err();
        assert_eq!(
            keys(&err),
            vec![
                "apps[0].ttl_secs",
                "apps[0].apns.topic",
                "apps[0].apns.environment",
                "apps[0].apns.colour",
                "apps[0].fcm.service_account_file",
                "apps[1].apns.key_file",
                "apps[2].fcm",
                "apps[3].apns.cert_file",
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&dir.path().join("missing.p8").display().to_string()),
            "{text}"
        );
        assert!(text.contains("openssl pkcs12"), "{text}");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = parse("[notify\n").unwrap_err();
        assert_eq!(keys(&err), vec!["(syntax)"]);
    }

    #[test]
    fn secret_debug_is_redacted() {
        let c = parse(MINIMAL).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("secret\""), "{dump}");
        assert!(!dump.contains("0123456789abcdef"), "{dump}");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("mail:143"), Some(("mail".into(), 143)));
        assert_eq!(split_host_port("[::1]:993"), Some(("::1".into(), 993)));
        assert_eq!(split_host_port("mail"), None);
        assert_eq!(split_host_port("mail:0"), None);
    }
}
