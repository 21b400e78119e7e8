//! Transports: which push provider client serves which app's devices.
//!
//! Owns the [`Transports`] map the receiver is started with. The seam itself is
//! dovepush-push's [`Transport`] trait (one push: a provider [`dovepush_push::Device`] and
//! [`dovepush_push::Notification`] in, an [`dovepush_push::Outcome`] out), the one the real
//! providers implement and tests fake; [`push`] wraps the real providers and builds the
//! [`Transports`] of a config. Anything implementing [`Transport`] can be injected into
//! [`crate::run`] instead.

pub mod push;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use dovepush_push::{DeviceKind, Transport};

use crate::telemetry::PushOutcomes;

/// The transports a receiver runs with: per app and kind, with an optional
/// catch-all per kind. It also carries the provider-outcome counters its transports
/// record into and `/metrics` renders, and the VAPID public keys of the apps with Web
/// Push (`GET /v1/apps/{app}/vapid` hands them to browsers).
#[derive(Clone, Default)]
pub struct Transports {
    /// Keyed by kind, then app: a lookup with a borrowed app name allocates nothing.
    by_app: HashMap<DeviceKind, HashMap<String, Arc<dyn Transport>>>,
    by_kind: HashMap<DeviceKind, Arc<dyn Transport>>,
    outcomes: Arc<PushOutcomes>,
    vapid_keys: HashMap<String, String>,
}

impl Transports {
    /// No transports: pushes stay queued (retrying) until their deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// The provider-outcome counters shared by this registry's transports.
    pub fn push_outcomes(&self) -> Arc<PushOutcomes> {
        self.outcomes.clone()
    }

    /// Uses `transport` for devices of `app` reached through `kind`.
    pub fn with_app(
        mut self,
        app: impl Into<String>,
        kind: DeviceKind,
        transport: Arc<dyn Transport>,
    ) -> Self {
        self.by_app
            .entry(kind)
            .or_default()
            .insert(app.into(), transport);
        self
    }

    /// Uses `transport` for every app's devices of `kind` that have no app-specific one.
    pub fn with_kind(mut self, kind: DeviceKind, transport: Arc<dyn Transport>) -> Self {
        self.by_kind.insert(kind, transport);
        self
    }

    /// Publishes `public_key` (base64url) as `app`'s VAPID key.
    pub fn with_vapid_key(mut self, app: impl Into<String>, public_key: impl Into<String>) -> Self {
        self.vapid_keys.insert(app.into(), public_key.into());
        self
    }

    /// App id → VAPID public key.
    pub fn vapid_keys(&self) -> &HashMap<String, String> {
        &self.vapid_keys
    }

    /// The transport for `app` and `kind`, if any.
    pub fn get(&self, app: &str, kind: DeviceKind) -> Option<&Arc<dyn Transport>> {
        self.by_app
            .get(&kind)
            .and_then(|apps| apps.get(app))
            .or_else(|| self.by_kind.get(&kind))
    }

    /// True when nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.by_app.is_empty() && self.by_kind.is_empty()
    }
}

impl fmt::Debug for Transports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut apps: Vec<_> = self
            .by_app
            .iter()
            .flat_map(|(k, apps)| apps.keys().map(move |a| format!("{a}/{k}")))
            .collect();
        apps.sort();
        let mut kinds: Vec<_> = self.by_kind.keys().map(|k| k.as_str()).collect();
        kinds.sort();
        f.debug_struct("Transports")
            .field("by_app", &apps)
            .field("by_kind", &kinds)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dovepush_push::{Device, Notification, Outcome};
    use futures_util::future::BoxFuture;

    struct Fixed(Outcome);
    impl Transport for Fixed {
        fn send<'a>(&'a self, _: &'a Device, _: &'a Notification) -> BoxFuture<'a, Outcome> {
            let o = self.0.clone();
            Box::pin(async move { o })
        }
    }

    #[test]
    fn names_round_trip() {
        for k in DeviceKind::ALL {
            assert_eq!(k.as_str().parse::<DeviceKind>().ok(), Some(k));
        }
        assert!("APNS".parse::<DeviceKind>().is_err());
    }

    #[tokio::test]
    async fn app_specific_transport_wins_over_kind() {
        let t = Transports::new()
            .with_kind(
                DeviceKind::Apns,
                Arc::new(Fixed(Outcome::Delivered { id: None })),
            )
            .with_app(
                "special",
                DeviceKind::Apns,
                Arc::new(Fixed(Outcome::Drop {
                    reason: "special".into(),
                })),
            );
        let device = Device {
            app_id: "special".into(),
            kind: DeviceKind::Apns,
            token: "t".into(),
            privacy: None,
            registered_at: None,
        };
        let notification = Notification {
            user: "u".into(),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid: 1,
            ..Notification::default()
        };
        let special = t.get("special", DeviceKind::Apns).unwrap();
        assert!(matches!(
            special.send(&device, &notification).await,
            Outcome::Drop { .. }
        ));
        let other = t.get("other", DeviceKind::Apns).unwrap();
        assert_eq!(
            other.send(&device, &notification).await,
            Outcome::Delivered { id: None }
        );
        assert!(t.get("other", DeviceKind::Fcm).is_none());
        assert!(Transports::new().is_empty());
    }
}
