//! Configuration: the TOML file → a typed, validated [`Config`].
//!
//! Owns every config key, its default (the `DEFAULT_*` consts) and its checks. Loading is
//! strict and complete: unknown keys are errors, and every problem in the file is collected
//! before failing, so one [`ConfigError`] names every bad key together with the file.
//! Secrets may be given inline (`password`) or read from a file (`password_file`); they are
//! wrapped in [`Secret`], whose `Debug` never shows the value.
//!
//! * `file` — the file's serde types (`deny_unknown_fields`), one per section; the
//!   `[[apps]]` entries are dovepush-push's own [`AppConfig`].
//! * `validate` — reading them so that every bad key is named, and the one pass of rules
//!   (ranges, secrets, paths, building each app's push senders once, so that
//!   `check-config` catches unusable key files and endpoints).

pub mod file;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dovepush_push::webpush::{AddressPolicy, WebPushOptions};
use dovepush_push::{read_ca_file, AppConfig, Privacy, Pusher};
use toml::Table;

/// Default `[server] listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8025";
/// Default `[store] path`.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/dovepush/receiver.sqlite";
/// Default `[store] pool_size`: connections to PostgreSQL per receiver.
pub const DEFAULT_POOL_SIZE: u64 = 16;
/// Default `[store] lease_seconds`: how long a receiver that stopped renewing its lease
/// keeps the outbox items it claimed before another receiver takes them over.
pub const DEFAULT_LEASE_SECONDS: u64 = 30;
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
/// Default `[outbox] badge_wait_milliseconds`: how long a badge update waits at least for
/// more events, so that a burst of reads is one push with the latest count.
pub const DEFAULT_BADGE_WAIT_MILLISECONDS: u64 = 1000;
/// Largest `[outbox] coalesce_milliseconds` and `badge_wait_milliseconds` (a minute: a
/// push later than that is late, and a badge wrong for too long).
pub const MAX_WAIT_MILLISECONDS: u64 = 60_000;
/// Default `[outbox] concurrency`: pushes in flight at once.
pub const DEFAULT_CONCURRENCY: u64 = 64;
/// `[server] header_read_timeout_seconds`: a client has this long to send a request's
/// headers (and an HTTP/1.1 keep-alive connection to start its next request).
pub const DEFAULT_HEADER_READ_TIMEOUT_SECONDS: u64 = 10;
/// `[server] idle_timeout_seconds`: a connection with no request in flight that sends
/// and receives nothing for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 60;
/// `[server] max_connections`: connections open at once; beyond, new ones wait in the
/// listen queue.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
/// `[devices] max_failed_logins`: failures in a row (per client address or user name)
/// before a lock.
pub const DEFAULT_MAX_FAILED_LOGINS: u64 = 5;
/// `[devices] failure_delay_milliseconds`: the wait after the first failure, doubling
/// with each further one.
pub const DEFAULT_FAILURE_DELAY_MILLISECONDS: u64 = 1000;
/// `[devices] lock_seconds`: how long a lock lasts.
pub const DEFAULT_LOCK_SECONDS: u64 = 300;
/// `[devices] max_concurrent_logins`: IMAP logins to Dovecot in flight at once.
pub const DEFAULT_MAX_CONCURRENT_LOGINS: u64 = 16;
/// `[devices] max_idle_days`: devices that have not registered for this long are removed
/// (0: never).
pub const DEFAULT_MAX_IDLE_DAYS: u64 = 90;
/// Largest accepted `[devices] max_idle_days` (ten years).
pub const MAX_MAX_IDLE_DAYS: u64 = 3650;
/// `[webpush] timeout_seconds`: bound on one exchange with a push service.
pub const DEFAULT_WEBPUSH_TIMEOUT_SECONDS: u64 = 10;
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
    pub devices: DevicesConfig,
    pub webpush: WebPushSettings,
    /// The `[[apps]]` entries, with every path resolved against the config file's
    /// directory.
    pub apps: Vec<AppConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `tls_cert` + `tls_key` (PEM files); both or neither.
    pub tls: Option<TlsFiles>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For` names the client (reverse proxies).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ServerConfig {
    /// The client a request is from: the peer, or behind a trusted proxy the last
    /// address of `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let Some(chain) = forwarded_for else {
            return peer;
        };
        chain
            .rsplit(',')
            .map(|hop| hop.trim().parse::<IpAddr>())
            .take_while(Result::is_ok)
            .flatten()
            .find(|ip| !trusted(ip))
            .unwrap_or(peer)
    }
}

