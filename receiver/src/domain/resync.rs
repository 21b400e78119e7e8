//! Registry ↔ Dovecot resync: the device registry lives in the receiver, the ox
//! subscription in Dovecot's METADATA, and a restored database, a lost IMAP session or a
//! renamed user leaves them apart. [`find_drift`] compares the two: users with devices
//! whose subscription is missing or wrong (no pushes reach them), and subscriptions of
//! users without devices (Dovecot sends events for nothing). [`fix`] sets or clears them.
//!
//! Dovecot is reached through a [`SubscriptionDirectory`]: the doveadm HTTP API
//! ([`crate::doveadm`]; no user password needed, and it can list every user's value), or
//! the IMAP master-user login ([`crate::mailserver`]; only the users the registry knows).

use std::collections::BTreeSet;

use futures_util::future::BoxFuture;
use futures_util::{stream, FutureExt, StreamExt};

use super::store::{Store, StoreError};
use crate::mailserver::{subscription_value, MailError};

/// Users and their subscription values.
pub type UserValues = Vec<(String, String)>;

/// Reads and writes any user's subscription METADATA without the user's password.
pub trait SubscriptionDirectory: Send + Sync {
    /// What this is, for tables and logs (`doveadm`, `imap master user`).
    fn name(&self) -> &'static str;

    /// The user's subscription value (`None` when unset or empty).
    fn get<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Option<String>, MailError>>;

    /// Sets the value, or with `None` unsets it.
    fn set<'a>(
        &'a self,
        user: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), MailError>>;

    /// Every user with a subscription and its value, if this directory can list them
    /// (`Ok(None)` if not: then only the registry's users are checked).
    fn list_all(&self) -> BoxFuture<'_, Result<Option<UserValues>, MailError>>;
}

/// What resync does about one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftAction {
    /// Devices, but the subscription is missing or wrong: set it to this value.
    Set(String),
    /// A subscription without devices: set it to NIL.
    Clear,
}

impl DriftAction {
    pub fn describe(&self) -> String {
        match self {
            DriftAction::Set(v) => format!("set {v}"),
            DriftAction::Clear => "clear".to_owned(),
        }
    }
}

/// One user whose registry and Dovecot disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub user: String,
    /// Devices in the registry.
    pub devices: usize,
    /// The subscription Dovecot has.
    pub dovecot: Option<String>,
    pub action: DriftAction,
}

/// Why a resync could not run.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{directory}: {error}")]
    Directory {
        directory: &'static str,
        error: MailError,
    },
}

/// Subscription reads in flight at once.
const CONCURRENCY: usize = 8;

/// The users (all, or only `only`) on which the registry and Dovecot disagree, sorted by
/// user.
///
/// Boxed (and `Send`) so that the HTTP handler's future stays `Send` for every lifetime.
pub fn find_drift<'a>(
    store: &'a dyn Store,
    directory: &'a dyn SubscriptionDirectory,
    only: Option<&'a str>,
) -> BoxFuture<'a, Result<Vec<Drift>, ResyncError>> {
    Box::pin(find_drift_inner(store, directory, only))
}

async fn find_drift_inner(
    store: &dyn Store,
    directory: &dyn SubscriptionDirectory,
    only: Option<&str>,
) -> Result<Vec<Drift>, ResyncError> {
    let failed = |error| ResyncError::Directory {
        directory: directory.name(),
        error,
    };
    let known = store.subscriptions(only.map(str::to_owned)).await?;
    let registry: Vec<(String, usize)> = known
        .iter()
        .map(|u| (u.user.clone(), u.devices.len()))
        .collect();
    // Futures built in a loop, not by a closure over references: the whole stays `Send`
    // for every lifetime (a closure here trips the compiler's higher-ranked check).
    let mut pending = Vec::with_capacity(registry.len());
    for (user, devices) in &registry {
        let (owned, devices) = (user.clone(), *devices);
        pending.push(
            directory
                .get(user)
                .map(move |read| read.map(|value| (owned, devices, value))),
        );
    }
    let reads = stream::iter(pending)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let mut drift = Vec::new();
    for read in reads {
        let (user, devices, dovecot) = read.map_err(failed)?;
        let expected = subscription_value(&user);
        let action = match (&dovecot, devices) {
            (Some(v), 1..) if *v == expected => continue,
            (_, 1..) => DriftAction::Set(expected),
            (None, 0) => continue,
            (Some(_), 0) => DriftAction::Clear,
        };
        drift.push(Drift {
            user,
            devices,
            dovecot,
            action,
        });
    }
    if let Some(all) = directory.list_all().await.map_err(failed)? {
        let known: BTreeSet<&str> = registry.iter().map(|(u, _)| u.as_str()).collect();
        for (user, value) in all {
            if value.is_empty() || known.contains(user.as_str()) {
                continue;
            }
            if only.is_some_and(|o| o != user) {
                continue;
            }
            drift.push(Drift {
                user,
                devices: 0,
                dovecot: Some(value),
                action: DriftAction::Clear,
            });
        }
    }
    drift.sort_by(|a, b| a.user.cmp(&b.user));
    Ok(drift)
}

