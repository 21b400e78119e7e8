//! The ox driver's subscription: a private server METADATA entry whose value names the
//! identity to notify.
//!
//! The value is a TAB-separated list of `key=value` items in Dovecot's tab-escaping
//! (`\x01` + `1`/`t`/`r`/`n`/`0`). Only `user=` matters; it must be present (the ox driver
//! skips the delivery without it). The receiver writes `user=<login>`; the plugin reads
//! it at delivery.

use std::fmt;

/// The entry as IMAP names it (`SETMETADATA "" (<entry> …)`).
pub const METADATA_ENTRY: &str = "/private/vendor/vendor.dovecot/http-notify";
/// The same entry below Dovecot's server-attribute prefix (how a plugin reads it).
pub const METADATA_KEY: &str = "vendor/vendor.dovecot/http-notify";

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

impl fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscriptionError::MissingUser => {
                f.write_str("the http-notify METADATA value has no user= item")
            }
        }
    }
}

impl std::error::Error for SubscriptionError {}

impl Subscription {
    /// Parse an entry's value. The last `user=` wins, as in the ox driver.
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

    /// The value to store: `user=<login>`, tab-escaped.
    pub fn value(&self) -> String {
        format!("user={}", tab_escape(&self.user))
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

/// Dovecot's tab-escaping of one item.
pub fn tab_escape(item: &str) -> String {
    let mut out = String::with_capacity(item.len());
    for c in item.chars() {
        match c {
            '\x01' => out.push_str("\x011"),
            '\t' => out.push_str("\x01t"),
            '\r' => out.push_str("\x01r"),
            '\n' => out.push_str("\x01n"),
            '\0' => out.push_str("\x010"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_user() {
        assert_eq!(Subscription::parse("user=3@2").unwrap().user, "3@2");
    }

    #[test]
    fn other_items_and_last_user_wins() {
        let v = "events=MessageNew\tuser=alice\tfolder=INBOX\tuser=bob";
        assert_eq!(Subscription::parse(v).unwrap().user, "bob");
    }

    #[test]
    fn tab_escaped_values_round_trip() {
        assert_eq!(
            Subscription::parse("user=a\x01tb\x011c").unwrap().user,
            "a\tb\x01c"
        );
        assert_eq!(tab_unescape("x\x01ny\x01r\x010"), "x\ny\r\0");
        let odd = Subscription {
            user: "a\tb\x01c\nd".into(),
        };
        assert_eq!(Subscription::parse(&odd.value()).unwrap(), odd);
        let plain = Subscription {
            user: "alice@example.com".into(),
        };
        assert_eq!(plain.value(), "user=alice@example.com");
    }

    #[test]
    fn empty_user_is_accepted_missing_user_is_not() {
        assert_eq!(Subscription::parse("user=").unwrap().user, "");
        assert_eq!(
            Subscription::parse("expire=1\tfolder=INBOX"),
            Err(SubscriptionError::MissingUser)
        );
        assert_eq!(Subscription::parse(""), Err(SubscriptionError::MissingUser));
    }

    #[test]
    fn entry_and_key_name_the_same_attribute() {
        assert_eq!(METADATA_ENTRY, format!("/private/{METADATA_KEY}"));
    }
}
