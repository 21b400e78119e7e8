//! The `Store` contract, as tests every backend runs: each test is a function generic
//! over a [`Backend`] (how to open a store, and open it again as a restarted process
//! would), and [`store_conformance_tests!`] makes one `#[tokio::test]` per function for a
//! backend (`store::sqlite` and `store::postgres` invoke it).

use std::collections::HashSet;
use std::future::Future;

use crate::domain::device::DeviceRegistration;
use crate::domain::event::NewMailEvent;
use crate::domain::store::{
    Completed, Completion, Ingested, RegisterOutcome, RemoveOutcome, Store,
};

/// A store backend under test.
pub(crate) trait Backend: Sized {
    type S: Store;
    /// A backend with no data.
    fn new() -> impl Future<Output = Self>;
    /// Opens the store as `serve` does; a second call opens the same data again, as the
    /// same receiver restarted (the previous store dropped without `close`: a crash).
    fn open(&self) -> impl Future<Output = Self::S>;
    /// The event ids committed.
    fn event_ids(&self) -> impl Future<Output = HashSet<String>>;
}

/// One `#[tokio::test]` per contract test for `$backend`.
#[macro_export]
#[doc(hidden)]
macro_rules! store_conformance_tests {
    ($backend:ty) => {
        $crate::store_conformance_tests!(
            $backend;
            ingest_writes_a_due_item_in_flight_within_its_limit,
            nothing_in_flight_when_not_due,
            ingest_fans_out_dedups_and_coalesces,
            delete_device_completion_reports_last_device,
            idle_devices_go_with_their_items_refreshed_ones_stay,
            in_flight_items_survive_reopen,
            remove_and_queue_commands,
            a_badge_event_older_than_one_taken_is_stale,
            new_mail_folded_into_a_waiting_badge_update_leaves_at_its_own_time
        );
    };
    ($backend:ty; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let backend = <$backend as $crate::store::conformance::Backend>::new().await;
                $crate::store::conformance::$name(&backend).await;
            }
        )*
    };
}

async fn depth(s: &impl Store) -> u64 {
    s.outbox_depth().await.unwrap()
}

fn event(user: &str, id: Option<&str>, uid: u32, at: i64) -> NewMailEvent {
    NewMailEvent {
        event_id: id.map(str::to_owned),
        kind: crate::domain::event::EventKind::MessageNew,
        user: user.into(),
        folder: "INBOX".into(),
        uidvalidity: 1,
        uid,
        from: None,
        subject: Some(format!("s{uid}")),
        snippet: None,
        unseen: Some(uid),
        time_ms: None,
        received_at: at,
    }
}

/// A `messageRead` that Dovecot committed at `time_ms`, with `unseen`.
fn badge(user: &str, id: &str, unseen: u32, time_ms: u64, at: i64) -> NewMailEvent {
    NewMailEvent {
        kind: crate::domain::event::EventKind::MessageRead,
        subject: None,
        unseen: Some(unseen),
        time_ms: Some(time_ms),
        ..event(user, Some(id), 0, at)
    }
}

pub(crate) async fn a_badge_event_older_than_one_taken_is_stale<B: Backend>(b: &B) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    // The newer change arrives first and is pushed (its item completed).
    let newer = ingest(&s, badge("alice", "r2", 1, 2_000, 10), 10, 1).await;
    assert_eq!(newer.result.unwrap().queued, 1);
    let item = &newer.in_flight[0];
    assert_eq!(item.content.unseen, Some(1));
    s.complete(vec![Completed {
        item_id: item.id,
        device_id: item.device.id,
        user: "alice".into(),
        at: 11,
        completion: Completion::Delivered,
    }])
    .await
    .unwrap();
    // The older one, replayed late: committed, not queued, and still a duplicate later.
    let older = ingest(&s, badge("alice", "r1", 2, 1_000, 20), 20, 1).await;
    let o = older.result.unwrap();
    assert!(o.stale && !o.duplicate, "{o:?}");
    assert_eq!((o.queued, o.coalesced), (0, 0));
    assert!(older.in_flight.is_empty());
    assert_eq!(depth(&s).await, 0);
    assert!(
        ingest(&s, badge("alice", "r1", 2, 1_000, 21), 21, 1)
            .await
            .result
            .unwrap()
            .duplicate
    );
    // A newer one goes on; new mail is never stale; another folder has its own times.
    let next = ingest(&s, badge("alice", "r3", 0, 3_000, 30), 30, 1).await;
    assert!(!next.result.unwrap().stale);
    let mail = ingest(&s, event("alice", Some("e9"), 9, 31), 31, 0).await;
    assert!(!mail.result.unwrap().stale);
    assert!(b.event_ids().await.contains("r1"));
}

