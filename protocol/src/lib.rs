//! dovepush-protocol: the wire formats dovepush's parts share, defined once.
//!
//! - [`notification`]: the ox driver's JSON body (what Dovecot's `push_notification`
//!   "ox" driver PUTs, and what the plugin sends in its place), with the
//!   `X-Dovepush-Event-Id` header that makes each event de-duplicable;
//! - [`subscription`]: the server METADATA entry the ox driver reads, and its value;
//! - [`record`]: what the plugin hands the sender service (a line on its socket, or a
//!   file in its drop spool) and the service's acknowledgements;
//! - [`batch`]: `POST /v1/notify/batch`, several notifications in one request to a
//!   dovepush receiver.
//!
//! The plugin, the sender service and the receiver all use these types; none of them
//! writes or parses these formats by hand.

#![forbid(unsafe_code)]

pub mod batch;
pub mod notification;
pub mod record;
pub mod subscription;

pub use notification::{FieldError, Notification, EVENT_ID_HEADER};
