//! A short-lived cache of successful mail logins, so an app's repeated calls do not each
//! cost an IMAP login. Only a salted HMAC of the credential (password or bearer token,
//! with its kind) is kept (the HMAC key is random per process), entries expire after the
//! configured time, and comparison is constant-time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use crate::mailserver::MailCredential;
// tokio's clock: the real one, except in a test that pauses it.
use tokio::time::Instant;

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

    fn digest(&self, salt: &[u8], login: &str, credential: &MailCredential) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(salt);
        ctx.update(&(login.len() as u64).to_be_bytes());
        ctx.update(login.as_bytes());
        // A password never matches a token that happens to be spelled the same.
        ctx.update(credential.kind().as_bytes());
        ctx.update(b"\0");
        ctx.update(credential.secret().as_bytes());
        ctx.sign().as_ref().to_vec()
    }

    /// True if `login` with `credential` succeeded recently.
    pub fn check(&self, login: &str, credential: &MailCredential) -> bool {
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
        constant_time_eq(&self.digest(&salt, login, credential), &digest)
    }

    /// Records a successful login.
    pub fn remember(&self, login: &str, credential: &MailCredential) {
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
            digest: self.digest(&salt, login, credential),
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
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> MailCredential {
        MailCredential::Password(s.into())
    }

    #[test]
    fn remembers_only_the_right_credential() {
        let c = CredentialCache::new(Duration::from_secs(60));
        assert!(!c.check("alice", &pw("pw")));
        c.remember("alice", &pw("pw"));
        assert!(c.check("alice", &pw("pw")));
        assert!(!c.check("alice", &pw("pw2")));
        assert!(!c.check("alice", &MailCredential::Bearer("pw".into())));
        assert!(!c.check("bob", &pw("pw")));
        c.forget("alice");
        assert!(!c.check("alice", &pw("pw")));
        c.remember("alice", &MailCredential::Bearer("tok".into()));
        assert!(c.check("alice", &MailCredential::Bearer("tok".into())));
        assert!(!c.check("alice", &pw("tok")));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_and_zero_disables() {
        let c = CredentialCache::new(Duration::from_millis(20));
        c.remember("alice", &pw("pw"));
        tokio::time::advance(Duration::from_millis(19)).await;
        assert!(c.check("alice", &pw("pw")));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!c.check("alice", &pw("pw")));
        let off = CredentialCache::new(Duration::ZERO);
        off.remember("alice", &pw("pw"));
        assert!(!off.check("alice", &pw("pw")));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