fn reg(user: &str, token: &str, mailboxes: &[&str]) -> DeviceRegistration {
    DeviceRegistration {
        mailboxes: mailboxes.iter().map(|s| s.to_string()).collect(),
        ..DeviceRegistration::for_tests(user, token)
    }
}

/// Ingests `event`, due at `due_at`, with room for `limit` items in flight.
pub(crate) async fn new_mail_folded_into_a_waiting_badge_update_leaves_at_its_own_time<
    B: Backend,
>(
    b: &B,
) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    // A read waits a second for more; a new mail comes in meanwhile, due at once.
    let read = ingest(&s, badge("alice", "r1", 3, 1_000, 10), 1_010, 1).await;
    assert!(read.in_flight.is_empty());
    assert_eq!(s.next_due_at().await.unwrap(), Some(1_010));
    let o = ingest(&s, event("alice", Some("e1"), 4, 20), 20, 0)
        .await
        .result
        .unwrap();
    assert_eq!((o.queued, o.coalesced, o.advanced), (0, 1, 1));
    assert_eq!(s.next_due_at().await.unwrap(), Some(20));
    // Another read after it does not hold the alert back again.
    let o = ingest(&s, badge("alice", "r2", 2, 1_030, 30), 1_030, 0)
        .await
        .result
        .unwrap();
    assert_eq!((o.coalesced, o.advanced), (1, 0));
    assert_eq!(s.next_due_at().await.unwrap(), Some(20));
    assert_eq!(depth(&s).await, 1);
}

async fn ingest(s: &impl Store, event: NewMailEvent, due_at: i64, limit: usize) -> Ingested {
    s.ingest(event, due_at, limit).await
}

pub(crate) async fn ingest_writes_a_due_item_in_flight_within_its_limit<B: Backend>(b: &B) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    s.register_device(reg("bob", "t2", &["INBOX"]), 1)
        .await
        .unwrap();

    let first = ingest(&s, event("alice", Some("e1"), 1, 10), 10, 1).await;
    let o = first.result.unwrap();
    assert_eq!((o.queued, o.handed_over), (1, 1));
    assert_eq!(first.in_flight.len(), 1, "returned once committed");
    let item = &first.in_flight[0];
    assert_eq!(
        (item.content.uid, item.device.device.token.as_str()),
        (1, "t1")
    );
    assert!(
        s.claim_due(100, 10).await.unwrap().is_empty(),
        "it is in flight already"
    );

    // No room left: bob's item waits for a claim.
    let bob = ingest(&s, event("bob", Some("e2"), 1, 11), 11, 0).await;
    let o = bob.result.unwrap();
    assert_eq!((o.queued, o.handed_over), (1, 0));
    assert!(bob.in_flight.is_empty());

    // alice's device has an item in flight: even with room her next item is pending
    // (and absorbs later events) until that push is done.
    let o = ingest(&s, event("alice", Some("e3"), 2, 12), 12, 1)
        .await
        .result
        .unwrap();
    assert_eq!((o.queued, o.handed_over), (1, 0));
    let o = ingest(&s, event("alice", Some("e4"), 3, 13), 13, 1)
        .await
        .result
        .unwrap();
    assert_eq!((o.queued, o.coalesced, o.handed_over), (0, 1, 0));
    assert_eq!(depth(&s).await, 3);
}