/// `[devices]`: the device API's defences against guessing and floods, and how long an
/// unseen device is kept.
#[derive(Debug, Clone, Copy)]
pub struct DevicesConfig {
    pub max_failed_logins: u32,
    pub failure_delay: Duration,
    pub lock: Duration,
    pub max_concurrent_logins: usize,
    /// Devices not registered for this long are removed; `None`: kept forever.
    pub max_idle: Option<Duration>,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            max_failed_logins: DEFAULT_MAX_FAILED_LOGINS as u32,
            failure_delay: Duration::from_millis(DEFAULT_FAILURE_DELAY_MILLISECONDS),
            lock: Duration::from_secs(DEFAULT_LOCK_SECONDS),
            max_concurrent_logins: DEFAULT_MAX_CONCURRENT_LOGINS as usize,
            max_idle: Some(Duration::from_secs(DEFAULT_MAX_IDLE_DAYS * 86_400)),
        }
    }
}

/// `[webpush]`: which Web Push endpoints the receiver may reach, and how.
#[derive(Debug, Clone)]
pub struct WebPushSettings {
    /// Push service hosts (names or IP addresses) exempt from the address rules.
    pub allow_hosts: Vec<String>,
    /// Refuse loopback, private, link-local, … addresses (cloud metadata always is).
    pub deny_private: bool,
    /// Extra trust roots for a private push service (PEM).
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl Default for WebPushSettings {
    fn default() -> Self {
        WebPushSettings {
            allow_hosts: Vec::new(),
            deny_private: true,
            ca_file: None,
            timeout: Duration::from_secs(DEFAULT_WEBPUSH_TIMEOUT_SECONDS),
        }
    }
}

impl WebPushSettings {
    /// The address policy of these settings.
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy::new(&self.allow_hosts, self.deny_private)
    }

    /// The push crate's options (reads `ca_file`; the system resolver).
    pub fn options(&self) -> Result<WebPushOptions, String> {
        let extra_roots = match &self.ca_file {
            Some(path) => read_ca_file(path).map_err(|e| format!("{}: {e}", path.display()))?,
            None => Vec::new(),
        };
        Ok(WebPushOptions {
            policy: self.policy(),
            extra_roots,
            timeout: self.timeout,
            ..WebPushOptions::default()
        })
    }
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
    pub backend: StoreBackend,
    pub event_retention: Duration,
}

/// Which store: `path` (SQLite, the default) or `url` (PostgreSQL); exactly one.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreBackend {
    /// The SQLite file (relative paths are resolved against the config file's directory).
    Sqlite(PathBuf),
    Postgres(PostgresConfig),
}

/// `[store] url` and its companions.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// `postgresql://user@host[:port]/database[?options]`, without a password (safe to
    /// log).
    pub url: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// PEM CAs trusted for the server's certificate (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    /// How long a receiver's claim on outbox items outlives its last renewal.
    pub lease: Duration,
}

/// libpq's `sslmode`, as far as a client can honour it: `disable` (plain TCP), `prefer`
/// (TLS if the server offers it, certificate not checked), `require` (TLS, certificate
/// not checked), `verify-ca` (TLS, chain checked against `ca_file`), `verify-full` (and
/// the host name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// Every mode, as written in the file.
    pub const ALL: [(&'static str, SslMode); 5] = [
        ("disable", SslMode::Disable),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
    ];

    pub fn parse(s: &str) -> Option<SslMode> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

impl StoreConfig {
    /// The SQLite file, when that is the store.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.backend {
            StoreBackend::Sqlite(path) => Some(path),
            StoreBackend::Postgres(_) => None,
        }
    }

    /// Where the store is, for logs and messages (no password).
    pub fn describe(&self) -> String {
        match &self.backend {
            StoreBackend::Sqlite(path) => path.display().to_string(),
            StoreBackend::Postgres(pg) => pg.url.clone(),
        }
    }
}

/// How the receiver talks TLS to Dovecot's IMAP port (`none`, `starttls`, `implicit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImapTls {
    None,
    StartTls,
    Implicit,
}

/// The SASL mechanism the receiver uses to pass a device-API bearer token on to Dovecot
/// (`oauthbearer`, RFC 7628, or Google's older `xoauth2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OAuthMechanism {
    #[default]
    OAuthBearer,
    XOAuth2,
}

impl OAuthMechanism {
    /// The IMAP `AUTHENTICATE` name.
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthMechanism::OAuthBearer => "OAUTHBEARER",
            OAuthMechanism::XOAuth2 => "XOAUTH2",
        }
    }
}

