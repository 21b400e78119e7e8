//! dovepush-sender: the sender service, one unprivileged process per host.
//!
//! Dovecot's master starts it as `service dovepush`, hands it a unix listener that lmtp
//! and dovecot-lda (as the mail user) may connect to, and restarts it when it dies. The
//! plugin in each mail process writes one [`dovepush_protocol::record::Record`] per event
//! and endpoint to that socket and goes on; this service sends them (ox-compatible, or
//! in batches to a dovepush receiver), retries, keeps what it cannot send in its own
//! spool and replays it. Mail processes never fork, start threads or touch the network.
//!
//! Modules, from the outside in:
//! - [`master`]: what Dovecot's master hands a service (listener, status and death
//!   pipes, environment) and giving up root;
//! - [`dovecot_config`]: the settings, read while still root: asked of Dovecot's config
//!   process as Dovecot's own services do (2.3), or with `doveconf` (2.4);
//! - [`trust`]: whose records are accepted (the uids Dovecot delivers as);
//! - [`spool`]: the drop spool that mail processes write into when the socket is
//!   unreachable, and the service's own queue; planted files are refused there;
//! - [`server`]: the socket's connections: records in, acknowledgements out;
//! - [`dispatch`]: per-endpoint queues, batching, retries, spooling and replay;
//! - [`http`]: the HTTP clients and what one request comes to;
//! - [`log`]: lines in Dovecot's log format, with the user named;
//! - [`service`]: the process's life from start to exit.

#![deny(unsafe_code)]

pub mod dispatch;
pub mod dovecot_config;
pub mod http;
pub mod log;
#[allow(unsafe_code)] // adopting the descriptors the master passes (fd 5-7)
pub mod master;
pub mod server;
pub mod service;
pub mod spool;
pub mod trust;
