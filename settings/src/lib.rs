//! dovepush-settings: the `dovepush_*` Dovecot settings → a typed [`Config`], for
//! Dovecot 2.3 (`plugin {}`) and 2.4 (typed global settings) alike.
//!
//! Two readers share this one parser: the plugin (each user's settings, userdb values
//! included) and the sender service (the global settings, from Dovecot's config process
//! on 2.3, from `doveconf` on 2.4). The service sends only to endpoints its own reading
//! names.
//!
//! On Dovecot 2.3 two spellings are accepted, so that migrating from the ox driver is a
//! rename:
//! - one line in the ox driver's syntax, `dovepush = ox:url=… cache_lifetime=60s
//!   max_retries=1 timeout_msecs=2000 user_from_metadata` (and `dovepush2`, `dovepush3`,
//!   … for more endpoints, numbered without gaps as in `push_notification_driverN`);
//! - separate settings: `dovepush_url` (`dovepush_url2`, …), `dovepush_max_retries`,
//!   `dovepush_timeout_msecs`, `dovepush_cache_lifetime`, `dovepush_user_from_metadata`,
//!   `dovepush_batch`, `dovepush_events`.
//!
//! `dovepush_events` (an ox line's `events=`, a block's `events`) says which event
//! kinds an endpoint takes; the default, `messageNew`, is all the stock ox receiver
//! understands, so the badge events (`messageRead`, `messageExpunge`, `messageAppend`)
//! go only to endpoints that ask for them.
//!
//! On Dovecot 2.4 the same names are typed settings (declared in
//! `ffi/shim/dovepush-settings.c`; Dovecot checks their syntax), and several endpoints
//! are named blocks in the style of the stock driver, `dovepush <name> { url = … }`
//! ([`Settings::blocks`]): each block is one endpoint, and what a block does not set
//! comes from the global settings. Values arrive in Dovecot's spellings (`2 secs`,
//! `256 M`, `infinite`), which the parsers here read.
//!
//! Every error names the offending key. A bad optional value falls back to its default
//! (and is reported), so that pushes keep flowing; a bad URL disables only its endpoint.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use dovepush_protocol::notification::{EventKind, EventSet};

/// The settings dovepush reads; `name` is looked up with [`Settings::get`].
pub const SETTING_NAMES: &[&str] = &[
    "dovepush_cache_lifetime",
    "dovepush_negative_cache_lifetime",
    "dovepush_max_retries",
    "dovepush_timeout_msecs",
    "dovepush_user_from_metadata",
    "dovepush_batch",
    "dovepush_events",
    "dovepush_mailboxes",
    "dovepush_spool_dir",
    "dovepush_spool_max_size",
    "dovepush_spool_max_age",
    "dovepush_spool_retry_interval",
    "dovepush_queue_size",
    "dovepush_debug",
];

pub const DEFAULT_CACHE_LIFETIME: Duration = Duration::from_secs(60);
pub const DEFAULT_NEGATIVE_CACHE_LIFETIME: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_RETRIES: u32 = 1;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
pub const DEFAULT_MAILBOXES: &str = "INBOX";
pub const DEFAULT_SPOOL_SUBDIR: &str = "dovepush-spool";
pub const DEFAULT_SPOOL_MAX_SIZE: u64 = 256 * 1024 * 1024;
pub const DEFAULT_SPOOL_MAX_AGE: Duration = Duration::from_secs(2 * 24 * 3600);
pub const DEFAULT_SPOOL_RETRY_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_QUEUE_SIZE: usize = 10_000;
/// Endpoints are numbered `…`, `…2`, `…3`; the scan stops at the first gap or here.
pub const MAX_ENDPOINTS: usize = 16;

