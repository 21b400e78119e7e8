//! A short-lived cache of successful mail logins, so an app's repeated calls do not each
//! cost an IMAP login. Only a salted HMAC of the password is kept (the HMAC key is random
//! per process), entries expire after the configured time, and comparison is constant-time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Most logins remembered at once.
pub const MAX_ENTRIES: usize = 100_000;

struct Entry {
    expires: Instant,
    salt: [u8; 16],
    digest: Vec<u8>,
}

/// Remembers recent successful logins as salted hashes.
pub struct CredentialCache {
    key: hmac::Key,
    rng: SystemRandom,
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CredentialCache {
    /// A cache keeping entries for `ttl` (zero disables it).
    pub fn new(ttl: Duration) -> Self {
        let rng = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the system random generator works");
        Self {
            key,
            rng,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn digest(&self, salt: &[u8], login: &str, password: &str) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(salt);
        ctx.update(&(login.len() as u64).to_be_bytes());
        ctx.update(login.as_bytes());
        ctx.update(password.as_bytes());
        ctx.sign().as_ref().to_vec()
    }

    /// True if `login` with `password` succeeded recently.
    pub fn check(&self, login: &str, password: &str) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let (salt, digest) = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(login) {
                Some(e) if e.expires > Instant::now() => (e.salt, e.digest.clone()),
                _ => return false,
            }
        };
        constant_time_eq(&self.digest(&salt, login, password), &digest)
    }

    /// Records a successful login.
    pub fn remember(&self, login: &str, password: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let mut salt = [0u8; 16];
        if self.rng.fill(&mut salt).is_err() {
            return;
        }
        let entry = Entry {
            expires: Instant::now() + self.ttl,
            salt,
            digest: self.digest(&salt, login, password),
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            let now = Instant::now();
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(login.to_owned(), entry);
    }

    /// Forgets `login` (after a failed login).
    pub fn forget(&self, login: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(login);
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_only_the_right_password() {
        let c = CredentialCache::new(Duration::from_secs(60));
        assert!(!c.check("alice", "pw"));
        c.remember("alice", "pw");
        assert!(c.check("alice", "pw"));
        assert!(!c.check("alice", "pw2"));
        assert!(!c.check("bob", "pw"));
        c.forget("alice");
        assert!(!c.check("alice", "pw"));
    }

    #[test]
    fn entries_expire_and_zero_disables() {
        let c = CredentialCache::new(Duration::from_millis(20));
        c.remember("alice", "pw");
        std::thread::sleep(Duration::from_millis(40));
        assert!(!c.check("alice", "pw"));
        let off = CredentialCache::new(Duration::ZERO);
        off.remember("alice", "pw");
        assert!(!off.check("alice", "pw"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