pub(crate) async fn nothing_in_flight_when_not_due<B: Backend>(b: &B) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    // Due later (a coalescing window).
    let later = ingest(&s, event("alice", Some("e1"), 1, 10), 500, 2).await;
    let o = later.result.unwrap();
    assert_eq!((o.queued, o.handed_over), (1, 0));
    assert!(later.in_flight.is_empty());
}

pub(crate) async fn ingest_fans_out_dedups_and_coalesces<B: Backend>(b: &B) {
    let s = b.open().await;
    let r = s
        .register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    assert_eq!(
        r,
        RegisterOutcome {
            created: true,
            devices_before: 0
        }
    );
    let r = s
        .register_device(reg("alice", "t2", &["Work"]), 2)
        .await
        .unwrap();
    assert_eq!(r.devices_before, 1);
    let r = s
        .register_device(reg("alice", "t1", &["INBOX"]), 3)
        .await
        .unwrap();
    assert!(!r.created);

    let o = ingest(&s, event("alice", Some("e1"), 1, 10), 10, 0)
        .await
        .result
        .unwrap();
    assert_eq!((o.matched_devices, o.queued, o.coalesced), (1, 1, 0));
    let o = ingest(&s, event("alice", Some("e1"), 1, 11), 11, 0)
        .await
        .result
        .unwrap();
    assert!(o.duplicate);
    let o = ingest(&s, event("alice", Some("e2"), 2, 12), 12, 0)
        .await
        .result
        .unwrap();
    assert_eq!((o.queued, o.coalesced), (0, 1));
    let o = ingest(&s, event("bob", None, 1, 12), 12, 0)
        .await
        .result
        .unwrap();
    assert_eq!(o.matched_devices, 0);
    assert_eq!(depth(&s).await, 1);

    let items = s.claim_due(100, 10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].content.uid, 2);
    assert_eq!(items[0].content.unseen, Some(2));
    assert_eq!(items[0].content.coalesced, 1);
    assert_eq!(items[0].device.device.token, "t1");
    assert!(s.claim_due(100, 10).await.unwrap().is_empty());

    // A new event while the first is in flight makes a second item.
    let o = ingest(&s, event("alice", Some("e3"), 3, 13), 13, 0)
        .await
        .result
        .unwrap();
    assert_eq!(o.queued, 1);
    assert_eq!(depth(&s).await, 2);
    let done = s
        .complete(vec![Completed {
            item_id: items[0].id,
            device_id: items[0].device.id,
            user: "alice".into(),
            at: 20,
            completion: Completion::Retry {
                due_at: 50,
                reason: "busy".into(),
            },
        }])
        .await
        .unwrap();
    assert!(done.users_without_devices.is_empty());
    // The retried (older) item folded into the pending newer one.
    assert_eq!(depth(&s).await, 1);
    let items = s.claim_due(100, 10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].content.uid, 3);
    s.complete(vec![Completed {
        item_id: items[0].id,
        device_id: items[0].device.id,
        user: "alice".into(),
        at: 30,
        completion: Completion::Delivered,
    }])
    .await
    .unwrap();
    assert_eq!(depth(&s).await, 0);
    let devs = s.devices_of("alice".into()).await.unwrap();
    assert_eq!(devs[0].last_success_at, Some(30));
    assert_eq!(devs[0].last_error.as_deref(), Some("busy"));
}

pub(crate) async fn delete_device_completion_reports_last_device<B: Backend>(b: &B) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    ingest(&s, event("alice", None, 1, 10), 10, 0)
        .await
        .result
        .unwrap();
    let items = s.claim_due(10, 10).await.unwrap();
    let out = s
        .complete(vec![Completed {
            item_id: items[0].id,
            device_id: items[0].device.id,
            user: "alice".into(),
            at: 11,
            completion: Completion::DeleteDevice {
                reason: "Unregistered".into(),
            },
        }])
        .await
        .unwrap();
    assert_eq!(out.users_without_devices, vec!["alice".to_string()]);
    let subs = s.subscriptions(None).await.unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].last_error.as_deref(), Some("Unregistered"));
    assert!(subs[0].devices.is_empty());
    assert_eq!(depth(&s).await, 0);
}

