//! The health of the receiver's credentials, so that a forgotten renewal is an alert and
//! not a silent stop of every push: the expiry (`notAfter`) of each APNs client
//! certificate, of the receiver's own server certificate and of the IMAP CA bundle,
//! re-read at start and daily; and which credentials a push provider rejected last (APNs
//! `403 ExpiredProviderToken`, a refused FCM service account, …) until a push with them
//! succeeds again. It feeds `GET /v1/status/credentials`, the metric families
//! `dovepush_credential_expiry_timestamp_seconds` and `dovepush_credential_rejected`, and
//! log warnings 30, 7 and 1 days ahead (each once per certificate, again after a renewal).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dovepush_push::{AppConfig, DeviceKind};

use crate::config::Config;
use crate::telemetry::Metrics;

/// How often the certificates are read again (a renewed file is picked up then).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Days ahead of an expiry at which the log warns (then once more when it has expired).
pub const WARNING_DAYS: [u32; 3] = [30, 7, 1];

/// What kind of credential a record is about (a fixed label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CredentialKind {
    /// `[apps.apns] cert_file`.
    ApnsCertificate,
    /// `[apps.apns] key_file` (token auth; the key itself does not expire).
    ApnsToken,
    /// `[apps.fcm] service_account_file`.
    FcmServiceAccount,
    /// `[apps.webpush] vapid_private_key_file` (a key; it does not expire).
    WebPushVapid,
    /// `[server] tls_cert`.
    ServerCertificate,
    /// `[dovecot] ca_file` (the earliest expiry in the bundle).
    ImapCa,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApnsCertificate => "apns_certificate",
            CredentialKind::ApnsToken => "apns_token",
            CredentialKind::FcmServiceAccount => "fcm_service_account",
            CredentialKind::WebPushVapid => "webpush_vapid",
            CredentialKind::ServerCertificate => "server_certificate",
            CredentialKind::ImapCa => "imap_ca",
        }
    }

    /// Whether the file is a certificate (bundle) with an expiry to watch.
    fn expires(self) -> bool {
        matches!(
            self,
            CredentialKind::ApnsCertificate
                | CredentialKind::ServerCertificate
                | CredentialKind::ImapCa
        )
    }
}

/// A provider's refusal of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// The provider's reason word (e.g. `ExpiredProviderToken`).
    pub reason: String,
}

/// One watched credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    /// The app id, empty for the receiver's own credentials.
    pub app: String,
    pub kind: CredentialKind,
    pub file: Option<PathBuf>,
    /// `notAfter` in seconds since the epoch (the earliest of the file's certificates).
    pub not_after: Option<i64>,
    /// Why the file could not be read or parsed at the last refresh.
    pub read_error: Option<String>,
    /// The last rejection by the provider, until a push with the credential succeeds.
    pub rejected: Option<Rejection>,
    /// The warning level already logged (30, 7, 1 or 0 for expired).
    warned: Option<u32>,
}

impl CredentialRecord {
    fn new(app: &str, kind: CredentialKind, file: Option<PathBuf>) -> Self {
        Self {
            app: app.to_owned(),
            kind,
            file,
            not_after: None,
            read_error: None,
            rejected: None,
            warned: None,
        }
    }

    /// Seconds left until `notAfter` (negative once expired).
    pub fn seconds_left(&self, now: SystemTime) -> Option<i64> {
        self.not_after.map(|t| t - unix_seconds(now))
    }
}

/// The watched credentials of one receiver.
pub struct CredentialWatch {
    records: Mutex<Vec<CredentialRecord>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CredentialWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialWatch").finish_non_exhaustive()
    }
}

impl CredentialWatch {
    /// The credentials `config` names (nothing read yet: call [`CredentialWatch::refresh`]).
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Self {
        let mut records = Vec::new();
        for app in &config.apps {
            records.extend(app_records(app));
        }
        if let Some(tls) = &config.server.tls {
            records.push(CredentialRecord::new(
                "",
                CredentialKind::ServerCertificate,
                Some(tls.cert.clone()),
            ));
        }
        if let Some(ca) = &config.dovecot.ca_file {
            records.push(CredentialRecord::new(
                "",
                CredentialKind::ImapCa,
                Some(ca.clone()),
            ));
        }
        for r in &records {
            metrics.set_credential_rejected(&r.app, r.kind.as_str(), false);
        }
        Self {
            records: Mutex::new(records),
            metrics,
        }
    }