/// Applies each drift's action; a user who registered a device since the drift was found
/// keeps the subscription (a clear is checked against the registry once more).
pub async fn fix(
    store: &dyn Store,
    directory: &dyn SubscriptionDirectory,
    drift: &[Drift],
) -> Vec<Result<(), ResyncError>> {
    let mut results = Vec::with_capacity(drift.len());
    for d in drift {
        let result = async {
            match &d.action {
                DriftAction::Set(value) => directory.set(&d.user, Some(value)).await,
                DriftAction::Clear => {
                    if !store.devices_of(d.user.clone()).await?.is_empty() {
                        return Ok(());
                    }
                    directory.set(&d.user, None).await
                }
            }
            .map_err(|error| ResyncError::Directory {
                directory: directory.name(),
                error,
            })
        }
        .await;
        match &result {
            Ok(()) => {
                tracing::info!(user = %d.user, action = %d.action.describe(), "Subscription resynced.")
            }
            Err(e) => tracing::warn!(user = %d.user, error = %e, "Cannot resync the subscription."),
        }
        results.push(result);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::parse_registration;
    use crate::store::sqlite::SqliteStore;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// A directory over a map; lists everyone if `lists`.
    struct MapDirectory {
        values: Mutex<HashMap<String, String>>,
        lists: bool,
    }

    impl SubscriptionDirectory for MapDirectory {
        fn name(&self) -> &'static str {
            "map"
        }
        fn get<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Option<String>, MailError>> {
            Box::pin(async move { Ok(self.values.lock().unwrap().get(user).cloned()) })
        }
        fn set<'a>(
            &'a self,
            user: &'a str,
            value: Option<&'a str>,
        ) -> BoxFuture<'a, Result<(), MailError>> {
            Box::pin(async move {
                let mut values = self.values.lock().unwrap();
                match value {
                    Some(v) => values.insert(user.to_owned(), v.to_owned()),
                    None => values.remove(user),
                };
                Ok(())
            })
        }
        fn list_all(&self) -> BoxFuture<'_, Result<Option<UserValues>, MailError>> {
            Box::pin(async move {
                Ok(self.lists.then(|| {
                    let values = self.values.lock().unwrap();
                    values.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                }))
            })
        }
    }

    async fn register(store: &dyn Store, user: &str) {
        let body = br#"{"app":"mail","transport":"apns","token":"t1"}"#;
        let reg = parse_registration(user, body, |_| Some(None)).unwrap();
        store.register_device(reg, 1).await.unwrap();
    }

    #[tokio::test]
    async fn finds_and_fixes_missing_wrong_and_stray_subscriptions() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).unwrap());
        for user in ["alice", "carol", "dave", "erin"] {
            register(store.as_ref(), user).await;
        }
        let values = [
            ("bob", "user=bob"),      // stray: no devices
            ("dave", "user=mallory"), // wrong
            ("erin", "user=erin"),    // in sync
            ("frank", ""),            // empty: nothing to clear
        ];
        let directory = MapDirectory {
            values: Mutex::new(
                values
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            lists: true,
        };
        let drift = find_drift(store.as_ref(), &directory, None).await.unwrap();
        let summary: Vec<_> = drift
            .iter()
            .map(|d| (d.user.as_str(), d.action.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("alice", DriftAction::Set("user=alice".into())),
                ("bob", DriftAction::Clear),
                ("carol", DriftAction::Set("user=carol".into())),
                ("dave", DriftAction::Set("user=dave".into())),
            ]
        );
        let only = find_drift(store.as_ref(), &directory, Some("bob"))
            .await
            .unwrap();
        assert_eq!(only.len(), 1);
        // Bob registers before the fix runs: his subscription stays.
        register(store.as_ref(), "bob").await;
        let results = fix(store.as_ref(), &directory, &drift).await;
        assert!(results.iter().all(Result::is_ok));
        let left = find_drift(store.as_ref(), &directory, None).await.unwrap();
        assert!(left.is_empty(), "{left:?}");

        // Without listing, a stray subscription of an unknown user goes unseen.
        let blind = MapDirectory {
            values: Mutex::new([("zoe".to_owned(), "user=zoe".to_owned())].into()),
            lists: false,
        };
        let store2: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s2.sqlite")).unwrap());
        assert!(find_drift(store2.as_ref(), &blind, None)
            .await
            .unwrap()
            .is_empty());
    }
}
