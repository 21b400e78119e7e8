//! The device registry as users see it: register, list and remove one's own devices,
//! authenticated by one's own mail login (checked by the mail server, cached briefly).
//!
//! A Web Push device's endpoint is a URL the user chose and the receiver will POST to: its
//! host must pass dovepush-push's address rules (`[webpush]`; loopback, private, link-local,
//! metadata, … addresses refused, names resolved) before it is stored, and only once the
//! caller has authenticated (the check resolves a name the caller picked).
//!
//! The ox subscription METADATA follows the registry: the first device of a user sets
//! `user=<login>` and removing the last one sets NIL, each in the IMAP session that checks
//! the credentials. Changes for one user are serialised, so a concurrent register and
//! remove cannot leave the METADATA out of step with the devices.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::credentials::CredentialCache;
use super::device::{
    parse_registration, public_token, valid_login, DeviceRegistration, RegisteredDevice,
};
use super::store::{HeldLock, RegisterOutcome, Store, StoreError};
use super::{now_millis, FieldError};
use crate::mailserver::{
    subscription_value, MailCredential, MailError, MailServer, SubscriptionChange,
};
use dovepush_push::webpush::{
    check_host, AddressPolicy, EndpointRefused, Resolve, Subscription, SystemResolver,
};
use dovepush_push::{DeviceKind, Privacy};

/// Bound on resolving a Web Push endpoint's host at registration.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// A Web Push endpoint whose host the address rules refuse.
    #[error("{0}")]
    EndpointRefused(EndpointRefused),
}

/// Per-user locks. Whoever changes a user's subscription METADATA holds the user's lock
/// from its look at the user's devices to its change: the registry, and the dispatcher
/// when a push service removed the user's last device. Two levels: an async mutex per
/// user in this process (dropped when unused), then the store's lock for every process
/// sharing the store ([`Store::lock_user`]; none for SQLite). Clones share the locks.
#[derive(Clone)]
pub struct UserLocks {
    locks: Arc<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>>,
    store: Option<Arc<dyn Store>>,
}

/// A held user lock (both levels); released when dropped.
#[derive(Debug)]
pub struct UserGuard {
    // Dropped in this order: the store's lock before this process's.
    _shared: Option<HeldLock>,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

impl UserLocks {
    /// Locks shared through `store` with other processes (and within this one).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            locks: Arc::default(),
            store: Some(store),
        }
    }

    /// Locks for this process only.
    pub fn local() -> Self {
        Self {
            locks: Arc::default(),
            store: None,
        }
    }

    /// Waits for `user`'s lock.
    pub async fn lock(&self, user: &str) -> Result<UserGuard, StoreError> {
        let local = self.local_lock(user).lock_owned().await;
        let shared = match &self.store {
            Some(store) => store.lock_user(user.to_owned()).await?,
            None => None,
        };
        Ok(UserGuard {
            _shared: shared,
            _local: local,
        })
    }

    /// This process's lock of `user`.
    fn local_lock(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
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

/// Clears `user`'s subscription METADATA with the master login after something other than
/// the user removed their last device (a push service, the idle sweep): under the user's
/// lock, and only if no device was registered since (that registration set it again).
/// Logs what it did, naming the user; failures leave the METADATA as is (the plugin's
/// events for the user are then dropped by the receiver, and `resync` fixes it).
pub async fn clear_subscription_if_no_devices(
    user: String,
    store: Arc<dyn Store>,
    locks: UserLocks,
    mail: Arc<dyn MailServer>,
) {
    let _guard = match locks.lock(&user).await {
        Ok(guard) => guard,
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "Cannot lock the user; subscription METADATA left as is.");
            return;
        }
    };
    match store.devices_of(user.clone()).await {
        Ok(devices) if devices.is_empty() => {}
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "Cannot read the user's devices; subscription METADATA left as is.");
            return;
        }
    }
    match mail.clear_subscription_as_master(&user).await {
        Ok(()) => {
            tracing::info!(user = %user, "Last device removed; subscription METADATA cleared.")
        }
        Err(MailError::NoMasterUser) => tracing::info!(
            user = %user,
            "Last device removed; no master user to clear the METADATA (events will be dropped)."
        ),
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "Cannot clear the subscription METADATA.")
        }
    }
}

