//! dovepush-push: the transports the receiver calls to deliver one new-mail notification to
//! one device — APNs (HTTP/2, ES256 provider tokens or client certificates), FCM HTTP v1
//! (service-account OAuth) and Web Push (RFC 8030/8291/8292, to browsers, behind an SSRF
//! guard) — on one hyper 1 + rustls (ring) stack.
//!
//! Build a [`Pusher`] from the `[[apps]]` config ([`AppConfig`]) and call
//! [`Pusher::send`] (or hold it as `Arc<dyn Transport>`). Every send ends in an
//! [`Outcome`] class the caller acts on: delivered, delete the device, retry later,
//! credentials rejected (alert), or drop.

#![forbid(unsafe_code)]

mod apns;
pub mod config;
mod content;
mod fcm;
mod http;
mod jwt;
pub mod model;
pub mod outcome;
mod pusher;
pub mod webpush;

pub use config::{ApnsConfig, ApnsEnvironment, AppConfig, ConfigError, FcmConfig, WebPushConfig};
pub use http::read_ca_file;
pub use model::{Device, DeviceKind, Notification, Privacy, UnknownPrivacy};
pub use outcome::Outcome;
pub use pusher::{Pusher, Transport};

/// How an APNs reply (`status`, headers, body) is classified for `device`: what the
/// transport does with it. Public so that it can be fuzzed on its own.
pub fn classify_apns_reply(
    status: hyper::StatusCode,
    headers: &hyper::HeaderMap,
    body: &[u8],
    device: &Device,
) -> Outcome {
    apns::classify(status, headers, body, device)
}

/// How an FCM v1 reply is classified. Public so that it can be fuzzed on its own.
pub fn classify_fcm_reply(
    status: hyper::StatusCode,
    headers: &hyper::HeaderMap,
    body: &[u8],
) -> Outcome {
    fcm::classify(status, headers, body)
}

/// How a Web Push service's reply is classified (without the 413 retry the sender does).
/// Public so that it can be fuzzed on its own.
pub fn classify_webpush_reply(status: hyper::StatusCode, headers: &hyper::HeaderMap) -> Outcome {
    webpush::classify(status, headers)
}
