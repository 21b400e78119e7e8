//! The device registry as users see it: register, list and remove one's own devices,
//! authenticated by one's own mail login (checked by the mail server, cached briefly).
//!
//! The ox subscription METADATA follows the registry: the first device of a user sets
//! `user=<login>` and removing the last one sets NIL, each in the IMAP session that checks
//! the credentials. Changes for one user are serialised, so a concurrent register and
//! remove cannot leave the METADATA out of step with the devices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::credentials::CredentialCache;
use super::device::{parse_registration, valid_login, Device, DeviceRegistration};
use super::{now_millis, FieldError};
use crate::mailserver::{subscription_value, MailError, MailServer, SubscriptionChange};
use crate::store::{RegisterOutcome, Store, StoreError};
use crate::transport::{Privacy, TransportKind};

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid mail credentials")]
    BadCredentials,
    #[error("{0}")]
    Invalid(FieldError),
    #[error("no such device")]
    NotFound,
    #[error("mail server unavailable")]
    MailServerUnavailable(String),
    #[error("the mail server refused the subscription change")]
    Subscription(String),
    #[error("store failure: {0}")]
    Store(#[from] StoreError),
}

/// Per-user async locks, dropped when unused. Whoever changes a user's subscription
/// METADATA holds the user's lock from its look at the user's devices to its change: the
/// registry, and the dispatcher when a push service removed the user's last device.
/// Clones share the locks.
#[derive(Clone, Default)]
pub struct UserLocks {
    locks: Arc<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>>,
}

impl UserLocks {
    /// The lock of `user`.
    pub fn get(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = map.get(user).and_then(Weak::upgrade) {
            return lock;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(user.to_owned(), Arc::downgrade(&lock));
        lock
    }
}

/// The registry service.
pub struct Registry {
    store: Arc<dyn Store>,
    mail: Arc<dyn MailServer>,
    cache: CredentialCache,
    locks: UserLocks,
    /// App id → default privacy, for the configured apps.
    apps: HashMap<String, Option<Privacy>>,
    /// App id → the transport kinds it can push through, for apps that configure any
    /// (apps not listed accept every kind).
    app_transports: HashMap<String, Vec<TransportKind>>,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        mail: Arc<dyn MailServer>,
        cache: CredentialCache,
        apps: HashMap<String, Option<Privacy>>,
    ) -> Self {
        Self {
            store,
            mail,
            cache,
            locks: UserLocks::default(),
            apps,
            app_transports: HashMap::new(),
        }
    }

    /// Restricts registrations of the listed apps to their transport kinds: a device the
    /// app cannot push to is refused (400, field `transport`) instead of waiting forever.
    /// The per-user locks, for the dispatcher (see [`UserLocks`]).
    pub fn user_locks(&self) -> UserLocks {
        self.locks.clone()
    }

    pub fn with_app_transports(
        mut self,
        app_transports: HashMap<String, Vec<TransportKind>>,
    ) -> Self {
        self.app_transports = app_transports;
        self
    }

    /// Checks credentials (cache first), without touching the subscription.
    pub async fn authenticate(&self, login: &str, password: &str) -> Result<(), RegistryError> {
        if !valid_login(login) || password.is_empty() {
            return Err(RegistryError::BadCredentials);
        }
        if self.cache.check(login, password) {
            return Ok(());
        }
        self.login_with(login, password, SubscriptionChange::Keep)
            .await
    }

    async fn login_with(
        &self,
        login: &str,
        password: &str,
        change: SubscriptionChange,
    ) -> Result<(), RegistryError> {
        match self.mail.login(login, password, change).await {
            Ok(()) => {
                self.cache.remember(login, password);
                Ok(())
            }
            Err(MailError::Rejected) => {
                self.cache.forget(login);
                tracing::info!(user = %login, "Mail login rejected.");
                Err(RegistryError::BadCredentials)
            }
            Err(MailError::Metadata(m)) => {
                // The login itself succeeded.
                self.cache.remember(login, password);
                tracing::warn!(user = %login, error = %m, "SETMETADATA refused.");
                Err(RegistryError::Subscription(m))
            }
            Err(e) => {
                tracing::warn!(user = %login, error = %e, "Mail server unavailable.");
                Err(RegistryError::MailServerUnavailable(e.to_string()))
            }
        }
    }

    /// Registers (or updates) a device from a request body.
    pub async fn register(
        &self,
        login: &str,
        password: &str,
        body: &[u8],
    ) -> Result<(DeviceRegistration, RegisterOutcome), RegistryError> {
        if !valid_login(login) || password.is_empty() {
            return Err(RegistryError::BadCredentials);
        }
        let lock = self.locks.get(login);
        let _guard = lock.lock().await;
        let registration = match parse_registration(login, body, |app| self.apps.get(app).copied())
        {
            Ok(r) => r,
            Err(field_error) => {
                // Unauthenticated callers learn nothing about the body's validity.
                self.authenticate(login, password).await?;
                return Err(RegistryError::Invalid(field_error));
            }
        };
        if let Some(kinds) = self.app_transports.get(&registration.app) {
            if !kinds.contains(&registration.transport) {
                self.authenticate(login, password).await?;
                return Err(RegistryError::Invalid(FieldError::new(
                    "transport",
                    format!(
                        "app {} has no {} transport configured",
                        registration.app, registration.transport
                    ),
                )));
            }
        }
        let existing = self.store.devices_of(login.to_owned()).await?;
        if existing.is_empty() {
            self.login_with(
                login,
                password,
                SubscriptionChange::Set(subscription_value(login)),
            )
            .await?;
            tracing::info!(user = %login, "Subscription METADATA set.");
        } else {
            self.authenticate(login, password).await?;
        }
        let outcome = self
            .store
            .register_device(registration.clone(), now_millis())
            .await?;
        tracing::info!(
            user = %login,
            app = %registration.app,
            transport = %registration.transport,
            created = outcome.created,
            "Device registered."
        );
        Ok((registration, outcome))
    }

