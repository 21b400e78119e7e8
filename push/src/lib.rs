//! dovepush-push: the transports the receiver calls to deliver one new-mail notification to
//! one device — APNs (HTTP/2, ES256 provider tokens or client certificates) and FCM HTTP v1
//! (service-account OAuth) — on one hyper 1 + rustls (ring) stack.
//!
//! Build a [`Pusher`] from the `[[apps]]` config ([`AppConfig`]) and call
//! [`Pusher::send`] (or hold it as `Arc<dyn PushTransport>`). Every send ends in an
//! [`Outcome`] class the caller acts on: delivered, delete the device, retry later,
//! credentials rejected (alert), or drop.

mod apns;
pub mod config;
mod content;
mod fcm;
mod http;
pub mod model;
pub mod outcome;
mod pusher;

pub use config::{ApnsConfig, ApnsEnvironment, AppConfig, ConfigError, FcmConfig};
pub use model::{Device, DeviceKind, Notification, Privacy, UnknownPrivacy};
pub use outcome::Outcome;
pub use pusher::{BoxFuture, PushTransport, Pusher};
