//! The real push transports: wraps dovepush-push's [`Pusher`] (APNs over HTTP/2, FCM HTTP
//! v1, Web Push) so that every provider answer is also counted in [`PushOutcomes`] by app,
//! transport, class and the provider's reason word (`Unregistered`, `BadDeviceToken`,
//! `UNAVAILABLE`, …), and builds the [`Transports`] of a config.

use std::sync::Arc;

use dovepush_push::{Device, Notification, Outcome, Pusher, Transport};
use futures_util::future::BoxFuture;

use super::Transports;
use crate::config::{Config, ConfigError};
use crate::telemetry::PushOutcomes;

/// One [`Pusher`] (all configured apps), counting its answers.
pub struct ProviderTransport {
    pusher: Arc<Pusher>,
    outcomes: Arc<PushOutcomes>,
}

impl ProviderTransport {
    /// Sends through `pusher`, counting every answer in `outcomes`.
    pub fn new(pusher: Arc<Pusher>, outcomes: Arc<PushOutcomes>) -> Self {
        Self { pusher, outcomes }
    }
}

impl Transport for ProviderTransport {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let outcome = self.pusher.send(device, notification).await;
            self.outcomes.record(
                &device.app_id,
                device.kind,
                outcome.class(),
                outcome.reason(),
            );
            outcome
        })
    }
}

/// The transports of `config`: one [`Pusher`] for every `[[apps]]` entry with `[apps.apns]`,
/// `[apps.fcm]` or `[apps.webpush]`, registered for exactly those apps and kinds (with the
/// VAPID public keys of the Web Push apps). Apps without a transport
/// get none (their pushes wait, counted as `no_transport`, until the deadline).
pub fn transports_from_config(config: &Config) -> Result<Transports, ConfigError> {
    let mut transports = Transports::new();
    if config.apps.iter().all(|a| !a.has_transport()) {
        return Ok(transports);
    }
    let pusher = Arc::new(config.pusher()?);
    for app in &config.apps {
        if let Some(key) = pusher.vapid_public_key(&app.id) {
            transports = transports.with_vapid_key(&app.id, key);
        }
    }
    let transport: Arc<dyn Transport> =
        Arc::new(ProviderTransport::new(pusher, transports.push_outcomes()));
    for app in &config.apps {
        for kind in app.kinds() {
            transports = transports.with_app(&app.id, kind, transport.clone());
        }
    }
    Ok(transports)
}
