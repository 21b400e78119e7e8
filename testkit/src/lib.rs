//! Dev-only helpers for dovepush's tests and benchmarks (never shipped):
//!
//! - [`dovecot`]: a private, real Dovecot started from a config in a temp dir, on
//!   loopback ports, with chosen plugins loaded from a private module dir;
//! - [`lmtp`]: a minimal LMTP client for deliveries, timing each reply;
//! - [`sink`]: an HTTP/1.1 receiver that records notifications and answers with a
//!   chosen status after a chosen delay;
//! - [`messages`]: sample mails, well-formed and malformed;
//! - [`procfs`]: what `/proc` says about a process (name, parents, nice, CPU time).

pub mod dovecot;
pub mod lmtp;
pub mod messages;
pub mod procfs;
pub mod sink;

use std::net::TcpListener;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}
