//! Plugin settings: `plugin {}` (or userdb) values → a typed [`Config`].
//!
//! Two spellings are accepted, so that migrating from the ox driver is a rename:
//! - one line in the ox driver's syntax, `dovepush = ox:url=… cache_lifetime=60s
//!   max_retries=1 timeout_msecs=2000 user_from_metadata` (and `dovepush2`, `dovepush3`,
//!   … for more endpoints, numbered without gaps as in `push_notification_driverN`);
//! - separate settings: `dovepush_url` (`dovepush_url2`, …), `dovepush_max_retries`,
//!   `dovepush_timeout_msecs`, `dovepush_cache_lifetime`, `dovepush_user_from_metadata`.
//!
//! Every error names the offending key. A bad optional value falls back to its default
//! (and is reported), so that pushes keep flowing; a bad URL disables only its endpoint.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The settings dovepush reads; `name` is looked up with [`Settings::get`].
pub const SETTING_NAMES: &[&str] = &[
    "dovepush_cache_lifetime",
    "dovepush_negative_cache_lifetime",
    "dovepush_max_retries",
    "dovepush_timeout_msecs",
    "dovepush_user_from_metadata",
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

/// Where settings come from: the user's `plugin {}` values (already %-expanded).
pub trait Settings {
    fn get(&self, name: &str) -> Option<String>;
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
            "invalid setting {} in plugin {{}} of the Dovecot config: {}",
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
            .finish()
    }
}

impl Endpoint {
    /// Parse an endpoint URL (`http` or `https`, userinfo allowed).
    pub fn parse(
        key: &str,
        raw: &str,
        max_retries: u32,
        timeout: Duration,
        user_from_metadata: bool,
    ) -> Result<Endpoint, ConfigError> {
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
            max_retries,
            timeout,
            user_from_metadata,
        })
    }
}

fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(high * 16 + low);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        let mailboxes: Vec<String> = get("dovepush_mailboxes")
            .unwrap_or_else(|| DEFAULT_MAILBOXES.to_string())
            .split_whitespace()
            .map(str::to_string)
            .collect();

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
        for n in 1..=MAX_ENDPOINTS {
            let key = numbered("dovepush_url", n);
            let Some(url) = get(&key) else { break };
            match Endpoint::parse(&key, url.trim(), max_retries, timeout, user_from_metadata) {
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

/// Parse `ox:url=… cache_lifetime=… max_retries=… timeout_msecs=… user_from_metadata`.
/// Returns the endpoint and the line's `cache_lifetime`, if given.
pub fn parse_ox_line(key: &str, line: &str) -> Result<(Endpoint, Option<Duration>), ConfigError> {
    let (driver, options) = line.split_once(':').unwrap_or((line, ""));
    if !driver.trim().eq_ignore_ascii_case("ox") {
        return Err(error(
            key,
            format!("driver {:?} is not supported (only ox)", driver.trim()),
        ));
    }
    let mut url = None;
    let mut cache_lifetime = None;
    let mut max_retries = DEFAULT_MAX_RETRIES;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut user_from_metadata = false;
    for token in options.split(' ').filter(|t| !t.is_empty()) {
        let (name, value) = token.split_once('=').unwrap_or((token, ""));
        let fail = |p: String| error(key, format!("option {name}: {p}"));
        match name {
            "url" => url = Some(value.to_string()),
            "cache_lifetime" => cache_lifetime = Some(parse_interval(value).map_err(fail)?),
            "max_retries" => max_retries = parse_u32(value).map_err(fail)?,
            "timeout_msecs" => timeout = parse_msecs(value).map_err(fail)?,
            // The ox driver turns this on by the key's mere presence.
            "user_from_metadata" => user_from_metadata = true,
            _ => {}
        }
    }
    let url = url.ok_or_else(|| error(key, "the url option is missing"))?;
    let endpoint = Endpoint::parse(key, &url, max_retries, timeout, user_from_metadata)?;
    Ok((endpoint, cache_lifetime))
}

/// Dovecot's time interval syntax: `60s`, `1min`, `2 hours`, `500ms`; a bare number is
/// taken as seconds.
pub fn parse_interval(value: &str) -> Result<Duration, String> {
    let value = value.trim();
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
        "m" | "min" | "mins" | "minute" | "minutes" => secs(number * 60),
        "h" | "hour" | "hours" => secs(number * 3600),
        "d" | "day" | "days" => secs(number * 86_400),
        "w" | "week" | "weeks" => secs(number * 7 * 86_400),
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

/// A size such as `256M`, `1G`, `512k` or plain bytes.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
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
        other => return Err(format!("unknown size unit {other:?} in {value:?}")),
    };
    Ok(number * factor)
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
            "ox:url=https://login:pa%40ss@ox.example.net:8009/preliminary/http-notify/v1/notify cache_lifetime=2min max_retries=3 timeout_msecs=1500 user_from_metadata",
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        let e = &c.endpoints[0];
        assert_eq!(e.max_retries, 3);
        assert_eq!(e.timeout, Duration::from_millis(1500));
        assert!(e.user_from_metadata);
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
    fn user_from_metadata_is_a_presence_flag_in_ox_syntax() {
        let (c, _) = config(&[("dovepush", "ox:url=http://h/ user_from_metadata=no")]);
        assert!(c.endpoints[0].user_from_metadata);
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
            ("dovepush_mailboxes", "INBOX Work"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.endpoints.len(), 2);
        assert!(c.endpoints.iter().all(|e| e.max_retries == 5
            && e.timeout == Duration::from_millis(300)
            && e.user_from_metadata));
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
        assert!(parse_size("1T").is_err());
        assert!(parse_bool("YES").unwrap());
        assert!(!parse_bool("no").unwrap());
    }
}
