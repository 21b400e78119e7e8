//! Dev-only helpers for dovepush's tests and benchmarks (never shipped):
//!
//! - [`dovecot`]: a private, real Dovecot started from a config in a temp dir, on
//!   loopback ports, with chosen plugins loaded from a private module dir;
//! - [`debian13`]: the Debian 13 root where that Dovecot can be 2.4.1, with dovepush
//!   built inside it;
//! - [`lmtp`]: a minimal LMTP client for deliveries, timing each reply;
//! - [`imap`]: a minimal IMAP client (log in, `STORE`, `EXPUNGE`, `STATUS`);
//! - [`sink`]: an HTTP/1.1 receiver that records notifications and answers with a
//!   chosen status after a chosen delay;
//! - [`messages`]: sample mails, well-formed and malformed;
//! - [`postgres`]: a private, real PostgreSQL (initdb into a temp dir, a free loopback
//!   port, stopped with the test process);
//! - [`procfs`]: what `/proc` says about a process (name, parents, nice, CPU time);
//! - [`fswatch`]: whether a file was opened (inotify);
//! - [`loopfs`]: a small ext4 of its own on a loop device (same state per run, or a
//!   disk to fill);
//! - [`oauth`]: a local OAuth issuer: an ES256 key for Dovecot's `oauth2` passdb to
//!   validate JWTs with, and the JWTs (good and bad) it signs.

pub mod debian13;
pub mod dovecot;
pub mod fswatch;
pub mod imap;
pub mod lmtp;
pub mod loopfs;
pub mod messages;
pub mod oauth;
pub mod postgres;
pub mod procfs;
pub mod sink;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// A loopback port that was free a moment ago, and not handed out before by this
/// process: the kernel may give a released port again at once, and two listeners of one
/// test (a Dovecot's imap and the doveadm port a test picked) must not get the same.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0");
        if given.insert(port) {
            return port;
        }
    }
}
