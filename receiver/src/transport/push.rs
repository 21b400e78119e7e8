//! The real push transports: adapts dovepush-push's [`Pusher`] (APNs over HTTP/2, FCM HTTP
//! v1) to the receiver's [`Transport`] trait, and builds the [`Transports`] of a config.
//!
//! Owns the mapping in both directions: a [`Push`] becomes a provider [`Device`] and
//! [`Notification`] (raw RFC 2047 headers are passed on, the provider crate decodes them),
//! and a provider [`dovepush_push::Outcome`] becomes the receiver's [`Outcome`] with the
//! provider's reason word kept (`Unregistered`, `BadDeviceToken`, `UNAVAILABLE`, …). Every
//! answer is also counted in [`PushOutcomes`] by app, transport, class and reason.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use dovepush_push::{Device, Notification, Pusher};

use super::{Outcome, Push, SendFuture, Transport, TransportKind, Transports};
use crate::config::{Config, ConfigError};
use crate::telemetry::PushOutcomes;

/// One [`Pusher`] (all configured apps) as a receiver [`Transport`].
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
    fn send<'a>(&'a self, push: &'a Push) -> SendFuture<'a> {
        Box::pin(async move {
            let (device, notification) = provider_view(push);
            let outcome = self.pusher.send(&device, &notification).await;
            self.outcomes
                .record(&push.app, push.transport, outcome.class(), outcome.reason());
            receiver_outcome(outcome)
        })
    }
}

/// The provider crate's view of a push: the device (with its privacy and registration time)
/// and the notification (raw header values; the provider decodes and shortens them).
pub fn provider_view(push: &Push) -> (Device, Notification) {
    let device = Device {
        app_id: push.app.clone(),
        kind: push.transport,
        token: push.token.clone(),
        // The registry resolved it at registration: the device's choice, else the app's default.
        privacy: Some(push.privacy),
        registered_at: Some(
            UNIX_EPOCH + Duration::from_millis(u64::try_from(push.registered_at).unwrap_or(0)),
        ),
    };
    let notification = Notification {
        user: push.user.clone(),
        folder: push.folder.clone(),
        uidvalidity: push.uidvalidity,
        uid: push.uid,
        from: push.from.clone(),
        subject: push.subject.clone(),
        snippet: push.snippet.clone(),
        unseen: push.unseen,
        event_id: push.event_id.clone(),
    };
    (device, notification)
}

/// A provider outcome in the classes the outbox acts on. Reasons stay the provider crate's
/// metrics-safe words. An APNs 410 older than the device's registration already arrives
/// as `Drop` (`Unregistered_before_reregistration`), so `DeleteDevice` always deletes.
pub fn receiver_outcome(outcome: dovepush_push::Outcome) -> Outcome {
    match outcome {
        dovepush_push::Outcome::Delivered { .. } => Outcome::Delivered,
        dovepush_push::Outcome::DeleteDevice { reason, .. } => Outcome::DeleteDevice { reason },
        dovepush_push::Outcome::Retry {
            reason,
            retry_after,
        } => Outcome::Retry {
            reason,
            after: retry_after,
        },
        dovepush_push::Outcome::CredentialsRejected { reason } => {
            Outcome::CredentialsRejected { reason }
        }
        dovepush_push::Outcome::Drop { reason } => Outcome::Drop { reason },
    }
}

/// The transports of `config`: one [`Pusher`] for every `[[apps]]` entry with `[apps.apns]`
/// or `[apps.fcm]`, registered for exactly those apps and kinds. Apps without a transport
/// get none (their pushes wait, counted as `no_transport`, until the deadline).
pub fn transports_from_config(config: &Config) -> Result<Transports, ConfigError> {
    let mut transports = Transports::new();
    if config.apps.iter().all(|a| !a.has_transport()) {
        return Ok(transports);
    }
    let pusher = Arc::new(config.pusher()?);
    let transport: Arc<dyn Transport> =
        Arc::new(ProviderTransport::new(pusher, transports.push_outcomes()));
    for app in &config.apps {
        if app.push.apns.is_some() {
            transports = transports.with_app(&app.id, TransportKind::Apns, transport.clone());
        }
        if app.push.fcm.is_some() {
            transports = transports.with_app(&app.id, TransportKind::Fcm, transport.clone());
        }
    }
    Ok(transports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Privacy;
    use std::time::SystemTime;

    fn push() -> Push {
        Push {
            id: 7,
            app: "mail".into(),
            transport: TransportKind::Fcm,
            token: "tok".into(),
            privacy: Privacy::Silent,
            registered_at: 1_700_000_000_123,
            user: "alice".into(),
            event_id: Some("ev".into()),
            folder: "INBOX".into(),
            uidvalidity: 3,
            uid: 9,
            from: Some("=?utf-8?q?J=C3=BCrgen?= <j@example.net>".into()),
            subject: Some("Hi".into()),
            snippet: None,
            unseen: Some(4),
            coalesced: 0,
        }
    }

    #[test]
    fn push_maps_to_device_and_notification() {
        let (d, n) = provider_view(&push());
        assert_eq!(d.app_id, "mail");
        assert_eq!(d.kind, TransportKind::Fcm);
        assert_eq!(d.privacy, Some(Privacy::Silent));
        assert_eq!(
            d.registered_at,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
        assert_eq!(n.unseen, Some(4));
        assert_eq!(n.uid, 9);
        assert_eq!(
            n.from.as_deref(),
            Some("=?utf-8?q?J=C3=BCrgen?= <j@example.net>")
        );
        assert_eq!(n.event_id.as_deref(), Some("ev"));
    }

    #[test]
    fn outcomes_keep_class_and_reason() {
        use dovepush_push::Outcome as P;
        assert_eq!(
            receiver_outcome(P::Delivered {
                id: Some("x".into())
            }),
            Outcome::Delivered
        );
        assert_eq!(
            receiver_outcome(P::DeleteDevice {
                reason: "Unregistered".into(),
                unregistered_at: Some(SystemTime::now()),
            }),
            Outcome::DeleteDevice {
                reason: "Unregistered".into()
            }
        );
        assert_eq!(
            receiver_outcome(P::Retry {
                reason: "TooManyRequests".into(),
                retry_after: Some(Duration::from_secs(7)),
            }),
            Outcome::Retry {
                reason: "TooManyRequests".into(),
                after: Some(Duration::from_secs(7)),
            }
        );
        assert_eq!(
            receiver_outcome(P::CredentialsRejected {
                reason: "InvalidProviderToken".into()
            }),
            Outcome::CredentialsRejected {
                reason: "InvalidProviderToken".into()
            }
        );
        assert_eq!(
            receiver_outcome(P::Drop {
                reason: "payload_too_large".into()
            }),
            Outcome::Drop {
                reason: "payload_too_large".into()
            }
        );
    }
}