/// Where settings come from: the user's `plugin {}` values (already %-expanded) on 2.3,
/// the typed settings on 2.4.
pub trait Settings {
    /// A global setting (on 2.3, of `plugin {}`).
    fn get(&self, name: &str) -> Option<String>;
    /// Dovecot 2.4: the names of the `dovepush <name> { … }` blocks, in config order.
    /// Each is one endpoint; with none, `dovepush_url` is the endpoint.
    fn blocks(&self) -> Vec<String> {
        Vec::new()
    }
    /// A setting as block `block` sets it itself (full name, e.g. `dovepush_url`);
    /// `None` when it does not, and then the global value applies.
    fn get_in(&self, block: &str, name: &str) -> Option<String> {
        let _ = (block, name);
        None
    }
}

impl<F: Fn(&str) -> Option<String>> Settings for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// A setting that could not be used as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid setting {} in the Dovecot config: {}",
            self.key, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

fn error(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// One HTTP receiver, as the ox driver's `url` plus its options.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as configured, credentials included (kept for the spool; never logged).
    pub url: String,
    /// The URL without credentials: safe to log, and the endpoint's identity.
    pub display_url: String,
    /// `Basic …` when the URL has `user:password@` (as the ox driver: a password part,
    /// even empty, is required).
    pub authorization: Option<String>,
    pub max_retries: u32,
    pub timeout: Duration,
    pub user_from_metadata: bool,
    /// Events queued while a request is in flight go together in one request to the
    /// receiver's batch URL (a dovepush receiver only; the ox receiver has none).
    pub batch: bool,
    /// The event kinds this endpoint takes (`dovepush_events`; default `messageNew`).
    pub events: EventSet,
}

/// An endpoint's options besides its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointOptions {
    pub max_retries: u32,
    pub timeout: Duration,
    pub user_from_metadata: bool,
    pub batch: bool,
    pub events: EventSet,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            max_retries: DEFAULT_MAX_RETRIES,
            timeout: DEFAULT_TIMEOUT,
            user_from_metadata: false,
            batch: false,
            events: EventSet::default(),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.display_url)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("max_retries", &self.max_retries)
            .field("timeout", &self.timeout)
            .field("user_from_metadata", &self.user_from_metadata)
            .field("batch", &self.batch)
            .field("events", &self.events)
            .finish()
    }
}

impl Endpoint {
    /// Parse an endpoint URL (`http` or `https`, userinfo allowed).
    pub fn parse(key: &str, raw: &str, options: EndpointOptions) -> Result<Endpoint, ConfigError> {
        let url = url::Url::parse(raw).map_err(|e| error(key, format!("not a URL ({e})")))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(error(
                key,
                format!("scheme {} is not http or https", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(error(key, "the URL has no host"));
        }
        let authorization = match url.password() {
            Some(password) if !url.username().is_empty() => {
                let credentials = format!(
                    "{}:{}",
                    percent_decode(url.username()),
                    percent_decode(password)
                );
                Some(format!(
                    "Basic {}",
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials)
                ))
            }
            _ => None,
        };
        let mut display = url.clone();
        let _ = display.set_username("");
        let _ = display.set_password(None);
        display.set_fragment(None);
        Ok(Endpoint {
            url: raw.to_string(),
            display_url: display.to_string(),
            authorization,
            max_retries: options.max_retries,
            timeout: options.timeout,
            user_from_metadata: options.user_from_metadata,
            batch: options.batch,
            events: options.events,
        })
    }
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// The spool: where unsent events wait, and its bounds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_size: u64,
    pub max_age: Duration,
    pub retry_interval: Duration,
}

/// Everything dovepush needs for one user's deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub endpoints: Vec<Endpoint>,
    pub cache_lifetime: Duration,
    pub negative_cache_lifetime: Duration,
    pub mailboxes: Vec<String>,
    pub spool: SpoolSettings,
    pub queue_size: usize,
    pub debug: bool,
}

impl Config {
    /// Whether deliveries into `folder` produce notifications.
    pub fn watches(&self, folder: &str) -> bool {
        self.mailboxes.iter().any(|m| m == folder || (m == "*"))
    }

