//! Transports: the seam between the outbox and the push providers (APNs, FCM).
//!
//! Owns the [`Transport`] trait, the [`Push`] it is given, the [`Outcome`] classes every
//! provider's answer is reduced to, and the [`Transports`] map the receiver is started with.
//! The real providers live in the dovepush-push crate; [`push`] adapts them to this trait
//! and builds the [`Transports`] of a config. Anything implementing [`Transport`] can be
//! injected into [`crate::run`] instead.

pub mod push;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::PushOutcomes;

/// Which push service a device is reached through: the transports' own type.
pub use dovepush_push::DeviceKind as TransportKind;

/// How much of a mail a push may reveal: the transports' own type, so the word a device
/// registered with reaches the payload builder unchanged.
pub use dovepush_push::Privacy;

/// One push to one device, as the outbox hands it to a transport.
///
/// `from` and `subject` are the raw header values Dovecot sent (possibly RFC 2047
/// encoded); transports decode and shorten them as their payload limits require, and
/// must honour `privacy`.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// Outbox item id: stable across retries of this push.
    pub id: i64,
    pub app: String,
    pub transport: TransportKind,
    /// The provider's device token. Never log it whole.
    pub token: String,
    pub privacy: Privacy,
    /// When the device last registered (ms since the epoch): a provider's "unregistered
    /// at" older than this must not delete the device.
    pub registered_at: i64,
    /// The mail login the event was for.
    pub user: String,
    /// The newest event merged into this push.
    pub event_id: Option<String>,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub snippet: Option<String>,
    /// Unseen messages in `folder` (use as the absolute badge count).
    pub unseen: Option<u32>,
    /// How many older events were folded into this push.
    pub coalesced: u32,
}

impl Push {
    /// A collapse id / collapse key for transports that want one: one per user and
    /// folder, without the user's name in it. Computed on demand: dovepush-push derives
    /// its own, so the dispatch path does not pay for it.
    pub fn collapse_id(&self) -> String {
        use std::fmt::Write;
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{}\0{}", self.user, self.folder).as_bytes(),
        );
        let mut id = String::with_capacity(24);
        for b in &digest.as_ref()[..12] {
            let _ = write!(id, "{b:02x}");
        }
        id
    }
}

/// What became of one push, in the classes the outbox acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the push.
    Delivered,
    /// The token is invalid or unregistered: remove the device and keep `reason` in the
    /// user's last error.
    DeleteDevice { reason: String },
    /// A temporary failure: try again, not before `after` if the provider said so.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Our provider credentials were refused: alert the operator, delete nothing, retry later.
    CredentialsRejected { reason: String },
    /// The push can never succeed (e.g. payload refused): log and drop the item.
    Drop { reason: String },
}

/// The future a transport returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// A push provider client. Object-safe; implementations must bound their own time
/// (the outbox also applies an overall timeout).
pub trait Transport: Send + Sync {
    /// Sends one push and classifies the provider's answer.
    fn send<'a>(&'a self, push: &'a Push) -> SendFuture<'a>;
}

/// The transports a receiver runs with: per app and kind, with an optional
/// catch-all per kind. It also carries the provider-outcome counters its transports
/// record into and `/metrics` renders.
#[derive(Clone, Default)]
pub struct Transports {
    /// Keyed by kind, then app: a lookup with a borrowed app name allocates nothing.
    by_app: HashMap<TransportKind, HashMap<String, Arc<dyn Transport>>>,
    by_kind: HashMap<TransportKind, Arc<dyn Transport>>,
    outcomes: Arc<PushOutcomes>,
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
        kind: TransportKind,
        transport: Arc<dyn Transport>,
    ) -> Self {
        self.by_app
            .entry(kind)
            .or_default()
            .insert(app.into(), transport);
        self
    }

    /// Uses `transport` for every app's devices of `kind` that have no app-specific one.
    pub fn with_kind(mut self, kind: TransportKind, transport: Arc<dyn Transport>) -> Self {
        self.by_kind.insert(kind, transport);
        self
    }

    /// The transport for `app` and `kind`, if any.
    pub fn get(&self, app: &str, kind: TransportKind) -> Option<&Arc<dyn Transport>> {
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

    struct Fixed(Outcome);
    impl Transport for Fixed {
        fn send<'a>(&'a self, _push: &'a Push) -> SendFuture<'a> {
            let o = self.0.clone();
            Box::pin(async move { o })
        }
    }

    #[test]
    fn names_round_trip() {
        for k in TransportKind::ALL {
            assert_eq!(k.as_str().parse::<TransportKind>().ok(), Some(k));
        }
        assert!("APNS".parse::<TransportKind>().is_err());
    }

    #[tokio::test]
    async fn app_specific_transport_wins_over_kind() {
        let t = Transports::new()
            .with_kind(TransportKind::Apns, Arc::new(Fixed(Outcome::Delivered)))
            .with_app(
                "special",
                TransportKind::Apns,
                Arc::new(Fixed(Outcome::Drop {
                    reason: "special".into(),
                })),
            );
        let push = Push {
            id: 1,
            app: "special".into(),
            transport: TransportKind::Apns,
            token: "t".into(),
            privacy: Privacy::Full,
            registered_at: 0,
            user: "u".into(),
            event_id: None,
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid: 1,
            from: None,
            subject: None,
            snippet: None,
            unseen: None,
            coalesced: 0,
        };
        let special = t.get("special", TransportKind::Apns).unwrap();
        assert!(matches!(special.send(&push).await, Outcome::Drop { .. }));
        let other = t.get("other", TransportKind::Apns).unwrap();
        assert_eq!(other.send(&push).await, Outcome::Delivered);
        assert!(t.get("other", TransportKind::Fcm).is_none());
        assert!(Transports::new().is_empty());
    }
}