/// The JWT claim naming the user when a bearer request has no `user` parameter.
pub const DEFAULT_OAUTH_USER_CLAIM: &str = "email";

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
    /// How bearer tokens are passed on to Dovecot.
    pub oauth_mechanism: OAuthMechanism,
    /// The JWT claim read (without trusting it) for the login when a bearer request does
    /// not name the user; Dovecot's verdict on the token decides.
    pub oauth_user_claim: String,
    /// Dovecot's doveadm HTTP API, for resync and the drift status (reads and writes any
    /// user's METADATA without their password, and lists every user's).
    pub doveadm: Option<DoveadmConfig>,
}

/// `[dovecot] doveadm_url` with `doveadm_api_key` / `doveadm_api_key_file`.
#[derive(Debug, Clone)]
pub struct DoveadmConfig {
    /// `http://host:port/doveadm/v1`.
    pub url: String,
    /// Dovecot's `doveadm_api_key`.
    pub api_key: Secret,
}

/// `[outbox]`: retry, deadline and coalescing policy.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub deadline: Duration,
    pub coalesce: Duration,
    /// How long a badge update waits at least for more events.
    pub badge_wait: Duration,
    pub concurrency: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(DEFAULT_RETRY_INITIAL_SECONDS),
            retry_max: Duration::from_secs(DEFAULT_RETRY_MAX_SECONDS),
            deadline: Duration::from_secs(DEFAULT_DEADLINE_SECONDS),
            coalesce: Duration::from_millis(DEFAULT_COALESCE_MILLISECONDS),
            badge_wait: Duration::from_millis(DEFAULT_BADGE_WAIT_MILLISECONDS),
            concurrency: DEFAULT_CONCURRENCY as usize,
        }
    }
}

