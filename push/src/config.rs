//! The `[[apps]]` configuration the receiver embeds (serde structs), and the
//! [`ConfigError`] that names the app, the key and the file at fault.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::Privacy;

/// Default time a push may wait at APNs/FCM for an offline device.
pub const DEFAULT_TTL_SECS: u64 = 24 * 3600;
/// Default time for one HTTP exchange with APNs, FCM or the OAuth token endpoint.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 20;

/// One `[[apps]]` entry: a mobile app whose devices this instance pushes to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// What devices send as `app` when they register.
    pub id: String,
    /// Default privacy for the app's devices (`full`, `generic`, `silent`); default `generic`.
    #[serde(default)]
    pub privacy: Privacy,
    /// Alert text in generic mode; default "New mail".
    #[serde(default = "default_generic_text")]
    pub generic_text: String,
    /// How long APNs/FCM keep a push for an offline device, in seconds (APNs `apns-expiration`,
    /// FCM `android.ttl`); default one day, at most 28 days.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    pub apns: Option<ApnsConfig>,
    pub fcm: Option<FcmConfig>,
    pub webpush: Option<WebPushConfig>,
}

impl AppConfig {
    /// True when the app has `[apps.apns]`, `[apps.fcm]` or `[apps.webpush]` (an app
    /// without any may still register devices with a receiver; its pushes wait).
    pub fn has_transport(&self) -> bool {
        self.apns.is_some() || self.fcm.is_some() || self.webpush.is_some()
    }

    /// The device kinds the app has a transport for.
    pub fn kinds(&self) -> Vec<crate::DeviceKind> {
        let mut kinds = Vec::new();
        if self.apns.is_some() {
            kinds.push(crate::DeviceKind::Apns);
        }
        if self.fcm.is_some() {
            kinds.push(crate::DeviceKind::Fcm);
        }
        if self.webpush.is_some() {
            kinds.push(crate::DeviceKind::WebPush);
        }
        kinds
    }
}

fn default_generic_text() -> String {
    "New mail".to_owned()
}

/// `[apps.apns]`: token auth (`team_id` + `key_id` + `key_file`) or certificate auth
/// (`cert_file`, PEM with certificate chain and private key, or `cert_key_file` for the key).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// The app's bundle id, sent as `apns-topic`.
    pub topic: String,
    #[serde(default)]
    pub environment: ApnsEnvironment,
    pub team_id: Option<String>,
    pub key_id: Option<String>,
    /// The `.p8` (PKCS#8 PEM, ES256) key downloaded from Apple.
    pub key_file: Option<PathBuf>,
    /// Client certificate, PEM (`.p12` is refused with a conversion hint).
    pub cert_file: Option<PathBuf>,
    /// Private key of the client certificate, PEM; default: read it from `cert_file`.
    pub cert_key_file: Option<PathBuf>,
    /// Only meaningful for `.p12`, which is not supported; see the README.
    pub cert_password_file: Option<PathBuf>,
    /// Base URL replacing Apple's host for the environment (proxies, tests).
    pub endpoint: Option<String>,
    /// Extra PEM trust roots, added to the bundled Mozilla roots.
    pub ca_file: Option<PathBuf>,
    pub request_timeout_secs: Option<u64>,
}

/// APNs environment: which Apple host is used when no `endpoint` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApnsEnvironment {
    #[default]
    Production,
    Sandbox,
}

impl ApnsEnvironment {
    pub fn default_endpoint(self) -> &'static str {
        match self {
            ApnsEnvironment::Production => "https://api.push.apple.com",
            ApnsEnvironment::Sandbox => "https://api.sandbox.push.apple.com",
        }
    }
}