    /// Read the configuration. Returns the config plus the problems found (each already
    /// handled by a fallback); `Ok` with no endpoints means dovepush is not configured.
    pub fn from_settings(
        settings: &dyn Settings,
        default_state_dir: &str,
    ) -> (Config, Vec<ConfigError>) {
        let mut problems = Vec::new();
        let get = |key: &str| settings.get(key).filter(|v| !v.trim().is_empty());
        let cache_lifetime = read(
            &get,
            &mut problems,
            "dovepush_cache_lifetime",
            parse_interval,
        );
        let negative_cache_lifetime = read(
            &get,
            &mut problems,
            "dovepush_negative_cache_lifetime",
            parse_interval,
        )
        .unwrap_or(DEFAULT_NEGATIVE_CACHE_LIFETIME);
        let max_retries = read(&get, &mut problems, "dovepush_max_retries", parse_u32)
            .unwrap_or(DEFAULT_MAX_RETRIES);
        let timeout = read(&get, &mut problems, "dovepush_timeout_msecs", parse_msecs)
            .unwrap_or(DEFAULT_TIMEOUT);
        let user_from_metadata = read(
            &get,
            &mut problems,
            "dovepush_user_from_metadata",
            parse_bool,
        )
        .unwrap_or(false);
        let batch = read(&get, &mut problems, "dovepush_batch", parse_bool).unwrap_or(false);
        let events = read(&get, &mut problems, "dovepush_events", parse_events).unwrap_or_default();
        let debug = read(&get, &mut problems, "dovepush_debug", parse_bool).unwrap_or(false);
        let max_size = read(&get, &mut problems, "dovepush_spool_max_size", parse_size)
            .unwrap_or(DEFAULT_SPOOL_MAX_SIZE);
        let max_age = read(
            &get,
            &mut problems,
            "dovepush_spool_max_age",
            parse_interval,
        )
        .unwrap_or(DEFAULT_SPOOL_MAX_AGE);
        let retry_interval = read(
            &get,
            &mut problems,
            "dovepush_spool_retry_interval",
            parse_interval,
        )
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_SPOOL_RETRY_INTERVAL);
        let queue_size = read(&get, &mut problems, "dovepush_queue_size", parse_u32)
            .map(|n| n.max(1) as usize)
            .unwrap_or(DEFAULT_QUEUE_SIZE);
        let spool_dir = get("dovepush_spool_dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default_state_dir).join(DEFAULT_SPOOL_SUBDIR));
        let mailboxes = parse_mailboxes(
            &get("dovepush_mailboxes").unwrap_or_else(|| DEFAULT_MAILBOXES.to_string()),
        );

        let mut endpoints = Vec::new();
        let mut ox_cache_lifetime: Option<Duration> = None;
        for n in 1..=MAX_ENDPOINTS {
            let key = numbered("dovepush", n);
            let Some(line) = get(&key) else { break };
            match parse_ox_line(&key, &line) {
                Ok((endpoint, lifetime)) => {
                    // One cache serves every endpoint: the shortest lifetime given wins
                    // (a subscription change then takes effect as soon as any of the
                    // ox drivers it replaces would have seen it).
                    ox_cache_lifetime = match (ox_cache_lifetime, lifetime) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    endpoints.push(endpoint);
                }
                Err(e) => problems.push(e),
            }
        }
        // With named blocks (2.4), the global dovepush_url is only their default URL.
        let plain_urls = if settings.blocks().is_empty() {
            MAX_ENDPOINTS
        } else {
            0
        };
        for n in 1..=plain_urls {
            let key = numbered("dovepush_url", n);
            let Some(url) = get(&key) else { break };
            let options = EndpointOptions {
                max_retries,
                timeout,
                user_from_metadata,
                batch,
                events,
            };
            match Endpoint::parse(&key, url.trim(), options) {
                Ok(endpoint) => endpoints.push(endpoint),
                Err(e) => problems.push(e),
            }
        }
        for block in settings.blocks() {
            match named_endpoint(settings, &block) {
                Ok(endpoint) => endpoints.push(endpoint),
                Err(e) => problems.push(e),
            }
        }
        let cache_lifetime = cache_lifetime
            .or(ox_cache_lifetime)
            .unwrap_or(DEFAULT_CACHE_LIFETIME);

        let config = Config {
            endpoints,
            cache_lifetime,
            negative_cache_lifetime: negative_cache_lifetime.min(cache_lifetime),
            mailboxes,
            spool: SpoolSettings {
                dir: spool_dir,
                max_size,
                max_age,
                retry_interval,
            },
            queue_size,
            debug,
        };
        (config, problems)
    }
}

