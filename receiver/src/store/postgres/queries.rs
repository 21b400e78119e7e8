//! What the PostgreSQL store reads: a user's devices, the status listing, the operators'
//! queue listing, when the next item is due; and how a device row reads.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::Fail;
use crate::domain::device::{system_time, RegisteredDevice};
use crate::domain::event::PushContent;
use crate::domain::store::{QueueEntry, StoreError, UserStatus};
use dovepush_push::{Device, DeviceKind, Privacy};

/// The device columns [`device_from_row`] reads.
pub(super) const DEVICE_COLUMNS: &str = "d.id, d.login, d.app, d.transport, d.token, \
     d.mailboxes, d.privacy, d.created_at, d.last_success_at, d.last_error, d.last_error_at, \
     d.updated_at";

/// Reads the device columns ([`DEVICE_COLUMNS`]) starting at `at`.
pub(super) fn device_from_row(r: &Row, at: usize, pending: u64) -> Result<RegisteredDevice, Fail> {
    let bad = |what: String| Fail::Store(StoreError::Corrupt(what));
    let transport: &str = r.get(at + 3);
    let mailboxes: &str = r.get(at + 5);
    let privacy: &str = r.get(at + 6);
    Ok(RegisteredDevice {
        id: r.get(at),
        user: r.get(at + 1),
        device: Device {
            app_id: r.get(at + 2),
            kind: transport
                .parse::<DeviceKind>()
                .map_err(|_| bad(format!("unknown transport {transport:?}")))?,
            token: r.get(at + 4),
            privacy: Some(
                privacy
                    .parse::<Privacy>()
                    .map_err(|_| bad(format!("unknown privacy {privacy:?}")))?,
            ),
            registered_at: Some(system_time(r.get(at + 11))),
        },
        mailboxes: serde_json::from_str(mailboxes).map_err(|e| bad(e.to_string()))?,
        created_at: r.get(at + 7),
        last_success_at: r.get(at + 8),
        last_error: r.get(at + 9),
        last_error_at: r.get(at + 10),
        pending,
    })
}

/// The devices of `user` (or everyone's), by user and age, with their outbox items.
pub(super) async fn devices(
    client: &impl GenericClient,
    user: Option<&str>,
) -> Result<Vec<RegisteredDevice>, Fail> {
    let rows = client
        .query(
            &format!(
                "SELECT {DEVICE_COLUMNS}, (SELECT count(*) FROM outbox o WHERE o.device_id = d.id)
                 FROM devices d WHERE $1::text IS NULL OR d.login = $1
                 ORDER BY d.login, d.created_at, d.id"
            ),
            &[&user],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let pending: i64 = r.get(12);
            device_from_row(r, 0, pending as u64)
        })
        .collect()
}

/// When the next pending item is due.
pub(super) async fn next_due_at(
    client: &impl GenericClient,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT min(due_at) FROM outbox WHERE state = 0", &[])
        .await?
        .get(0))
}

/// Users with devices (or a last error), with their devices; one user if given.
pub(super) async fn subscriptions(
    client: &impl GenericClient,
    user: Option<&str>,
) -> Result<Vec<UserStatus>, Fail> {
    let devices = devices(client, user).await?;
    let mut errors: BTreeMap<String, (Option<String>, Option<i64>)> = client
        .query(
            "SELECT login, last_error, last_error_at FROM users WHERE $1::text IS NULL OR login = $1",
            &[&user],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut out: Vec<UserStatus> = Vec::new();
    for d in devices {
        if out.last().map(|u| u.user != d.user).unwrap_or(true) {
            let (last_error, last_error_at) = errors.remove(&d.user).unwrap_or_default();
            out.push(UserStatus {
                user: d.user.clone(),
                last_error,
                last_error_at,
                devices: Vec::new(),
            });
        }
        if let Some(u) = out.last_mut() {
            u.devices.push(d);
        }
    }
    for (user, (last_error, last_error_at)) in errors {
        out.push(UserStatus {
            user,
            last_error,
            last_error_at,
            devices: Vec::new(),
        });
    }
    out.sort_by(|a, b| a.user.cmp(&b.user));
    Ok(out)
}

/// Outbox rows, oldest due first.
pub(super) async fn queue_list(
    client: &impl GenericClient,
    limit: usize,
) -> Result<Vec<QueueEntry>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT o.id, d.login, d.app, d.transport, d.token, o.state, o.attempts,
                    o.created_at, o.due_at, o.last_error, o.content
             FROM outbox o JOIN devices d ON d.id = o.device_id
             ORDER BY o.due_at, o.id LIMIT $1",
            &[&(limit as i64)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let content: &str = r.get(10);
            let attempts: i32 = r.get(6);
            QueueEntry {
                id: r.get(0),
                user: r.get(1),
                app: r.get(2),
                transport: r.get(3),
                token: r.get(4),
                in_flight: r.get::<_, i16>(5) == 1,
                attempts: attempts.max(0) as u32,
                created_at: r.get(7),
                due_at: r.get(8),
                last_error: r.get(9),
                event_id: serde_json::from_str::<PushContent>(content)
                    .ok()
                    .and_then(|c| c.event_id),
            }
        })
        .collect())
}
