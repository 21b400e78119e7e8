//! The [`Pusher`]: built from the `[[apps]]` config, it routes each send by app id and device
//! kind to that app's APNs, FCM or Web Push sender. [`Transport`] is the object-safe seam the
//! receiver holds (`Arc<dyn Transport>`) and fakes in its own tests.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::apns::{ApnsConnections, ApnsSender};
use crate::config::{AppConfig, ConfigError};
use crate::fcm::FcmSender;
use crate::model::{Device, DeviceKind, Notification, Privacy};
use crate::outcome::Outcome;
use crate::webpush::{WebPushClient, WebPushOptions, WebPushSender};

/// Sends one notification to one device: the one seam between whoever queues pushes (the
/// receiver's outbox) and the providers. Object safe: hold it as `Arc<dyn Transport>`.
/// Implementations bound their own time.
pub trait Transport: Send + Sync {
    /// Never fails as a `Result`: every failure is an [`Outcome`] class.
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Outcome>;
}

struct AppRoute {
    privacy: Privacy,
    apns: Option<ApnsSender>,
    fcm: Option<FcmSender>,
    webpush: Option<WebPushSender>,
}

/// The APNs, FCM and Web Push senders of every configured app.
pub struct Pusher {
    apps: HashMap<String, AppRoute>,
}

impl Pusher {
    /// Builds every app's senders. Relative file paths are resolved against `base_dir`
    /// (the directory of the receiver's config file). Reads key files; needs no runtime.
    /// Web Push uses the default [`WebPushOptions`] (public addresses only).
    pub fn from_config(apps: &[AppConfig], base_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_config_with(apps, base_dir, &WebPushOptions::default())
    }

    /// [`Pusher::from_config`] with the receiver's `[webpush]` options.
    pub fn from_config_with(
        apps: &[AppConfig],
        base_dir: &Path,
        webpush: &WebPushOptions,
    ) -> Result<Self, ConfigError> {
        let mut routes = HashMap::new();
        let mut connections = ApnsConnections::default();
        let mut webpush_client: Option<Arc<WebPushClient>> = None;
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
            if !app.has_transport() {
                return Err(ConfigError::invalid(
                    &app.id,
                    "apps.apns",
                    "the app has none of [apps.apns], [apps.fcm] and [apps.webpush]",
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
            let webpush = match &app.webpush {
                Some(cfg) => {
                    let client = match &webpush_client {
                        Some(client) => client.clone(),
                        None => {
                            let client = Arc::new(WebPushClient::new(webpush).map_err(|m| {
                                ConfigError::invalid(&app.id, "webpush.ca_file", m)
                            })?);
                            webpush_client = Some(client.clone());
                            client
                        }
                    };
                    Some(WebPushSender::from_config(app, cfg, base_dir, client)?)
                }
                None => None,
            };
            routes.insert(
                app.id.clone(),
                AppRoute {
                    privacy: app.privacy,
                    apns,
                    fcm,
                    webpush,
                },
            );
        }
        Ok(Pusher { apps: routes })
    }

    /// Sends `n` to `device` using the device's privacy override or the app's default; a
    /// badge-only update is always silent (it has nothing to show).
    pub async fn send(&self, device: &Device, n: &Notification) -> Outcome {
        let Some(app) = self.apps.get(&device.app_id) else {
            tracing::warn!(app = %device.app_id, "push for an app that is not configured; dropped");
            return Outcome::drop("unknown_app");
        };
        let privacy = if n.badge_only {
            Privacy::Silent
        } else {
            device.privacy.unwrap_or(app.privacy)
        };
        match (device.kind, &app.apns, &app.fcm, &app.webpush) {
            (DeviceKind::Apns, Some(apns), _, _) => apns.send(device, n, privacy).await,
            (DeviceKind::Fcm, _, Some(fcm), _) => fcm.send(device, n, privacy).await,
            (DeviceKind::WebPush, _, _, Some(webpush)) => webpush.send(device, n, privacy).await,
            (kind, _, _, _) => {
                tracing::warn!(app = %device.app_id, %kind, "app has no transport for this device kind; dropped");
                Outcome::drop("unsupported_device_kind")
            }
        }
    }

    /// Whether devices of `app_id`/`kind` can be served (check at registration time).
    pub fn supports(&self, app_id: &str, kind: DeviceKind) -> bool {
        self.apps.get(app_id).is_some_and(|app| match kind {
            DeviceKind::Apns => app.apns.is_some(),
            DeviceKind::Fcm => app.fcm.is_some(),
            DeviceKind::WebPush => app.webpush.is_some(),
        })
    }

    /// The VAPID public key of `app_id` (uncompressed P-256 point, unpadded base64url: a
    /// browser's `applicationServerKey`), if the app has `[apps.webpush]`.
    pub fn vapid_public_key(&self, app_id: &str) -> Option<&str> {
        let sender = self.apps.get(app_id)?.webpush.as_ref()?;
        Some(sender.vapid_public_key())
    }

    /// Provider tokens (APNs), OAuth tokens (FCM) or VAPID tokens (Web Push) minted so far
    /// for `app_id`'s `kind` (for metrics; apps sharing an Apple key share the count).
    pub fn credential_mints(&self, app_id: &str, kind: DeviceKind) -> u64 {
        let Some(app) = self.apps.get(app_id) else {
            return 0;
        };
        match kind {
            DeviceKind::Apns => app.apns.as_ref().map_or(0, ApnsSender::token_mints),
            DeviceKind::Fcm => app.fcm.as_ref().map_or(0, FcmSender::token_mints),
            DeviceKind::WebPush => app.webpush.as_ref().map_or(0, WebPushSender::token_mints),
        }
    }
}

impl Transport for Pusher {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(Pusher::send(self, device, notification))
    }
}