/// The endpoint of a `dovepush <block> { … }` block (Dovecot 2.4): its own settings
/// over the global ones. A bad value is an error of the block (Dovecot has checked the
/// syntax of each already).
fn named_endpoint(settings: &dyn Settings, block: &str) -> Result<Endpoint, ConfigError> {
    let get = |name: &str| {
        settings
            .get_in(block, name)
            .or_else(|| settings.get(name))
            .filter(|v| !v.trim().is_empty())
    };
    let key = |name: &str| {
        format!(
            "dovepush {block} {{ {} }}",
            name.trim_start_matches("dovepush_")
        )
    };
    fn option<T>(
        value: Option<String>,
        key: String,
        parse: fn(&str) -> Result<T, String>,
        default: T,
    ) -> Result<T, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse(v.trim()).map_err(|p| error(&key, p)),
        }
    }
    let defaults = EndpointOptions::default();
    let options = EndpointOptions {
        max_retries: option(
            get("dovepush_max_retries"),
            key("dovepush_max_retries"),
            parse_u32,
            defaults.max_retries,
        )?,
        timeout: option(
            get("dovepush_timeout_msecs"),
            key("dovepush_timeout_msecs"),
            parse_msecs,
            defaults.timeout,
        )?,
        user_from_metadata: option(
            get("dovepush_user_from_metadata"),
            key("dovepush_user_from_metadata"),
            parse_bool,
            defaults.user_from_metadata,
        )?,
        batch: option(
            get("dovepush_batch"),
            key("dovepush_batch"),
            parse_bool,
            defaults.batch,
        )?,
        events: option(
            get("dovepush_events"),
            key("dovepush_events"),
            parse_events,
            defaults.events,
        )?,
    };
    let url = get("dovepush_url").ok_or_else(|| error(&key("dovepush_url"), "no url is set"))?;
    Endpoint::parse(&key("dovepush_url"), url.trim(), options)
}

fn numbered(base: &str, n: usize) -> String {
    if n == 1 {
        base.to_string()
    } else {
        format!("{base}{n}")
    }
}

/// Read and parse one optional setting; a bad value is recorded and treated as unset.
fn read<T>(
    get: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<ConfigError>,
    key: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Option<T> {
    let raw = get(key)?;
    parse(raw.trim())
        .map_err(|problem| problems.push(error(key, problem)))
        .ok()
}

/// Space-separated mailbox names; a name with spaces in double quotes
/// (`INBOX "Sent Items"`), as Dovecot's own lists take them.
pub fn parse_mailboxes(value: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = value.trim_start();
    while !rest.is_empty() {
        let (name, after) = match rest.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
            None => rest.split_once(char::is_whitespace).unwrap_or((rest, "")),
        };
        if !name.is_empty() {
            names.push(name.to_string());
        }
        rest = after.trim_start();
    }
    names
}