pub(crate) async fn idle_devices_go_with_their_items_refreshed_ones_stay<B: Backend>(b: &B) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    s.register_device(reg("alice", "t2", &["INBOX"]), 1)
        .await
        .unwrap();
    s.register_device(reg("bob", "t3", &["INBOX"]), 2)
        .await
        .unwrap();
    // t2 registers again (the app started): seen at 50.
    s.register_device(reg("alice", "t2", &["INBOX"]), 50)
        .await
        .unwrap();
    ingest(&s, event("bob", None, 1, 10), 1_000, 0)
        .await
        .result
        .unwrap();
    assert_eq!(depth(&s).await, 1);

    let first = s
        .remove_idle_devices(40, 1, "idle".into(), 60)
        .await
        .unwrap();
    assert_eq!(first.removed.len(), 1, "{first:?}");
    assert_eq!(
        (first.removed[0].user.as_str(), first.removed[0].last_seen),
        ("alice", 1)
    );
    assert!(first.users_without_devices.is_empty(), "alice keeps t2");

    let second = s
        .remove_idle_devices(40, 10, "idle".into(), 61)
        .await
        .unwrap();
    assert_eq!(second.removed.len(), 1, "{second:?}");
    assert_eq!(second.removed[0].user, "bob");
    assert_eq!(second.users_without_devices, vec!["bob".to_string()]);
    assert_eq!(
        depth(&s).await,
        0,
        "bob's pending item went with his device"
    );

    let third = s
        .remove_idle_devices(40, 10, "idle".into(), 62)
        .await
        .unwrap();
    assert!(third.removed.is_empty());
    let alice = s.devices_of("alice".into()).await.unwrap();
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].device.token, "t2");
    let bob = s.subscriptions(Some("bob".into())).await.unwrap();
    assert_eq!(bob[0].last_error.as_deref(), Some("idle"));
    assert_eq!(bob[0].last_error_at, Some(61));
}

pub(crate) async fn in_flight_items_survive_reopen<B: Backend>(b: &B) {
    {
        let s = b.open().await;
        s.register_device(reg("alice", "t1", &["INBOX"]), 1)
            .await
            .unwrap();
        ingest(&s, event("alice", Some("a"), 1, 10), 10, 0)
            .await
            .result
            .unwrap();
        assert_eq!(s.claim_due(10, 10).await.unwrap().len(), 1);
        ingest(&s, event("alice", Some("b"), 2, 11), 11, 0)
            .await
            .result
            .unwrap();
        // Dropped without `close`: a crash.
    }
    let s = b.open().await;
    assert_eq!(depth(&s).await, 1);
    let items = s.claim_due(100, 10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].content.event_id.as_deref(), Some("b"));
    assert_eq!(items[0].content.coalesced, 1);
    drop(s);
    assert!(b.event_ids().await.contains("a"));
}

pub(crate) async fn remove_and_queue_commands<B: Backend>(b: &B) {
    let s = b.open().await;
    s.register_device(reg("alice", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    s.register_device(reg("bob", "t1", &["INBOX"]), 1)
        .await
        .unwrap();
    ingest(&s, event("alice", None, 1, 10), 1000, 0)
        .await
        .result
        .unwrap();
    let q = s.queue_list(10).await.unwrap();
    assert_eq!(q.len(), 1);
    assert!(s.queue_retry(q[0].id, 20).await.unwrap());
    assert_eq!(s.next_due_at().await.unwrap(), Some(20));
    assert!(s.queue_drop(q[0].id).await.unwrap());
    assert!(!s.queue_drop(q[0].id).await.unwrap());
    ingest(&s, event("alice", None, 2, 10), 10, 0)
        .await
        .result
        .unwrap();
    let r = s.remove_device("alice".into(), "t1".into()).await.unwrap();
    assert_eq!(
        r,
        RemoveOutcome {
            removed: true,
            devices_left: 0
        }
    );
    assert_eq!(depth(&s).await, 0);
    assert_eq!(s.devices_of("bob".into()).await.unwrap().len(), 1);
    assert_eq!(s.prune_events(11).await.unwrap(), 2);
}