/// `[apps.fcm]`: FCM HTTP v1 with a service account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// Service-account JSON from the Firebase console; `project_id`, `client_email`,
    /// `private_key` and `token_uri` come from it.
    pub service_account_file: PathBuf,
    /// Base URL replacing `https://fcm.googleapis.com`.
    pub endpoint: Option<String>,
    /// Extra PEM trust roots, for both the FCM endpoint and the token endpoint.
    pub ca_file: Option<PathBuf>,
    pub request_timeout_secs: Option<u64>,
}

/// `[apps.webpush]`: Web Push with the app's VAPID key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushConfig {
    /// The VAPID private key: PEM (PKCS#8 as `openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256` writes it, or SEC1), or the raw 32-byte key in base64url.
    pub vapid_private_key_file: PathBuf,
    /// The operator's contact the push services see: `mailto:…` or `https://…`.
    pub subject: String,
}

/// A configuration fault, naming the app (`[[apps]] id`), the key and, for file keys, the file.
/// The receiver adds the name of its own config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("[[apps]] id = {app:?}: {key}: {message}")]
    Invalid {
        app: String,
        key: &'static str,
        message: String,
    },
    #[error("[[apps]] id = {app:?}: {key} = {}: {message}", path.display())]
    File {
        app: String,
        key: &'static str,
        path: PathBuf,
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(app: &str, key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            app: app.to_owned(),
            key,
            message: message.into(),
        }
    }

    pub(crate) fn file(
        app: &str,
        key: &'static str,
        path: &Path,
        message: impl Into<String>,
    ) -> Self {
        ConfigError::File {
            app: app.to_owned(),
            key,
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// The config key at fault, e.g. `apps.apns.key_file`.
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::File { key, .. } => key,
        }
    }
}

/// Resolves a configured path against the directory of the config file.
pub(crate) fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base_dir.join(path)
    }
}

/// Reads a file named by config key `key`, with an error naming both.
pub(crate) fn read_file(
    app: &str,
    key: &'static str,
    base_dir: &Path,
    path: &Path,
) -> Result<(PathBuf, Vec<u8>), ConfigError> {
    let full = resolve(base_dir, path);
    match std::fs::read(&full) {
        Ok(bytes) => Ok((full, bytes)),
        Err(err) => Err(ConfigError::file(
            app,
            key,
            &full,
            format!("cannot read: {err}"),
        )),
    }
}

/// Checks and normalises a base URL (no trailing slash, http or https, no path or query).
pub(crate) fn parse_endpoint(
    app: &str,
    key: &'static str,
    url: &str,
) -> Result<String, ConfigError> {
    let trimmed = url.trim_end_matches('/');
    let uri: hyper::Uri = trimmed
        .parse()
        .map_err(|e| ConfigError::invalid(app, key, format!("{url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => {
            return Err(ConfigError::invalid(
                app,
                key,
                format!("{url:?}: scheme must be https (or http for a local h2c proxy)"),
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(ConfigError::invalid(
            app,
            key,
            format!("{url:?} has no host"),
        ));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(ConfigError::invalid(
            app,
            key,
            format!("{url:?}: give only scheme, host and port"),
        ));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_validation() {
        assert_eq!(
            parse_endpoint("a", "apps.apns.endpoint", "https://127.0.0.1:9443/").unwrap(),
            "https://127.0.0.1:9443"
        );
        assert!(parse_endpoint("a", "apps.apns.endpoint", "ftp://x").is_err());
        assert!(parse_endpoint("a", "apps.apns.endpoint", "https://x/3/device").is_err());
        let err = parse_endpoint("mail", "apps.fcm.endpoint", "nonsense").unwrap_err();
        assert!(err.to_string().contains("apps.fcm.endpoint"), "{err}");
        assert!(err.to_string().contains("\"mail\""), "{err}");
    }

    #[test]
    fn app_defaults() {
        let app: AppConfig = serde_json::from_str(r#"{"id":"x"}"#).unwrap();
        assert_eq!(app.privacy, Privacy::Generic);
        assert_eq!(app.generic_text, "New mail");
        assert!(app.apns.is_none() && app.fcm.is_none());
    }
}