/// Parse `ox:url=… cache_lifetime=… max_retries=… timeout_msecs=… user_from_metadata
/// batch events=messageNew,messageRead,messageExpunge` (an ox line's endpoint takes only
/// `messageNew` unless it says `events=`; the global `dovepush_events` is for the
/// `dovepush_url` endpoints).
/// Returns the endpoint and the line's `cache_lifetime`, if given.
pub fn parse_ox_line(key: &str, line: &str) -> Result<(Endpoint, Option<Duration>), ConfigError> {
    let (driver, tokens) = line.split_once(':').unwrap_or((line, ""));
    if !driver.trim().eq_ignore_ascii_case("ox") {
        return Err(error(
            key,
            format!("driver {:?} is not supported (only ox)", driver.trim()),
        ));
    }
    let mut url = None;
    let mut cache_lifetime = None;
    let mut options = EndpointOptions::default();
    for token in tokens.split(' ').filter(|t| !t.is_empty()) {
        let (name, value) = token.split_once('=').unwrap_or((token, ""));
        let fail = |p: String| error(key, format!("option {name}: {p}"));
        match name {
            "url" => url = Some(value.to_string()),
            "cache_lifetime" => cache_lifetime = Some(parse_interval(value).map_err(fail)?),
            "max_retries" => options.max_retries = parse_u32(value).map_err(fail)?,
            "timeout_msecs" => options.timeout = parse_msecs(value).map_err(fail)?,
            // The ox driver turns this on by the key's mere presence.
            "user_from_metadata" => options.user_from_metadata = true,
            // dovepush's own flag, spelt the same way.
            "batch" => options.batch = true,
            "events" => options.events = parse_events(value).map_err(fail)?,
            _ => {}
        }
    }
    let url = url.ok_or_else(|| error(key, "the url option is missing"))?;
    let endpoint = Endpoint::parse(key, &url, options)?;
    Ok((endpoint, cache_lifetime))
}

/// What Dovecot 2.4's `infinite` time comes to: a century, long enough for any timer
/// and short enough that adding it to an instant cannot overflow.
pub const INFINITE: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Dovecot's time interval syntax: `60s`, `1min`, `2 hours`, `500ms`, `2 secs` (2.4's
/// doveconf), `infinite`; a bare number is taken as seconds.
pub fn parse_interval(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("infinite") {
        return Ok(INFINITE);
    }
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a time interval such as 60s or 5min"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let secs = |n: u64| Ok(Duration::from_secs(n));
    match unit.as_str() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => secs(number),
        "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => {
            Ok(Duration::from_millis(number))
        }
        "m" | "min" | "mins" | "minute" | "minutes" => secs(number.saturating_mul(60)),
        "h" | "hour" | "hours" => secs(number.saturating_mul(3600)),
        "d" | "day" | "days" => secs(number.saturating_mul(86_400)),
        "w" | "week" | "weeks" => secs(number.saturating_mul(7 * 86_400)),
        _ => Err(format!("unknown time unit {unit:?} in {value:?}")),
    }
}

/// A plain number of milliseconds (as the ox driver's `timeout_msecs`); `ms`/`s` units
/// are accepted too.
pub fn parse_msecs(value: &str) -> Result<Duration, String> {
    let timeout = match value.trim().parse::<u64>() {
        Ok(n) => Duration::from_millis(n),
        Err(_) => parse_interval(value)
            .map_err(|_| format!("{value:?} is not a number of milliseconds"))?,
    };
    // Every attempt would time out at once and every event end in the spool.
    if timeout.is_zero() {
        return Err("a timeout of 0 is not allowed".into());
    }
    Ok(timeout)
}

/// Event kind names (`messageNew messageRead messageExpunge messageAppend`), separated by
/// spaces or commas.
pub fn parse_events(value: &str) -> Result<EventSet, String> {
    EventSet::parse(value)
}

pub fn parse_u32(value: &str) -> Result<u32, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a non-negative whole number"))
}

pub fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "yes" | "y" | "true" | "1" | "on" => Ok(true),
        "no" | "n" | "false" | "0" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not yes or no")),
    }
}

