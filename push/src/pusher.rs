//! The [`Pusher`]: built from the `[[apps]]` config, it routes each send by app id and device
//! kind to that app's APNs or FCM sender. [`PushTransport`] is the object-safe seam the
//! receiver holds (`Arc<dyn PushTransport>`) and fakes in its own tests.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use crate::apns::{ApnsConnections, ApnsSender};
use crate::config::{AppConfig, ConfigError};
use crate::fcm::FcmSender;
use crate::model::{Device, DeviceKind, Notification, Privacy};
use crate::outcome::Outcome;

/// A boxed, sendable future, as returned by [`PushTransport::send`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends one notification to one device. Object safe: hold it as `Arc<dyn PushTransport>`.
pub trait PushTransport: Send + Sync {
    /// Never fails as a `Result`: every failure is an [`Outcome`] class.
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Outcome>;

    /// Whether devices of `app_id`/`kind` can be served (check at registration time).
    fn supports(&self, app_id: &str, kind: DeviceKind) -> bool;
}

struct AppRoute {
    privacy: Privacy,
    apns: Option<ApnsSender>,
    fcm: Option<FcmSender>,
}

/// The APNs and FCM senders of every configured app.
pub struct Pusher {
    apps: HashMap<String, AppRoute>,
}

impl Pusher {
    /// Builds every app's senders. Relative file paths are resolved against `base_dir`
    /// (the directory of the receiver's config file). Reads key files; needs no runtime.
    pub fn from_config(apps: &[AppConfig], base_dir: &Path) -> Result<Self, ConfigError> {
        let mut routes = HashMap::new();
        let mut connections = ApnsConnections::default();
        for app in apps {
            if app.id.trim().is_empty() {
                return Err(ConfigError::invalid(
                    &app.id,
                    "apps.id",
                    "must not be empty",
                ));
            }
            if routes.contains_key(&app.id) {
                return Err(ConfigError::invalid(&app.id, "apps.id", "appears twice"));
            }
            if app.apns.is_none() && app.fcm.is_none() {
                return Err(ConfigError::invalid(
                    &app.id,
                    "apps.apns",
                    "the app has neither [apps.apns] nor [apps.fcm]",
                ));
            }
            if app.ttl_secs.is_some_and(|t| t > 28 * 24 * 3600) {
                return Err(ConfigError::invalid(
                    &app.id,
                    "apps.ttl_secs",
                    "at most 2419200 (28 days)",
                ));
            }
            let apns = match &app.apns {
                Some(cfg) => Some(ApnsSender::from_config(
                    app,
                    cfg,
                    base_dir,
                    &mut connections,
                )?),
                None => None,
            };
            let fcm = match &app.fcm {
                Some(cfg) => Some(FcmSender::from_config(app, cfg, base_dir)?),
                None => None,
            };
            routes.insert(
                app.id.clone(),
                AppRoute {
                    privacy: app.privacy,
                    apns,
                    fcm,
                },
            );
        }
        Ok(Pusher { apps: routes })
    }

    /// Sends `n` to `device` using the device's privacy override or the app's default.
    pub async fn send(&self, device: &Device, n: &Notification) -> Outcome {
        let Some(app) = self.apps.get(&device.app_id) else {
            tracing::warn!(app = %device.app_id, "push for an app that is not configured; dropped");
            return Outcome::drop("unknown_app");
        };
        let privacy = device.privacy.unwrap_or(app.privacy);
        match (device.kind, &app.apns, &app.fcm) {
            (DeviceKind::Apns, Some(apns), _) => apns.send(device, n, privacy).await,
            (DeviceKind::Fcm, _, Some(fcm)) => fcm.send(device, n, privacy).await,
            (kind, _, _) => {
                tracing::warn!(app = %device.app_id, %kind, "app has no transport for this device kind; dropped");
                Outcome::drop("unsupported_device_kind")
            }
        }
    }

    /// Configured app ids.
    pub fn app_ids(&self) -> impl Iterator<Item = &str> {
        self.apps.keys().map(String::as_str)
    }

    /// Provider tokens (APNs) or OAuth tokens (FCM) minted so far for `app_id`'s `kind`
    /// (for metrics; apps sharing an Apple key share the count).
    pub fn credential_mints(&self, app_id: &str, kind: DeviceKind) -> u64 {
        let Some(app) = self.apps.get(app_id) else {
            return 0;
        };
        match kind {
            DeviceKind::Apns => app.apns.as_ref().map_or(0, ApnsSender::token_mints),
            DeviceKind::Fcm => app.fcm.as_ref().map_or(0, FcmSender::token_mints),
        }
    }
}

impl PushTransport for Pusher {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(Pusher::send(self, device, notification))
    }

    fn supports(&self, app_id: &str, kind: DeviceKind) -> bool {
        self.apps.get(app_id).is_some_and(|app| match kind {
            DeviceKind::Apns => app.apns.is_some(),
            DeviceKind::Fcm => app.fcm.is_some(),
        })
    }
}
