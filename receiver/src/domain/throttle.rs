//! Failed logins slow down, then lock out, whoever keeps failing: per client address and
//! per user name, in memory (per node).
//!
//! One failure costs nothing (a typo). After the k-th failure in a row (k ≥ 2), the next
//! attempt by that address (or for that user) is allowed only `failure_delay × 2^(k-2)`
//! later (capped at `lock`); after `max_failures`, none is for `lock`. A success resets the user's count (not the
//! address's: an attacker with an account of their own must not wash their address
//! clean with it). Refused attempts are answered 429 with `Retry-After` before any IMAP
//! login is tried, so Dovecot's own per-address penalty, which falls on the receiver's
//! address, is not triggered by them.
//!
//! Every method takes `now`: time is the caller's (tests inject it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The throttle's settings (`[devices]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSettings {
    pub max_failures: u32,
    pub failure_delay: Duration,
    pub lock: Duration,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            max_failures: 5,
            failure_delay: Duration::from_secs(1),
            lock: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Client(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Entries kept at most; beyond, the oldest settled ones go first.
const MAX_ENTRIES: usize = 100_000;

/// Failed-login bookkeeping.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    settings: ThrottleSettings,
    failures: Mutex<HashMap<Key, Failures>>,
    /// How many entries `failures` holds: while none, [`Self::check`] takes no lock (the
    /// ingest path asks on every request).
    tracked: AtomicUsize,
}

impl LoginThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        LoginThrottle {
            settings,
            failures: Mutex::new(HashMap::new()),
            tracked: AtomicUsize::new(0),
        }
    }

    /// When the next attempt of `f` may come.
    fn allowed_at(&self, f: &Failures) -> Instant {
        let s = &self.settings;
        if f.count >= s.max_failures.max(1) {
            return f.last + s.lock;
        }
        if f.count < 2 {
            return f.last;
        }
        let factor = 1u32 << (f.count - 2).min(20);
        f.last + s.failure_delay.saturating_mul(factor).min(s.lock)
    }

    fn keys(client: Option<IpAddr>, user: Option<&str>) -> Vec<Key> {
        let mut keys = Vec::with_capacity(2);
        keys.extend(client.map(Key::Client));
        keys.extend(user.map(|u| Key::User(u.to_string())));
        keys
    }

    /// `Err(wait)` when `client` or `user` must wait before trying again.
    pub fn check(
        &self,
        client: Option<IpAddr>,
        user: Option<&str>,
        now: Instant,
    ) -> Result<(), Duration> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let wait = Self::keys(client, user)
            .iter()
            .filter_map(|k| failures.get(k))
            .map(|f| self.allowed_at(f).saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// A login by `client` as `user` failed.
    pub fn failed(&self, client: Option<IpAddr>, user: Option<&str>, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_ENTRIES {
            let lock = self.settings.lock;
            failures.retain(|_, f| now.saturating_duration_since(f.last) < lock);
        }
        for key in Self::keys(client, user) {
            let entry = failures.entry(key).or_insert(Failures {
                count: 0,
                last: now,
            });
            // Failures older than the lock are forgiven.
            if now.saturating_duration_since(entry.last) >= self.settings.lock {
                entry.count = 0;
            }
            entry.count += 1;
            entry.last = now;
        }
        self.tracked.store(failures.len(), Ordering::Relaxed);
    }

    /// `user` logged in: their count starts over.
    pub fn succeeded(&self, user: &str) {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&Key::User(user.to_string()));
        self.tracked.store(failures.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> LoginThrottle {
        LoginThrottle::new(ThrottleSettings {
            max_failures: 4,
            failure_delay: Duration::from_secs(1),
            lock: Duration::from_secs(60),
        })
    }

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)));

    #[test]
    fn each_failure_doubles_the_wait_then_locks() {
        let t = throttle();
        let t0 = Instant::now();
        assert_eq!(t.check(A, Some("alice"), t0), Ok(()));
        t.failed(A, Some("alice"), t0);
        assert_eq!(t.check(A, Some("alice"), t0), Ok(()), "one typo is free");
        t.failed(A, Some("alice"), t0);
        assert_eq!(t.check(A, Some("alice"), t0), Err(Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(t.check(A, Some("alice"), t1), Ok(()));
        t.failed(A, Some("alice"), t1);
        assert_eq!(t.check(A, None, t1), Err(Duration::from_secs(2)));
        let t3 = t1 + Duration::from_secs(2);
        t.failed(A, Some("alice"), t3);
        assert_eq!(
            t.check(None, Some("alice"), t3),
            Err(Duration::from_secs(60)),
            "locked"
        );
        assert_eq!(
            t.check(B, Some("alice"), t3 + Duration::from_secs(30)),
            Err(Duration::from_secs(30)),
            "the user is locked from every address"
        );
        assert_eq!(t.check(B, Some("bob"), t3), Ok(()), "others are not");
        assert_eq!(
            t.check(A, Some("bob"), t3 + Duration::from_secs(60)),
            Ok(())
        );
    }

    #[test]
    fn a_success_clears_the_user_not_the_address() {
        let t = throttle();
        let t0 = Instant::now();
        for i in 0..4 {
            t.failed(A, Some("alice"), t0 + Duration::from_secs(i));
        }
        t.succeeded("alice");
        assert_eq!(
            t.check(B, Some("alice"), t0 + Duration::from_secs(4)),
            Ok(())
        );
        assert!(t
            .check(A, Some("mallory"), t0 + Duration::from_secs(4))
            .is_err());
    }

    #[test]
    fn old_failures_are_forgiven() {
        let t = throttle();
        let t0 = Instant::now();
        for i in 0..3 {
            t.failed(A, None, t0 + Duration::from_secs(i));
        }
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(t.check(A, None, later), Ok(()));
        t.failed(A, None, later);
        t.failed(A, None, later);
        assert_eq!(
            t.check(A, None, later),
            Err(Duration::from_secs(1)),
            "counted afresh"
        );
    }
}
