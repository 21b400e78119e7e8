//! Device lifetime: the sweep that removes devices an app stopped registering.
//!
//! Apps register their device (`PUT /v1/devices`) at every start, which refreshes its
//! `last_seen`. An uninstalled app tells nobody, and only some push services report dead
//! tokens, so a device that has not registered for `[devices] max_idle_days` (default 90,
//! as chatmail does) is removed with its outbox items; when it was its user's last device
//! the subscription METADATA is cleared too, as when a push service removes one. The
//! sweep runs at start and then every [`SWEEP_INTERVAL`]; the time is an argument of
//! [`IdleSweep::sweep`], so tests move it instead of waiting.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::registry::{clear_subscription_if_no_devices, UserLocks};
use super::store::{Store, StoreError};
use super::{format_millis, now_millis};
use crate::mailserver::MailServer;
use crate::telemetry::Metrics;

/// How often a running receiver sweeps.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// Devices removed per store call (one transaction each).
const SWEEP_BATCH: usize = 500;

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Devices removed.
    pub removed: u64,
    /// Users whose last device went (their subscription METADATA was cleared, or tried).
    pub users_without_devices: Vec<String>,
}

/// The idle-device sweep of one receiver (several receivers sharing a store may sweep at
/// once: each device goes once).
pub struct IdleSweep {
    pub store: Arc<dyn Store>,
    pub user_locks: UserLocks,
    pub mail: Arc<dyn MailServer>,
    pub metrics: Arc<Metrics>,
    /// `[devices] max_idle_days`.
    pub max_idle: Duration,
}

impl IdleSweep {
    /// Removes every device not registered since `now - max_idle` (ms since the epoch),
    /// and clears the subscription of users left without one.
    pub async fn sweep(&self, now: i64) -> Result<SweepReport, StoreError> {
        let max_idle_ms = i64::try_from(self.max_idle.as_millis()).unwrap_or(i64::MAX);
        let seen_before = now.saturating_sub(max_idle_ms);
        let days = self.max_idle.as_secs() / 86_400;
        let reason = format!("device not seen for {days} days; removed");
        let mut report = SweepReport::default();
        loop {
            let batch = self
                .store
                .remove_idle_devices(seen_before, SWEEP_BATCH, reason.clone(), now)
                .await?;
            for d in &batch.removed {
                tracing::info!(
                    user = %d.user,
                    app = %d.app,
                    transport = %d.transport,
                    last_seen = %format_millis(d.last_seen),
                    "Idle device removed."
                );
            }
            let n = batch.removed.len();
            report.removed += n as u64;
            self.metrics.devices_removed_idle.inc_by(n as u64);
            for user in batch.users_without_devices {
                clear_subscription_if_no_devices(
                    user.clone(),
                    self.store.clone(),
                    self.user_locks.clone(),
                    self.mail.clone(),
                )
                .await;
                report.users_without_devices.push(user);
            }
            if n < SWEEP_BATCH {
                return Ok(report);
            }
        }
    }

    /// Sweeps now and every [`SWEEP_INTERVAL`] until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            match self.sweep(now_millis()).await {
                Ok(r) if r.removed > 0 => tracing::info!(
                    removed = r.removed,
                    users_without_devices = r.users_without_devices.len(),
                    "Idle-device sweep done."
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Idle-device sweep failed; trying again later.")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::DeviceRegistration;
    use crate::mailserver::{MailCredential, MailError, SubscriptionChange};
    use crate::store::sqlite::SqliteStore;
    use futures_util::future::BoxFuture;
    use std::net::IpAddr;
    use std::sync::Mutex;

    const DAY: i64 = 86_400_000;

    /// Records the users whose subscription the master login cleared.
    #[derive(Default)]
    struct FakeMail {
        cleared: Mutex<Vec<String>>,
    }

    impl MailServer for FakeMail {
        fn login<'a>(
            &'a self,
            _login: &'a str,
            _credential: &'a MailCredential,
            _change: SubscriptionChange,
            _client: Option<IpAddr>,
        ) -> BoxFuture<'a, Result<(), MailError>> {
            Box::pin(async { Ok(()) })
        }
        fn clear_subscription_as_master<'a>(
            &'a self,
            user: &'a str,
        ) -> BoxFuture<'a, Result<(), MailError>> {
            self.cleared.lock().unwrap().push(user.to_owned());
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn idle_devices_go_with_the_last_ones_subscription_refreshed_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).unwrap());
        let mail = Arc::new(FakeMail::default());
        let metrics = Arc::new(Metrics::new());
        let sweep = IdleSweep {
            store: store.clone(),
            user_locks: UserLocks::local(),
            mail: mail.clone(),
            metrics: metrics.clone(),
            max_idle: Duration::from_secs(90 * 86_400),
        };
        let t0 = 1_700_000_000_000;
        for (user, token) in [
            ("alice", "a1"),
            ("bob", "b1"),
            ("bob", "b2"),
            ("carol", "c1"),
        ] {
            store
                .register_device(DeviceRegistration::for_tests(user, token), t0)
                .await
                .unwrap();
        }
        // 60 days later carol's app and one of bob's start again: PUT /v1/devices.
        store
            .register_device(DeviceRegistration::for_tests("carol", "c1"), t0 + 60 * DAY)
            .await
            .unwrap();
        store
            .register_device(DeviceRegistration::for_tests("bob", "b2"), t0 + 60 * DAY)
            .await
            .unwrap();

        // Day 89: nothing is idle long enough yet.
        assert_eq!(sweep.sweep(t0 + 89 * DAY).await.unwrap().removed, 0);

        // Day 91: alice's only device and bob's unrefreshed one go.
        let report = sweep.sweep(t0 + 91 * DAY).await.unwrap();
        assert_eq!(report.removed, 2);
        assert_eq!(report.users_without_devices, vec!["alice".to_string()]);
        assert_eq!(*mail.cleared.lock().unwrap(), vec!["alice".to_string()]);
        let bob = store.devices_of("bob".into()).await.unwrap();
        assert_eq!(bob.len(), 1);
        assert_eq!(bob[0].device.token, "b2");
        assert_eq!(store.devices_of("carol".into()).await.unwrap().len(), 1);
        let alice = store.subscriptions(Some("alice".into())).await.unwrap();
        assert_eq!(
            alice[0].last_error.as_deref(),
            Some("device not seen for 90 days; removed")
        );
        assert!(metrics
            .render(0)
            .contains("dovepush_devices_removed_idle_total 2"));

        // A second sweep the same day finds nothing more.
        assert_eq!(
            sweep.sweep(t0 + 91 * DAY).await.unwrap(),
            SweepReport::default()
        );
    }

    #[tokio::test]
    async fn a_device_registered_again_before_the_clear_keeps_the_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).unwrap());
        let mail = Arc::new(FakeMail::default());
        let locks = UserLocks::local();
        store
            .register_device(DeviceRegistration::for_tests("alice", "a1"), 0)
            .await
            .unwrap();
        let removed = store
            .remove_idle_devices(10, 10, "idle".into(), 20)
            .await
            .unwrap();
        assert_eq!(removed.users_without_devices, vec!["alice".to_string()]);
        // The app registers again between the removal and the clear.
        store
            .register_device(DeviceRegistration::for_tests("alice", "a2"), 21)
            .await
            .unwrap();
        clear_subscription_if_no_devices("alice".into(), store, locks, mail.clone()).await;
        assert!(mail.cleared.lock().unwrap().is_empty());
    }
}
