//! The config file as written: one serde struct per section, `deny_unknown_fields`
//! everywhere, every key optional at this level (what is required, and every other rule,
//! is checked by `super::validate`, which can then name all missing keys at once).
//! `[[apps]]` entries are dovepush-push's own [`AppConfig`].
//!
//! Also the order of the keys as declared here ([`fields_of`]), which is the order
//! problems are reported in and what the README's key table is checked against.

use std::path::PathBuf;

use dovepush_push::AppConfig;
use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::{ImapTls, OAuthMechanism};

/// The whole file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: Option<ServerSection>,
    pub notify: Option<NotifySection>,
    pub admin: Option<AdminSection>,
    pub store: Option<StoreSection>,
    pub dovecot: Option<DovecotSection>,
    pub outbox: Option<OutboxSection>,
    pub devices: Option<DevicesSection>,
    pub webpush: Option<WebPushSection>,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
}

/// `[server]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub header_read_timeout_seconds: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
    pub max_connections: Option<u64>,
    pub trusted_proxies: Option<Vec<String>>,
}

/// `[devices]`: the device API's defences.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesSection {
    pub max_failed_logins: Option<u64>,
    pub failure_delay_milliseconds: Option<u64>,
    pub lock_seconds: Option<u64>,
    pub max_concurrent_logins: Option<u64>,
    pub max_idle_days: Option<u64>,
}

/// `[webpush]`: how far Web Push delivery may reach (endpoints are URLs users hand in).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushSection {
    pub allow_hosts: Option<Vec<String>>,
    pub deny_private: Option<bool>,
    pub ca_file: Option<PathBuf>,
    pub timeout_seconds: Option<u64>,
}

/// `[notify]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// `[admin]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

/// `[store]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub sslmode: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub pool_size: Option<u64>,
    pub lease_seconds: Option<u64>,
    pub event_retention_seconds: Option<u64>,
}

/// `[dovecot]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DovecotSection {
    pub imap: Option<String>,
    pub tls: Option<ImapTls>,
    pub ca_file: Option<PathBuf>,
    pub master_user: Option<String>,
    pub master_password: Option<String>,
    pub master_password_file: Option<PathBuf>,
    pub auth_cache_seconds: Option<u64>,
    pub timeout_seconds: Option<u64>,
    pub oauth_mechanism: Option<OAuthMechanism>,
    pub oauth_user_claim: Option<String>,
    pub doveadm_url: Option<String>,
    pub doveadm_api_key: Option<String>,
    pub doveadm_api_key_file: Option<PathBuf>,
}

/// `[outbox]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSection {
    pub retry_initial_seconds: Option<u64>,
    pub retry_max_seconds: Option<u64>,
    pub deadline_seconds: Option<u64>,
    pub coalesce_milliseconds: Option<u64>,
    pub badge_wait_milliseconds: Option<u64>,
    pub concurrency: Option<u64>,
}

/// The keys of the struct `T` in declaration order (what its derived `Deserialize` tells
/// a deserializer); empty for anything that is not a struct.
pub fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    /// A deserializer that only listens to which fields a struct asks for.
    struct FieldNames(&'static [&'static str]);

    impl<'de> Deserializer<'de> for &mut FieldNames {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(de::Error::custom("fields noted"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut names = FieldNames(&[]);
    let _ = T::deserialize(&mut names);
    names.0
}

/// The keys of a table, by its path with array indices left out (`""`, `"server"`,
/// `"apps"`, `"apps.apns"`, …); `None` for a path that is no table of the file.
pub fn table_keys(table: &str) -> Option<&'static [&'static str]> {
    Some(match table {
        "" => fields_of::<ConfigFile>(),
        "server" => fields_of::<ServerSection>(),
        "notify" => fields_of::<NotifySection>(),
        "admin" => fields_of::<AdminSection>(),
        "store" => fields_of::<StoreSection>(),
        "dovecot" => fields_of::<DovecotSection>(),
        "outbox" => fields_of::<OutboxSection>(),
        "devices" => fields_of::<DevicesSection>(),
        "webpush" => fields_of::<WebPushSection>(),
        "apps" => fields_of::<AppConfig>(),
        "apps.apns" => fields_of::<dovepush_push::ApnsConfig>(),
        "apps.fcm" => fields_of::<dovepush_push::FcmConfig>(),
        "apps.webpush" => fields_of::<dovepush_push::WebPushConfig>(),
        _ => return None,
    })
}

/// `(section, key)` for every key of the sections other than `[[apps]]` (whose keys are
/// dovepush-push's), in declaration order.
pub fn section_keys() -> Vec<(&'static str, &'static str)> {
    let sections = table_keys("").unwrap_or_default();
    sections
        .iter()
        .filter(|s| **s != "apps")
        .flat_map(|s| {
            let keys = table_keys(s).unwrap_or_default();
            keys.iter().map(move |k| (*s, *k))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_in_declaration_order() {
        assert_eq!(
            table_keys("server"),
            Some(
                &[
                    "listen",
                    "tls_cert",
                    "tls_key",
                    "header_read_timeout_seconds",
                    "idle_timeout_seconds",
                    "max_connections",
                    "trusted_proxies"
                ][..]
            )
        );
        assert_eq!(table_keys("apps").unwrap()[0], "id");
        assert_eq!(table_keys("apps.fcm").unwrap()[0], "service_account_file");
        assert_eq!(table_keys("apps.nope"), None);
        assert!(section_keys().contains(&("notify", "password_file")));
        assert!(!section_keys().iter().any(|(s, _)| *s == "apps"));
    }
}
