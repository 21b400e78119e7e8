//! Configuration: the TOML file → a typed, validated [`Config`].
//!
//! Owns every config key, its default (the `DEFAULT_*` consts) and its checks. Loading is
//! strict and complete: unknown keys are errors, and every problem in the file is collected
//! before failing, so one [`ConfigError`] names every bad key together with the file.
//! Secrets may be given inline (`password`) or read from a file (`password_file`); they are
//! wrapped in [`Secret`], whose `Debug` never shows the value.
//!
//! Sections: `[server]`, `[notify]`, `[admin]`, `[store]`, `[dovecot]`, `[outbox]` and the
//! array `[[apps]]`. Transports add their own sub-tables to `[[apps]]` later
//! (`[apps.apns]`, `[apps.fcm]`): see [`AppConfig`] and `parse_app`, the one place to extend.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
pub const DEFAULT_COALESCE_MILLISECONDS: u64 = 250;
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

/// One `[[apps]]` entry: an app that may register devices.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub id: String,
    /// Default privacy of the app's devices (a device may choose its own).
    pub privacy: Option<Privacy>,
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
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
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
                                if let Some(app) = parse_app(&mut r, t, &prefix) {
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
}

/// Parses one `[[apps]]` entry. Transports will add `apns`/`fcm` sub-tables here.
fn parse_app(r: &mut Reader, mut t: Table, prefix: &str) -> Option<AppConfig> {
    let id = r.string(&mut t, prefix, "id");
    match &id {
        None => r.bad(&format!("{prefix}.id"), "required"),
        Some(id) if !valid_app_id(id) => r.bad(
            &format!("{prefix}.id"),
            "use 1-64 characters of a-z, A-Z, 0-9, '.', '_' or '-'",
        ),
        _ => {}
    }
    let privacy = r.string(&mut t, prefix, "privacy").and_then(|p| {
        let parsed = Privacy::parse(&p);
        if parsed.is_none() {
            r.bad(
                &format!("{prefix}.privacy"),
                "expected \"full\", \"generic\" or \"silent\"",
            );
        }
        parsed
    });
    r.finish(t, prefix);
    id.map(|id| AppConfig { id, privacy })
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
        match t.remove(key) {
            None => default,
            Some(Value::Integer(i)) if i >= 0 => i as u64,
            Some(_) => {
                self.bad(&Self::key(prefix, key), "expected a non-negative integer");
                default
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
apns = { topic = "a" }
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
                "apps[1].apns",
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
        assert_eq!(
            c.app("mail.example").unwrap().privacy,
            Some(Privacy::Generic)
        );
        assert_eq!(c.outbox.retry_initial, Duration::from_secs(2));
        assert_eq!(c.outbox.coalesce, Duration::ZERO);
        let err = parse(&format!(
            "{MINIMAL}\n[[apps]]\nid = \"a\"\n[[apps]]\nid = \"a\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), vec!["apps[1].id"]);
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
