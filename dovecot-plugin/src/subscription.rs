//! A per-process cache of the METADATA subscription the ox driver reads (its key and
//! value are [`dovepush_protocol::subscription`]'s).
//!
//! lmtp processes serve many deliveries, so the lookup (a mailbox open plus a dict read,
//! most of the ox driver's cost) is cached per username: found values for
//! `cache_lifetime`, "not subscribed" only briefly so that a new subscription takes
//! effect within seconds. Errors are never cached.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use dovepush_protocol::subscription::{Subscription, SubscriptionError, METADATA_KEY};

/// How many users the cache holds before it starts over.
const CACHE_MAX_USERS: usize = 50_000;

/// Per-process cache of subscription lookups, keyed by Dovecot username.
#[derive(Debug, Default)]
pub struct SubscriptionCache {
    entries: HashMap<String, (Instant, Option<Subscription>)>,
}

impl SubscriptionCache {
    /// A cached answer still fresh at `now`: `Some(None)` means "known not subscribed".
    pub fn get(
        &self,
        username: &str,
        now: Instant,
        lifetime: Duration,
        negative_lifetime: Duration,
    ) -> Option<Option<Subscription>> {
        let (fetched, value) = self.entries.get(username)?;
        let ttl = if value.is_some() {
            lifetime
        } else {
            negative_lifetime
        };
        (now.duration_since(*fetched) < ttl).then(|| value.clone())
    }

    pub fn insert(&mut self, username: &str, now: Instant, value: Option<Subscription>) {
        if self.entries.len() >= CACHE_MAX_USERS && !self.entries.contains_key(username) {
            self.entries.clear();
        }
        self.entries.insert(username.to_string(), (now, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lifetimes() {
        let mut cache = SubscriptionCache::default();
        let t0 = Instant::now();
        let long = Duration::from_secs(60);
        let short = Duration::from_secs(5);
        cache.insert("a", t0, Some(Subscription { user: "a".into() }));
        cache.insert("b", t0, None);
        let t1 = t0 + Duration::from_secs(10);
        assert!(cache.get("a", t1, long, short).unwrap().is_some());
        assert_eq!(
            cache.get("b", t1, long, short),
            None,
            "negative entry expired"
        );
        assert_eq!(cache.get("b", t0, long, short), Some(None));
        assert_eq!(cache.get("c", t0, long, short), None);
        assert_eq!(cache.get("a", t0 + long, long, short), None);
    }
}