/// A size such as `256M`, `1G`, `512k`, `256 M` (2.4's doveconf), `unlimited`, or plain
/// bytes.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("unlimited") {
        return Ok(u64::MAX);
    }
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a size such as 256M"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {value:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{value:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> (Config, Vec<ConfigError>) {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = move |k: &str| map.get(k).cloned();
        Config::from_settings(&get, "/var/lib/dovecot")
    }

    #[test]
    fn nothing_configured_means_no_endpoints_and_defaults() {
        let (c, problems) = config(&[]);
        assert!(problems.is_empty());
        assert!(c.endpoints.is_empty());
        assert_eq!(c.cache_lifetime, DEFAULT_CACHE_LIFETIME);
        assert_eq!(c.mailboxes, vec!["INBOX"]);
        assert_eq!(
            c.spool.dir,
            PathBuf::from("/var/lib/dovecot/dovepush-spool")
        );
    }

    #[test]
    fn ox_line_with_every_option() {
        let (c, problems) = config(&[(
            "dovepush",
            "ox:url=https://login:pa%40ss@ox.example.net:8009/preliminary/http-notify/v1/notify cache_lifetime=2min max_retries=3 timeout_msecs=1500 user_from_metadata batch",
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        let e = &c.endpoints[0];
        assert_eq!(e.max_retries, 3);
        assert_eq!(e.timeout, Duration::from_millis(1500));
        assert!(e.user_from_metadata);
        assert!(e.batch);
        assert_eq!(c.cache_lifetime, Duration::from_secs(120));
        assert_eq!(
            e.display_url,
            "https://ox.example.net:8009/preliminary/http-notify/v1/notify"
        );
        // base64("login:pa@ss")
        assert_eq!(e.authorization.as_deref(), Some("Basic bG9naW46cGFAc3M="));
        assert!(!format!("{e:?}").contains("pa%40ss"));
    }

    #[test]
    fn display_url_keeps_an_at_sign_in_the_path() {
        // Found by fuzzing: only the userinfo goes, an '@' in the path stays.
        let e = Endpoint::parse(
            "k",
            "https://lt:8009/prelim/ogin:pa%39ss@ox.example.net/n",
            EndpointOptions::default(),
        )
        .unwrap();
        assert_eq!(
            e.display_url,
            "https://lt:8009/prelim/ogin:pa%39ss@ox.example.net/n"
        );
        assert_eq!(e.authorization, None);
        let e = Endpoint::parse("k", "https://u:p@h/x@y", EndpointOptions::default()).unwrap();
        assert_eq!(e.display_url, "https://h/x@y");
        assert!(e.authorization.is_some());
    }

    #[test]
    fn user_from_metadata_is_a_presence_flag_in_ox_syntax() {
        let (c, _) = config(&[("dovepush", "ox:url=http://h/ user_from_metadata=no")]);
        assert!(c.endpoints[0].user_from_metadata);
        assert!(!c.endpoints[0].batch, "batching is opt-in");
    }

    #[test]
    fn separate_settings_and_numbered_endpoints() {
        let (c, problems) = config(&[
            ("dovepush_url", "http://127.0.0.1:1/a"),
            ("dovepush_url2", "http://u@127.0.0.1:2/b"),
            ("dovepush_url4", "http://127.0.0.1:4/ignored-after-gap"),
            ("dovepush_max_retries", "5"),
            ("dovepush_timeout_msecs", "300"),
            ("dovepush_user_from_metadata", "yes"),
            ("dovepush_batch", "yes"),
            ("dovepush_mailboxes", "INBOX Work"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.endpoints.len(), 2);
        assert!(c.endpoints.iter().all(|e| e.max_retries == 5
            && e.timeout == Duration::from_millis(300)
            && e.user_from_metadata
            && e.batch));
        // user without a password part: no Basic auth, as the ox driver.
        assert_eq!(c.endpoints[1].authorization, None);
        assert!(c.watches("Work") && c.watches("INBOX") && !c.watches("Junk"));
    }

    #[test]
    fn bad_values_name_the_key_and_fall_back() {
        let (c, problems) = config(&[
            ("dovepush_url", "ftp://x/"),
            ("dovepush_max_retries", "many"),
            ("dovepush_timeout_msecs", "soon"),
            ("dovepush_cache_lifetime", "5 fortnights"),
            ("dovepush_debug", "maybe"),
        ]);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "dovepush_cache_lifetime",
                "dovepush_max_retries",
                "dovepush_timeout_msecs",
                "dovepush_debug",
                "dovepush_url"
            ]
        );
        assert!(problems[0].to_string().contains("dovepush_cache_lifetime"));
        assert!(c.endpoints.is_empty());
        assert_eq!(c.cache_lifetime, DEFAULT_CACHE_LIFETIME);
    }

    #[test]
    fn ox_line_errors() {
        assert_eq!(
            parse_ox_line("dovepush", "ox:max_retries=1")
                .unwrap_err()
                .problem,
            "the url option is missing"
        );
        assert!(parse_ox_line("dovepush", "dlog:").is_err());
        for zero in ["0", "0ms", "0s"] {
            assert!(
                parse_msecs(zero).unwrap_err().contains("0 is not allowed"),
                "{zero}"
            );
        }
        let e = parse_ox_line("dovepush2", "ox:url=http://h/ timeout_msecs=0").unwrap_err();
        assert!(e.problem.contains("timeout_msecs"));
        let e = parse_ox_line("dovepush2", "ox:url=http://h/ timeout_msecs=abc").unwrap_err();
        assert_eq!(e.key, "dovepush2");
        assert!(e.problem.contains("timeout_msecs"));
    }

    #[test]
    fn several_ox_lines_share_the_shortest_cache_lifetime() {
        let (c, problems) = config(&[
            ("dovepush", "ox:url=http://a/ max_retries=1"),
            ("dovepush2", "ox:url=http://b/ cache_lifetime=2min"),
            ("dovepush3", "ox:url=http://c/ cache_lifetime=30s"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.endpoints.len(), 3);
        assert_eq!(c.cache_lifetime, Duration::from_secs(30));
    }

    /// A 2.4 source: global settings plus `dovepush <name> { … }` blocks.
    struct Dovecot24 {
        global: HashMap<String, String>,
        blocks: Vec<(String, HashMap<String, String>)>,
    }

    impl Settings for Dovecot24 {
        fn get(&self, name: &str) -> Option<String> {
            self.global.get(name).cloned()
        }
        fn blocks(&self) -> Vec<String> {
            self.blocks.iter().map(|(n, _)| n.clone()).collect()
        }
        fn get_in(&self, block: &str, name: &str) -> Option<String> {
            let (_, set) = self.blocks.iter().find(|(n, _)| n == block)?;
            set.get(name).cloned()
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn named_blocks_are_the_endpoints_and_inherit_the_global_settings() {
        let source = Dovecot24 {
            global: map(&[
                ("dovepush_url", "http://default/notify"),
                ("dovepush_max_retries", "4"),
                ("dovepush_timeout_msecs", "2 secs"),
                ("dovepush_user_from_metadata", "no"),
                ("dovepush_batch", "no"),
                ("dovepush_cache_lifetime", "1 mins"),
            ]),
            blocks: vec![
                (
                    "ox".into(),
                    map(&[
                        ("dovepush_url", "https://u:p@ox.example.net/notify"),
                        ("dovepush_user_from_metadata", "yes"),
                        ("dovepush_timeout_msecs", "500 ms"),
                    ]),
                ),
                ("plain".into(), map(&[("dovepush_batch", "yes")])),
            ],
        };
        let (c, problems) = Config::from_settings(&source, "/var/lib/dovecot");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            c.endpoints.len(),
            2,
            "the global URL is no endpoint of its own"
        );
        let (ox, plain) = (&c.endpoints[0], &c.endpoints[1]);
        assert_eq!(ox.display_url, "https://ox.example.net/notify");
        assert!(ox.authorization.is_some() && ox.user_from_metadata && !ox.batch);
        assert_eq!(ox.timeout, Duration::from_millis(500));
        assert_eq!(ox.max_retries, 4);
        assert_eq!(plain.display_url, "http://default/notify");
        assert!(plain.batch && !plain.user_from_metadata);
        assert_eq!(plain.timeout, Duration::from_secs(2));
        assert_eq!(c.cache_lifetime, Duration::from_secs(60));
    }

    #[test]
    fn events_default_to_message_new_and_are_opt_in_per_endpoint() {
        let badges =
            EventSet::parse("messageNew messageRead messageExpunge messageAppend").unwrap();
        let (c, problems) = config(&[
            ("dovepush", "ox:url=http://ox/"),
            (
                "dovepush2",
                "ox:url=http://mine/ events=messageNew,messageRead,messageExpunge,messageAppend",
            ),
            ("dovepush_url", "http://a/"),
            (
                "dovepush_events",
                "messageNew messageRead messageExpunge messageAppend",
            ),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            c.endpoints[0].events,
            EventSet::default(),
            "an ox line is the stock driver's"
        );
        assert_eq!(c.endpoints[1].events, badges);
        assert_eq!(c.endpoints[2].events, badges);
        let (c, _) = config(&[("dovepush_url", "http://a/")]);
        assert_eq!(c.endpoints[0].events, EventSet::default());
        assert!(!c.endpoints[0].events.has_badge_updates());

        let source = Dovecot24 {
            global: map(&[("dovepush_url", "http://default/")]),
            blocks: vec![
                ("ox".into(), map(&[])),
                (
                    "mine".into(),
                    map(&[(
                        "dovepush_events",
                        "messageAppend messageNew messageExpunge messageRead",
                    )]),
                ),
            ],
        };
        let (c, problems) = Config::from_settings(&source, "/var/lib/dovecot");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.endpoints[0].events, EventSet::default());
        assert_eq!(c.endpoints[1].events, badges);
    }

    #[test]
    fn a_bad_event_name_names_the_key_and_keeps_the_default() {
        let (c, problems) = config(&[
            ("dovepush_url", "http://a/"),
            ("dovepush_events", "messageNew messageRaed"),
        ]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "dovepush_events");
        let text = problems[0].to_string();
        assert!(
            text.contains("dovepush_events") && text.contains("\"messageRaed\""),
            "{text}"
        );
        assert_eq!(c.endpoints[0].events, EventSet::default());
        let e = parse_ox_line("dovepush", "ox:url=http://a/ events=all").unwrap_err();
        assert!(e.to_string().contains("option events"), "{e}");
    }

    #[test]
    fn a_bad_block_is_reported_with_its_name_and_skipped() {
        let source = Dovecot24 {
            global: map(&[("dovepush_url", "")]),
            blocks: vec![
                ("nourl".into(), map(&[])),
                ("ftp".into(), map(&[("dovepush_url", "ftp://x/")])),
                ("good".into(), map(&[("dovepush_url", "http://x/")])),
            ],
        };
        let (c, problems) = Config::from_settings(&source, "/var/lib/dovecot");
        assert_eq!(c.endpoints.len(), 1);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["dovepush nourl { url }", "dovepush ftp { url }"]);
    }

    #[test]
    fn mailbox_lists() {
        assert_eq!(parse_mailboxes("INBOX  Work"), ["INBOX", "Work"]);
        assert_eq!(
            parse_mailboxes(r#"INBOX "Sent Items" Archive/2024 "unterminated"#),
            ["INBOX", "Sent Items", "Archive/2024", "unterminated"]
        );
        assert!(parse_mailboxes("  ").is_empty());
    }

    #[test]
    fn dovecot_24_spellings() {
        assert_eq!(parse_interval("2 secs").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_interval("1 mins").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_interval("2 days").unwrap(),
            Duration::from_secs(172_800)
        );
        assert_eq!(
            parse_interval("1 weeks").unwrap(),
            Duration::from_secs(604_800)
        );
        assert_eq!(parse_interval("infinite").unwrap(), INFINITE);
        assert_eq!(parse_msecs("100 ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_msecs("60000ms").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_size("256 M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1 T").unwrap(), 1 << 40);
        assert_eq!(parse_size("unlimited").unwrap(), u64::MAX);
        assert!(parse_size("99999999999 T").is_err());
        assert_eq!(
            parse_interval("99999999999999999 weeks").unwrap(),
            Duration::from_secs(u64::MAX)
        );
    }

    #[test]
    fn intervals_sizes_bools() {
        assert_eq!(parse_interval("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_interval("1 min").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_interval("2hours").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("60").unwrap(), Duration::from_secs(60));
        assert!(parse_interval("s").is_err());
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("1P").is_err());
        assert!(parse_bool("YES").unwrap());
        assert!(!parse_bool("no").unwrap());
    }
}