    /// Reads every certificate again, updates the expiry metrics and logs what comes close
    /// to expiring (once per warning level).
    pub fn refresh(&self, now: SystemTime) {
        let mut records = self.lock();
        for r in records.iter_mut().filter(|r| r.kind.expires()) {
            let read = r
                .file
                .as_deref()
                .ok_or_else(|| "no file".to_owned())
                .and_then(earliest_not_after);
            match read {
                Ok(not_after) => {
                    r.not_after = Some(not_after);
                    r.read_error = None;
                    self.metrics
                        .set_credential_expiry(&r.app, r.kind.as_str(), not_after);
                }
                Err(e) => {
                    if r.read_error.as_deref() != Some(e.as_str()) {
                        tracing::error!(
                            app = %r.app,
                            kind = r.kind.as_str(),
                            file = ?r.file,
                            error = %e,
                            "Cannot read a certificate to watch its expiry."
                        );
                    }
                    r.read_error = Some(e);
                }
            }
            warn_if_due(r, now);
        }
    }

    /// A push with `app`'s `transport` credentials was refused by the provider.
    pub fn rejected(&self, app: &str, transport: DeviceKind, reason: &str, now: SystemTime) {
        let mut records = self.lock();
        if let Some(r) = find(&mut records, app, transport) {
            r.rejected = Some(Rejection {
                at_ms: i64::try_from(
                    now.duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis(),
                )
                .unwrap_or(i64::MAX),
                reason: reason.to_owned(),
            });
            self.metrics
                .set_credential_rejected(&r.app, r.kind.as_str(), true);
        }
    }

    /// A push with `app`'s `transport` credentials was accepted: any rejection is over.
    pub fn accepted(&self, app: &str, transport: DeviceKind) {
        let mut records = self.lock();
        if let Some(r) = find(&mut records, app, transport) {
            if r.rejected.take().is_some() {
                tracing::info!(app = %app, kind = r.kind.as_str(), "Credentials accepted again.");
                self.metrics
                    .set_credential_rejected(&r.app, r.kind.as_str(), false);
            }
        }
    }

    /// The records, in configuration order.
    pub fn snapshot(&self) -> Vec<CredentialRecord> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CredentialRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn app_records(app: &AppConfig) -> Vec<CredentialRecord> {
    let mut out = Vec::new();
    if let Some(apns) = &app.apns {
        out.push(match &apns.cert_file {
            Some(cert) => {
                CredentialRecord::new(&app.id, CredentialKind::ApnsCertificate, Some(cert.clone()))
            }
            None => {
                CredentialRecord::new(&app.id, CredentialKind::ApnsToken, apns.key_file.clone())
            }
        });
    }
    if let Some(fcm) = &app.fcm {
        out.push(CredentialRecord::new(
            &app.id,
            CredentialKind::FcmServiceAccount,
            Some(fcm.service_account_file.clone()),
        ));
    }
    if let Some(webpush) = &app.webpush {
        out.push(CredentialRecord::new(
            &app.id,
            CredentialKind::WebPushVapid,
            Some(webpush.vapid_private_key_file.clone()),
        ));
    }
    out
}

/// The record of the credentials `app` pushes to `transport` with.
fn find<'a>(
    records: &'a mut [CredentialRecord],
    app: &str,
    transport: DeviceKind,
) -> Option<&'a mut CredentialRecord> {
    records.iter_mut().find(|r| {
        r.app == app
            && match transport {
                DeviceKind::Apns => matches!(
                    r.kind,
                    CredentialKind::ApnsCertificate | CredentialKind::ApnsToken
                ),
                DeviceKind::Fcm => r.kind == CredentialKind::FcmServiceAccount,
                DeviceKind::WebPush => r.kind == CredentialKind::WebPushVapid,
            }
    })
}

