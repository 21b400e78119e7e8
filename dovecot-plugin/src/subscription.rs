//! The METADATA subscription the ox driver reads, and a per-process cache of it.
//!
//! The value of the private server attribute `/private/vendor/vendor.dovecot/http-notify`
//! is a TAB-separated list of `key=value` items in Dovecot's tab-escaping (`\x01` +
//! `1`/`t`/`r`/`n`/`0`). Only `user=` matters; it must be present (the ox driver skips the
//! delivery without it, and so do we).
//!
//! lmtp processes serve many deliveries, so the lookup (a mailbox open plus a dict read,
//! most of the ox driver's cost) is cached per username: found values for
//! `cache_lifetime`, "not subscribed" only briefly so that a new subscription takes
//! effect within seconds. Errors are never cached.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The attribute key below Dovecot's server prefix.
pub const METADATA_KEY: &str = "vendor/vendor.dovecot/http-notify";
/// How many users the cache holds before it starts over.
const CACHE_MAX_USERS: usize = 50_000;

/// A parsed subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The `user=` value: the identity the receiver knows the user by.
    pub user: String,
}

/// Why a stored value is not a usable subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionError {
    MissingUser,
}

impl std::fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscriptionError::MissingUser => {
                f.write_str("the http-notify METADATA value has no user= item")
            }
        }
    }
}

/// Undo Dovecot's tab-escaping of one item.
pub fn tab_unescape(item: &str) -> String {
    let mut out = String::with_capacity(item.len());
    let mut chars = item.chars();
    while let Some(c) = chars.next() {
        if c != '\x01' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('1') => out.push('\x01'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Parse the attribute value. The last `user=` wins, as in the ox driver.
pub fn parse(value: &str) -> Result<Subscription, SubscriptionError> {
    value
        .split('\t')
        .rev()
        .find_map(|item| {
            let (key, val) = item.split_once('=')?;
            (tab_unescape(key) == "user").then(|| tab_unescape(val))
        })
        .map(|user| Subscription { user })
        .ok_or(SubscriptionError::MissingUser)
}

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
    fn plain_user() {
        assert_eq!(parse("user=3@2").unwrap().user, "3@2");
    }

    #[test]
    fn other_items_and_last_user_wins() {
        let v = "events=MessageNew\tuser=alice\tfolder=INBOX\tuser=bob";
        assert_eq!(parse(v).unwrap().user, "bob");
    }

    #[test]
    fn tab_escaped_values() {
        assert_eq!(parse("user=a\x01tb\x011c").unwrap().user, "a\tb\x01c");
        assert_eq!(tab_unescape("x\x01ny\x01r\x010"), "x\ny\r\0");
    }

    #[test]
    fn empty_user_is_accepted_missing_user_is_not() {
        assert_eq!(parse("user=").unwrap().user, "");
        assert_eq!(
            parse("expire=1\tfolder=INBOX"),
            Err(SubscriptionError::MissingUser)
        );
        assert_eq!(parse(""), Err(SubscriptionError::MissingUser));
    }

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