    /// The user's devices.
    pub async fn list(&self, login: &str, password: &str) -> Result<Vec<Device>, RegistryError> {
        self.authenticate(login, password).await?;
        Ok(self.store.devices_of(login.to_owned()).await?)
    }

    /// Removes the user's device(s) with `token`; clears the subscription if none remain.
    pub async fn remove(
        &self,
        login: &str,
        password: &str,
        token: &str,
    ) -> Result<(), RegistryError> {
        if !valid_login(login) || password.is_empty() {
            return Err(RegistryError::BadCredentials);
        }
        let lock = self.locks.get(login);
        let _guard = lock.lock().await;
        let existing = self.store.devices_of(login.to_owned()).await?;
        let matching = existing.iter().filter(|d| d.token == token).count();
        if matching == 0 {
            self.authenticate(login, password).await?;
            return Err(RegistryError::NotFound);
        }
        if matching == existing.len() {
            match self
                .login_with(login, password, SubscriptionChange::Clear)
                .await
            {
                Ok(()) => tracing::info!(user = %login, "Subscription METADATA cleared."),
                // The user asked to remove the device: do it even if the server keeps the
                // METADATA (its events are then counted and dropped).
                Err(RegistryError::Subscription(_)) => {}
                Err(e) => return Err(e),
            }
        } else {
            self.authenticate(login, password).await?;
        }
        let outcome = self
            .store
            .remove_device(login.to_owned(), token.to_owned())
            .await?;
        tracing::info!(user = %login, devices_left = outcome.devices_left, "Device removed.");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::BoxFuture;
    use std::time::Duration;

    /// Accepts password "pw" for everyone and records subscription changes.
    #[derive(Default)]
    struct FakeMail {
        log: Mutex<Vec<(String, SubscriptionChange)>>,
    }

    impl MailServer for FakeMail {
        fn login<'a>(
            &'a self,
            login: &'a str,
            password: &'a str,
            change: SubscriptionChange,
        ) -> BoxFuture<'a, Result<(), MailError>> {
            Box::pin(async move {
                if password != "pw" {
                    return Err(MailError::Rejected);
                }
                self.log.lock().unwrap().push((login.to_owned(), change));
                Ok(())
            })
        }
        fn clear_subscription_as_master<'a>(
            &'a self,
            _user: &'a str,
        ) -> BoxFuture<'a, Result<(), MailError>> {
            Box::pin(async { Err(MailError::NoMasterUser) })
        }
    }

    #[tokio::test]
    async fn metadata_follows_first_and_last_device() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).unwrap());
        let mail = Arc::new(FakeMail::default());
        let reg = Registry::new(
            store,
            mail.clone(),
            CredentialCache::new(Duration::from_secs(60)),
            [("mail".to_owned(), None)].into_iter().collect(),
        );
        let body = |t: &str| format!(r#"{{"app":"mail","transport":"apns","token":"{t}"}}"#);
        assert!(matches!(
            reg.register("alice", "bad", body("t1").as_bytes()).await,
            Err(RegistryError::BadCredentials)
        ));
        reg.register("alice", "pw", body("t1").as_bytes())
            .await
            .unwrap();
        reg.register("alice", "pw", body("t2").as_bytes())
            .await
            .unwrap();
        assert!(matches!(
            reg.register("alice", "pw", b"{}").await,
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(reg.list("alice", "pw").await.unwrap().len(), 2);
        assert!(matches!(
            reg.remove("bob", "pw", "t1").await,
            Err(RegistryError::NotFound)
        ));
        reg.remove("alice", "pw", "t1").await.unwrap();
        reg.remove("alice", "pw", "t2").await.unwrap();
        let log = mail.log.lock().unwrap().clone();
        let changes: Vec<_> = log
            .iter()
            .filter(|(_, c)| *c != SubscriptionChange::Keep)
            .cloned()
            .collect();
        assert_eq!(
            changes,
            vec![
                (
                    "alice".to_owned(),
                    SubscriptionChange::Set("user=alice".into())
                ),
                ("alice".to_owned(), SubscriptionChange::Clear),
            ]
        );
        // The second registration and the list used the cache: no extra logins for alice.
        let alice_keeps = log
            .iter()
            .filter(|(u, c)| u == "alice" && *c == SubscriptionChange::Keep)
            .count();
        assert_eq!(alice_keeps, 0);
    }
}