/// The warning level `seconds_left` falls in: 0 once expired, else the smallest of
/// [`WARNING_DAYS`] it is within.
pub fn warning_level(seconds_left: i64) -> Option<u32> {
    if seconds_left <= 0 {
        return Some(0);
    }
    WARNING_DAYS
        .iter()
        .rev()
        .copied()
        .find(|days| seconds_left <= i64::from(*days) * 86_400)
}

fn warn_if_due(r: &mut CredentialRecord, now: SystemTime) {
    let Some(left) = r.seconds_left(now) else {
        return;
    };
    let level = warning_level(left);
    let file = r.file.as_deref().map(Path::display);
    match level {
        None => r.warned = None,
        Some(l) if r.warned.is_none_or(|w| l < w) => {
            r.warned = Some(l);
            let days = left as f64 / 86_400.0;
            if l == 0 {
                tracing::error!(app = %r.app, kind = r.kind.as_str(), file = ?file, "ALERT: a certificate has expired; renew it.");
            } else if l == 1 {
                tracing::error!(app = %r.app, kind = r.kind.as_str(), file = ?file, days_left = format!("{days:.1}"), "ALERT: a certificate expires within a day; renew it.");
            } else {
                tracing::warn!(app = %r.app, kind = r.kind.as_str(), file = ?file, days_left = format!("{days:.1}"), "A certificate expires within {l} days; renew it.");
            }
        }
        Some(_) => {}
    }
}

/// The earliest `notAfter` (seconds since the epoch) of the PEM certificates in `path`.
pub fn earliest_not_after(path: &Path) -> Result<i64, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    earliest_not_after_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// The earliest `notAfter` of the certificates in a PEM bundle (other blocks, such as a
/// private key in the same file, are skipped).
pub fn earliest_not_after_pem(pem: &[u8]) -> Result<i64, String> {
    let mut earliest: Option<i64> = None;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("bad PEM: {e}"))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block
            .parse_x509()
            .map_err(|e| format!("bad certificate: {e}"))?;
        let t = cert.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    earliest.ok_or_else(|| "no certificate in the file".to_owned())
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_levels() {
        let day = 86_400;
        assert_eq!(warning_level(31 * day), None);
        assert_eq!(warning_level(30 * day), Some(30));
        assert_eq!(warning_level(8 * day), Some(30));
        assert_eq!(warning_level(7 * day), Some(7));
        assert_eq!(warning_level(day + 1), Some(7));
        assert_eq!(warning_level(day), Some(1));
        assert_eq!(warning_level(1), Some(1));
        assert_eq!(warning_level(0), Some(0));
        assert_eq!(warning_level(-5), Some(0));
    }

    #[test]
    fn pem_bundles() {
        assert!(earliest_not_after_pem(b"").is_err());
        assert!(earliest_not_after_pem(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        .is_err());
        let pki = dovepush_mocks::TestPki::new();
        let soon = pki.issue_client_cert_expiring("a", Duration::from_secs(5 * 86_400));
        let later = pki.issue_client_cert_expiring("b", Duration::from_secs(50 * 86_400));
        let bundle = format!("{}{}{}", later.cert_pem, soon.key_pem, soon.cert_pem);
        let t = earliest_not_after_pem(bundle.as_bytes()).unwrap();
        let left = t - unix_seconds(SystemTime::now());
        assert!((5 * 86_400 - 60..=5 * 86_400).contains(&left), "{left}");
    }

    #[test]
    fn warnings_once_per_level_and_again_after_renewal() {
        let mut r = CredentialRecord::new("mail", CredentialKind::ApnsCertificate, None);
        let now = SystemTime::now();
        let at = |days: i64| unix_seconds(now) + days * 86_400;
        r.not_after = Some(at(20));
        warn_if_due(&mut r, now);
        assert_eq!(r.warned, Some(30));
        r.not_after = Some(at(6));
        warn_if_due(&mut r, now);
        assert_eq!(r.warned, Some(7));
        warn_if_due(&mut r, now);
        assert_eq!(r.warned, Some(7));
        r.not_after = Some(at(365));
        warn_if_due(&mut r, now);
        assert_eq!(r.warned, None);
    }
}