/// Default `[[apps]] privacy`: what an app's devices get unless they choose.
pub const DEFAULT_APP_PRIVACY: Privacy = Privacy::Generic;

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
        let root: Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![ConfigProblem {
                key: "(syntax)".into(),
                message: e.message().to_owned()
                    + &e.span()
                        .map(|s| format!(" (at byte {})", s.start))
                        .unwrap_or_default(),
            }])
        })?;
        let mut problems = validate::Problems::default();
        let file = validate::read_file(root, &mut problems);
        let checked = match file {
            Some(file) => validate::check(file, &base_dir_of(path), problems),
            None => Err(problems),
        };
        let c = checked.map_err(|problems| fail(problems.sorted()))?;
        Ok(Config {
            source: path.to_owned(),
            server: c.server,
            notify: c.notify,
            admin: c.admin,
            store: c.store,
            dovecot: c.dovecot,
            outbox: c.outbox,
            devices: c.devices,
            webpush: c.webpush,
            apps: c.apps,
        })
    }

    /// Reads a `[store]` section alone (the `store copy` command's target, given on the
    /// command line) as a PostgreSQL store; errors name `--to` and the other options by
    /// their keys.
    pub fn parse_store(text: &str) -> Result<PostgresConfig, ConfigError> {
        let source = PathBuf::from("(command line)");
        let minimal = format!(
            "{text}\n[notify]\nusername = \"-\"\npassword = \"-\"\n[admin]\ntoken = \"{}\"\n",
            "-".repeat(MIN_ADMIN_TOKEN_LEN)
        );
        let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let c = Config::parse(&minimal, &base.join("(command line)"))?;
        match c.store.backend {
            StoreBackend::Postgres(pg) => Ok(pg),
            StoreBackend::Sqlite(_) => Err(ConfigError {
                file: source,
                problems: vec![ConfigProblem {
                    key: "store.url".into(),
                    message: "required".into(),
                }],
            }),
        }
    }

    /// The app entry with this id.
    pub fn app(&self, id: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.id == id)
    }

    /// The directory relative paths were resolved against.
    pub fn base_dir(&self) -> PathBuf {
        base_dir_of(&self.source)
    }

    /// The `[[apps]]` that have a push transport.
    pub fn push_apps(&self) -> Vec<AppConfig> {
        self.apps
            .iter()
            .filter(|a| a.has_transport())
            .cloned()
            .collect()
    }

    /// Builds the push senders of every app (one [`Pusher`], so apps sharing an Apple key
    /// share its connection and provider token; Web Push with the `[webpush]` settings). A
    /// failure names the app's key and this file.
    pub fn pusher(&self) -> Result<Pusher, ConfigError> {
        let apps = self.push_apps();
        let options = self.webpush.options().map_err(|message| ConfigError {
            file: self.source.clone(),
            problems: vec![ConfigProblem {
                key: "webpush.ca_file".into(),
                message,
            }],
        })?;
        Pusher::from_config_with(&apps, &self.base_dir(), &options).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use dovepush_push::ApnsEnvironment;

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
        assert_eq!(
            c.store.backend,
            StoreBackend::Sqlite(PathBuf::from(DEFAULT_STORE_PATH))
        );
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
    fn webpush_settings_and_app_keys() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.webpush.deny_private);
        assert!(c.webpush.allow_hosts.is_empty());
        assert_eq!(c.webpush.timeout, Duration::from_secs(10));
        let err = parse(&format!(
            "{MINIMAL}[webpush]\nallow_hosts = [\"push.example.net\", \"[::1]\", \
             \"https://x.example\", \"a.example:443\"]\nca_file = \"nope.pem\"\n\
             timeout_seconds = 0\ncolour = 1\n[[apps]]\nid = \"w\"\n[apps.webpush]\n\
             subject = \"mailto:ops@example.org\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            keys(&err),
            vec![
                "webpush.allow_hosts[2]",
                "webpush.allow_hosts[3]",
                "webpush.ca_file",
                "webpush.timeout_seconds",
                "webpush.colour",
                "apps[0].webpush.vapid_private_key_file",
            ]
        );
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vapid.txt"), "bad key").unwrap();
        let text = format!(
            "{MINIMAL}[webpush]\nallow_hosts = [\"Push.Example.net\"]\ndeny_private = false\n\
             [[apps]]\nid = \"w\"\n[apps.webpush]\nvapid_private_key_file = \"vapid.txt\"\n\
             subject = \"mailto:ops@example.org\"\n"
        );
        let err = Config::parse(&text, &dir.path().join("r.toml")).unwrap_err();
        assert_eq!(keys(&err), vec!["apps[0].webpush.vapid_private_key_file"]);
        // The raw base64url private key web-push tools print is accepted too.
        std::fs::write(
            dir.path().join("vapid.txt"),
            "IQ9Ur0ykXoHS9gzfYX0aBjy9lvdrjx_PFUXmie9YRcY\n",
        )
        .unwrap();
        let c = Config::parse(&text, &dir.path().join("r.toml")).unwrap();
        assert!(!c.webpush.deny_private);
        assert!(c.webpush.policy().host_allowed("push.example.net"));
        assert_eq!(c.apps[0].kinds(), vec![dovepush_push::DeviceKind::WebPush]);
        let pusher = c.pusher().unwrap();
        assert_eq!(pusher.vapid_public_key("w").map(str::len), Some(87));
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
        assert_eq!(
            c.store.sqlite_path(),
            Some(dir.path().join("state/receiver.sqlite").as_path())
        );
        assert_eq!(c.dovecot.master_user.as_deref(), Some("master"));
    }

    #[test]
    fn a_postgres_store_takes_url_password_file_tls_and_pool() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db.secret"), "db-pw\n").unwrap();
        let path = dir.path().join("receiver.toml");
        let text = format!(
            "{MINIMAL}[store]\nurl = \"postgresql://dovepush@db.example:5433/dovepush\"\n\
             password_file = \"db.secret\"\nsslmode = \"verify-full\"\nca_file = \"ca.pem\"\n\
             pool_size = 8\nlease_seconds = 20\n"
        );
        let c = Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
        let StoreBackend::Postgres(pg) = &c.store.backend else {
            panic!("{:?}", c.store.backend)
        };
        assert_eq!(pg.url, "postgresql://dovepush@db.example:5433/dovepush");
        assert_eq!(pg.password.as_ref().map(Secret::expose), Some("db-pw"));
        assert_eq!(pg.sslmode, SslMode::VerifyFull);
        assert_eq!(
            pg.ca_file.as_deref(),
            Some(dir.path().join("ca.pem").as_path())
        );
        assert_eq!((pg.pool_size, pg.lease), (8, Duration::from_secs(20)));
        assert_eq!(c.store.describe(), pg.url);
        assert!(!format!("{c:?}").contains("db-pw"));
        // Defaults: TLS preferred, no password (trust or a client certificate).
        let c = parse(&format!("{MINIMAL}[store]\nurl = \"postgres://u@h/db\"\n")).unwrap();
        let StoreBackend::Postgres(pg) = &c.store.backend else {
            panic!()
        };
        assert_eq!(pg.sslmode, SslMode::Prefer);
        assert_eq!(pg.pool_size, DEFAULT_POOL_SIZE as usize);
        assert_eq!(pg.lease, Duration::from_secs(DEFAULT_LEASE_SECONDS));
    }

    #[test]
    fn the_store_is_a_path_or_a_url_and_each_key_fits_its_backend() {
        let err = parse(&format!(
            "{MINIMAL}[store]\npath = \"/x.sqlite\"\nurl = \"postgresql://u@h/db\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["store.url"]);
        assert!(err.to_string().contains("not both"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}[store]\npath = \"/x.sqlite\"\nsslmode = \"require\"\npool_size = 3\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["store.sslmode", "store.pool_size"]);
        let err = parse(&format!(
            "{MINIMAL}[store]\nurl = \"postgresql://u:pw@h/db\"\nsslmode = \"sometimes\"\n\
             pool_size = 0\nlease_seconds = 1\n"
        ))
        .unwrap_err();
        assert_eq!(
            keys(&err),
            vec![
                "store.url",
                "store.sslmode",
                "store.pool_size",
                "store.lease_seconds"
            ]
        );
        let text = err.to_string();
        assert!(text.contains("password_file"), "{text}");
        assert!(
            !text.contains(":pw@"),
            "the password is not repeated: {text}"
        );
        for bad in [
            "mysql://u@h/db",
            "postgresql://h/db",
            "postgresql://u@h/db?sslmode=require",
        ] {
            let err = parse(&format!("{MINIMAL}[store]\nurl = \"{bad}\"\n")).unwrap_err();
            assert_eq!(keys(&err), vec!["store.url"], "{bad}: {err}");
        }
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
        assert_eq!(c.outbox.badge_wait, Duration::from_secs(1));
        let err = parse(&format!(
            "{MINIMAL}\n[[apps]]\nid = \"a\"\n[[apps]]\nid = \"a\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["apps[1].id"]);
    }

    #[test]
    fn waits_are_milliseconds_up_to_a_minute_and_shorter_than_the_deadline() {
        let c = parse(&format!(
            "{MINIMAL}\n[outbox]\nbadge_wait_milliseconds = 250\n"
        ))
        .unwrap();
        assert_eq!(c.outbox.badge_wait, Duration::from_millis(250));
        let c = parse(&format!(
            "{MINIMAL}\n[outbox]\nbadge_wait_milliseconds = 0\n"
        ))
        .unwrap();
        assert_eq!(c.outbox.badge_wait, Duration::ZERO);
        let err = parse(&format!(
            "{MINIMAL}\n[outbox]\nbadge_wait_milliseconds = 60001\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["outbox.badge_wait_milliseconds"]);
        assert!(err.to_string().contains("at most 60000"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}\n[outbox]\ncoalesce_milliseconds = 9223372036854775807\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["outbox.coalesce_milliseconds"]);
        // A deadline no longer than a wait would drop every such item unsent.
        let err = parse(&format!("{MINIMAL}\n[outbox]\ndeadline_seconds = 1\n")).unwrap_err();
        assert_eq!(keys(&err), vec!["outbox.deadline_seconds"]);
        let c = parse(&format!(
            "{MINIMAL}\n[outbox]\ndeadline_seconds = 1\nbadge_wait_milliseconds = 500\n"
        ))
        .unwrap();
        assert_eq!(c.outbox.deadline, Duration::from_secs(1));
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
        assert_eq!(app.generic_text, "You have mail");
        assert_eq!(app.ttl_secs, Some(3600));
        assert_eq!(app.privacy, Privacy::Full);
        let apns = app.apns.as_ref().unwrap();
        assert_eq!(apns.environment, ApnsEnvironment::Sandbox);
        assert_eq!(
            apns.key_file.as_deref(),
            Some(dir.path().join("keys/AuthKey.p8").as_path())
        );
        assert_eq!(apns.request_timeout_secs, Some(5));
        assert_eq!(
            app.fcm.as_ref().unwrap().service_account_file,
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

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_forwards() {
        let server = |proxies: &[&str]| ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10,
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = server(&[]);
        assert_eq!(
            none.client_address(ip("10.0.0.1"), Some("192.0.2.1")),
            ip("10.0.0.1")
        );
        let proxied = server(&["10.0.0.0/8", "127.0.0.1/32"]);
        assert_eq!(
            proxied.client_address(ip("10.0.0.1"), Some("192.0.2.1")),
            ip("192.0.2.1")
        );
        // A client cannot hide behind entries it wrote itself: the rightmost hop that is
        // not a trusted proxy wins.
        assert_eq!(
            proxied.client_address(ip("10.0.0.1"), Some("203.0.113.9, 192.0.2.1, 10.0.0.7")),
            ip("192.0.2.1")
        );
        assert_eq!(proxied.client_address(ip("10.0.0.1"), None), ip("10.0.0.1"));
        assert_eq!(
            proxied.client_address(ip("10.0.0.1"), Some("garbage")),
            ip("10.0.0.1")
        );
        assert_eq!(
            proxied.client_address(ip("192.0.2.5"), Some("10.0.0.1")),
            ip("192.0.2.5")
        );
    }
}