/// IMAP logins in flight at once unless [`Registry::with_max_concurrent_logins`] says.
const DEFAULT_LOGIN_SLOTS: usize = 16;

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
    app_transports: HashMap<String, Vec<DeviceKind>>,
    /// Bounds the IMAP logins in flight (`[devices] max_concurrent_logins`): a flood of
    /// device-API requests waits here instead of opening sessions at Dovecot.
    logins: tokio::sync::Semaphore,
    /// The address rules for Web Push endpoints and the resolver they use.
    webpush_policy: AddressPolicy,
    resolver: Arc<dyn Resolve>,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        mail: Arc<dyn MailServer>,
        cache: CredentialCache,
        apps: HashMap<String, Option<Privacy>>,
    ) -> Self {
        Self {
            locks: UserLocks::new(store.clone()),
            store,
            mail,
            cache,
            apps,
            app_transports: HashMap::new(),
            logins: tokio::sync::Semaphore::new(DEFAULT_LOGIN_SLOTS),
            webpush_policy: AddressPolicy::default(),
            resolver: Arc::new(SystemResolver),
        }
    }

    /// Checks Web Push endpoints with `policy` (`[webpush]`), resolving names with
    /// `resolver` (the system's unless a test injects one). Without this call the strict
    /// default policy applies.
    pub fn with_webpush_guard(mut self, policy: AddressPolicy, resolver: Arc<dyn Resolve>) -> Self {
        self.webpush_policy = policy;
        self.resolver = resolver;
        self
    }

    /// At most `n` IMAP logins in flight at once.
    pub fn with_max_concurrent_logins(mut self, n: usize) -> Self {
        self.logins = tokio::sync::Semaphore::new(n.max(1));
        self
    }

    /// Restricts registrations of the listed apps to their transport kinds: a device the
    /// app cannot push to is refused (400, field `transport`) instead of waiting forever.
    /// The per-user locks, for the dispatcher (see [`UserLocks`]).
    pub fn user_locks(&self) -> UserLocks {
        self.locks.clone()
    }

    pub fn with_app_transports(mut self, app_transports: HashMap<String, Vec<DeviceKind>>) -> Self {
        self.app_transports = app_transports;
        self
    }

    /// Checks credentials (cache first), without touching the subscription. `client` is
    /// the address the request came from (passed on to Dovecot).
    pub async fn authenticate(
        &self,
        login: &str,
        credential: &MailCredential,
        client: Option<IpAddr>,
    ) -> Result<(), RegistryError> {
        if !valid_login(login) || !credential.is_plausible() {
            return Err(RegistryError::BadCredentials);
        }
        if self.cache.check(login, credential) {
            return Ok(());
        }
        self.login_with(login, credential, SubscriptionChange::Keep, client)
            .await
    }

    async fn login_with(
        &self,
        login: &str,
        credential: &MailCredential,
        change: SubscriptionChange,
        client: Option<IpAddr>,
    ) -> Result<(), RegistryError> {
        let _slot = self
            .logins
            .acquire()
            .await
            .map_err(|_| RegistryError::MailServerUnavailable("shutting down".into()))?;
        match self.mail.login(login, credential, change, client).await {
            Ok(()) => {
                self.cache.remember(login, credential);
                Ok(())
            }
            Err(MailError::Rejected) => {
                self.cache.forget(login);
                tracing::info!(user = %login, credential = credential.kind(), "Mail login rejected.");
                Err(RegistryError::BadCredentials)
            }
            Err(MailError::Metadata(m)) => {
                // The login itself succeeded.
                self.cache.remember(login, credential);
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
        credential: &MailCredential,
        body: &[u8],
        client: Option<IpAddr>,
    ) -> Result<(DeviceRegistration, RegisterOutcome), RegistryError> {
        if !valid_login(login) || !credential.is_plausible() {
            return Err(RegistryError::BadCredentials);
        }
        let _guard = self.locks.lock(login).await?;
        let registration = match parse_registration(login, body, |app| self.apps.get(app).copied())
        {
            Ok(r) => r,
            Err(field_error) => {
                // Unauthenticated callers learn nothing about the body's validity.
                self.authenticate(login, credential, client).await?;
                return Err(RegistryError::Invalid(field_error));
            }
        };
        if let Some(kinds) = self.app_transports.get(&registration.app) {
            if !kinds.contains(&registration.transport) {
                self.authenticate(login, credential, client).await?;
                return Err(RegistryError::Invalid(FieldError::new(
                    "transport",
                    format!(
                        "app {} has no {} transport configured",
                        registration.app, registration.transport
                    ),
                )));
            }
        }
        if registration.transport == DeviceKind::WebPush {
            self.authenticate(login, credential, client).await?;
            self.check_endpoint(login, &registration.token).await?;
        }
        let existing = self.store.devices_of(login.to_owned()).await?;
        if existing.is_empty() {
            self.login_with(
                login,
                credential,
                SubscriptionChange::Set(subscription_value(login)),
                client,
            )
            .await?;
            tracing::info!(user = %login, "Subscription METADATA set.");
        } else {
            self.authenticate(login, credential, client).await?;
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

    /// The address rules on a Web Push device's endpoint host (bounded in time).
    async fn check_endpoint(&self, login: &str, token: &str) -> Result<(), RegistryError> {
        let sub = Subscription::from_token(token)
            .map_err(|e| RegistryError::Invalid(FieldError::new("endpoint", e.message)))?;
        let host = sub.host();
        let checked = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            check_host(host, &self.webpush_policy, self.resolver.as_ref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(EndpointRefused::Unresolvable {
                host: host.to_owned(),
                message: "timed out".to_owned(),
            })
        });
        checked.map_err(|refused| {
            tracing::info!(user = %login, %host, rule = refused.rule(), "Web Push endpoint refused.");
            RegistryError::EndpointRefused(refused)
        })
    }

    /// The user's devices.
    pub async fn list(
        &self,
        login: &str,
        credential: &MailCredential,
        client: Option<IpAddr>,
    ) -> Result<Vec<RegisteredDevice>, RegistryError> {
        self.authenticate(login, credential, client).await?;
        Ok(self.store.devices_of(login.to_owned()).await?)
    }

    /// Removes the user's device(s) with `token` (as the device API shows it: a Web Push
    /// device's `wp-…` id, or its full subscription token); clears the subscription if
    /// none remain.
    pub async fn remove(
        &self,
        login: &str,
        credential: &MailCredential,
        token: &str,
        client: Option<IpAddr>,
    ) -> Result<(), RegistryError> {
        if !valid_login(login) || !credential.is_plausible() {
            return Err(RegistryError::BadCredentials);
        }
        let _guard = self.locks.lock(login).await?;
        let existing = self.store.devices_of(login.to_owned()).await?;
        let mut stored: Vec<String> = existing
            .iter()
            .filter(|d| {
                d.device.token == token || public_token(d.device.kind, &d.device.token) == token
            })
            .map(|d| d.device.token.clone())
            .collect();
        let matching = stored.len();
        stored.sort();
        stored.dedup();
        if matching == 0 {
            self.authenticate(login, credential, client).await?;
            return Err(RegistryError::NotFound);
        }
        if matching == existing.len() {
            match self
                .login_with(login, credential, SubscriptionChange::Clear, client)
                .await
            {
                Ok(()) => tracing::info!(user = %login, "Subscription METADATA cleared."),
                // The user asked to remove the device: do it even if the server keeps the
                // METADATA (its events are then counted and dropped).
                Err(RegistryError::Subscription(_)) => {}
                Err(e) => return Err(e),
            }
        } else {
            self.authenticate(login, credential, client).await?;
        }
        let mut devices_left = 0;
        for token in stored {
            devices_left = self
                .store
                .remove_device(login.to_owned(), token)
                .await?
                .devices_left;
        }
        tracing::info!(user = %login, devices_left, "Device removed.");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use futures_util::future::BoxFuture;
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
            credential: &'a MailCredential,
            change: SubscriptionChange,
            _client: Option<IpAddr>,
        ) -> BoxFuture<'a, Result<(), MailError>> {
            Box::pin(async move {
                if credential.secret() != "pw" {
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

    fn pw(s: &str) -> MailCredential {
        MailCredential::Password(s.into())
    }

    /// Answers from a fixed table (unknown names fail), as a DNS server would.
    struct FixedResolver(Vec<(&'static str, std::net::IpAddr)>);

    impl Resolve for FixedResolver {
        fn lookup<'a>(
            &'a self,
            host: &'a str,
        ) -> BoxFuture<'a, std::io::Result<Vec<std::net::IpAddr>>> {
            let found: Vec<_> = self
                .0
                .iter()
                .filter(|(h, _)| *h == host)
                .map(|(_, ip)| *ip)
                .collect();
            Box::pin(async move {
                if found.is_empty() {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "NXDOMAIN",
                    ))
                } else {
                    Ok(found)
                }
            })
        }
    }

    /// A Web Push registration body for `endpoint` (RFC 8291's user agent keys).
    fn webpush(endpoint: &str) -> String {
        format!(
            r#"{{"app":"mail","transport":"webpush","endpoint":"{endpoint}","keys":{{
                "p256dh":"BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
                "auth":"BTBZMqHH6r4Tts7J_aSIgg"}}}}"#
        )
    }

    #[tokio::test]
    async fn web_push_endpoints_must_resolve_to_public_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).unwrap());
        let mail = Arc::new(FakeMail::default());
        let resolver = FixedResolver(vec![
            ("push.example.net", "142.250.1.1".parse().unwrap()),
            ("intranet.example", "10.1.2.3".parse().unwrap()),
            ("rebind.example", "142.250.1.1".parse().unwrap()),
            ("rebind.example", "::ffff:127.0.0.1".parse().unwrap()),
            ("lab.example", "192.168.1.9".parse().unwrap()),
        ]);
        let reg = Registry::new(
            store,
            mail.clone(),
            CredentialCache::new(Duration::from_secs(60)),
            [("mail".to_owned(), None)].into_iter().collect(),
        )
        .with_webpush_guard(
            AddressPolicy::new(["lab.example"], true),
            Arc::new(resolver),
        );
        let register = |endpoint: &'static str| {
            let reg = &reg;
            async move {
                reg.register("alice", &pw("pw"), webpush(endpoint).as_bytes(), None)
                    .await
            }
        };
        let rule = |r: Result<_, RegistryError>| match r {
            Err(RegistryError::EndpointRefused(e)) => e.rule(),
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert_eq!(
            rule(register("https://intranet.example/p/1").await),
            "private"
        );
        assert_eq!(
            rule(register("https://rebind.example/p/1").await),
            "loopback"
        );
        assert_eq!(
            rule(register("https://nowhere.example/p/1").await),
            "unresolvable"
        );
        assert_eq!(rule(register("https://127.0.0.1/p/1").await), "loopback");
        assert_eq!(rule(register("https://[::1]:8443/p/1").await), "loopback");
        assert_eq!(rule(register("https://169.254.169.254/").await), "metadata");
        assert_eq!(rule(register("https://[fd00:ec2::254]/").await), "metadata");
        assert_eq!(rule(register("https://100.64.0.1/").await), "cgnat");
        assert_eq!(
            rule(register("https://[::ffff:10.0.0.1]/").await),
            "private"
        );
        // Refusals come after the login, so strangers learn nothing (and resolve nothing).
        assert!(matches!(
            reg.register(
                "alice",
                &pw("bad"),
                webpush("https://intranet.example/").as_bytes(),
                None
            )
            .await,
            Err(RegistryError::BadCredentials)
        ));
        assert!(reg.list("alice", &pw("pw"), None).await.unwrap().is_empty());
        assert!(mail
            .log
            .lock()
            .unwrap()
            .iter()
            .all(|(_, c)| *c == SubscriptionChange::Keep));

        let (r, _) = register("https://push.example.net/p/1").await.unwrap();
        assert_eq!(r.transport, DeviceKind::WebPush);
        register("https://lab.example/p/2").await.unwrap();
        let devices = reg.list("alice", &pw("pw"), None).await.unwrap();
        assert_eq!(devices.len(), 2);
        // The device API's `wp-…` id removes a Web Push device.
        let id = public_token(DeviceKind::WebPush, &r.token);
        reg.remove("alice", &pw("pw"), &id, None).await.unwrap();
        assert_eq!(reg.list("alice", &pw("pw"), None).await.unwrap().len(), 1);
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
            reg.register("alice", &pw("bad"), body("t1").as_bytes(), None)
                .await,
            Err(RegistryError::BadCredentials)
        ));
        reg.register("alice", &pw("pw"), body("t1").as_bytes(), None)
            .await
            .unwrap();
        reg.register("alice", &pw("pw"), body("t2").as_bytes(), None)
            .await
            .unwrap();
        assert!(matches!(
            reg.register("alice", &pw("pw"), b"{}", None).await,
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(reg.list("alice", &pw("pw"), None).await.unwrap().len(), 2);
        assert!(matches!(
            reg.remove("bob", &pw("pw"), "t1", None).await,
            Err(RegistryError::NotFound)
        ));
        reg.remove("alice", &pw("pw"), "t1", None).await.unwrap();
        reg.remove("alice", &pw("pw"), "t2", None).await.unwrap();
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
