//! The dispatcher against local HTTP sinks: fan-out per endpoint, acknowledgements,
//! retries into the spool and replay, batches, refusals, and what a stop keeps.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use dovepush_protocol::notification::{EventKind, EventSet, Notification};
use dovepush_protocol::record::Record;
use dovepush_sender::dispatch::{Ack, Counts, Dispatcher, Input};
use dovepush_sender::http::Clients;
use dovepush_sender::spool::Spool;
use dovepush_sender::trust::Trust;
use dovepush_settings::{Endpoint, EndpointOptions, SpoolSettings};
use dovepush_testkit::free_port;
use dovepush_testkit::sink::{url_for, Sink};

fn record(n: u32) -> Record {
    Record::new(
        format!("ev{n:04}"),
        "alice@example.com".into(),
        "alice".into(),
        1_700_000_000_000 + u64::from(n),
        Notification {
            user: "alice@example.com".into(),
            event: EventKind::MessageNew,
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid: n,
            from: None,
            subject: Some(format!("mail {n}")),
            snippet: None,
            unseen: Some(n),
            time_ms: None,
        },
    )
}

fn endpoint(url: &str, options: EndpointOptions) -> Endpoint {
    Endpoint::parse("test", url, options).unwrap()
}

fn options(max_retries: u32, batch: bool) -> EndpointOptions {
    EndpointOptions {
        max_retries,
        timeout: Duration::from_secs(10),
        user_from_metadata: false,
        batch,
        events: EventSet::default(),
    }
}

/// A running dispatcher with its input, acks and stop switch.
struct Running {
    input: mpsc::Sender<Input>,
    acks: mpsc::UnboundedReceiver<u64>,
    ack_to: mpsc::UnboundedSender<u64>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Counts>,
    next_seq: u64,
}

impl Running {
    fn start(dir: &Path, endpoints: &[Endpoint], grace: Duration) -> Running {
        let spool = Spool::new(SpoolSettings {
            dir: dir.to_path_buf(),
            max_size: 1 << 30,
            max_age: Duration::from_secs(3600),
            retry_interval: Duration::from_secs(1),
        });
        for d in [&spool.drop, &spool.queue, &spool.quarantine] {
            std::fs::create_dir_all(d).unwrap();
        }
        let me = nix::unistd::getuid().as_raw();
        let trust = Trust {
            mail_uid: Some(me),
            first_valid_uid: 0,
            last_valid_uid: 0,
        };
        let dispatcher = Dispatcher::new(
            endpoints,
            spool,
            trust,
            Arc::new(Clients::new().unwrap()),
            false,
        );
        let (input, input_rx) = mpsc::channel(1000);
        let (stop, stop_rx) = oneshot::channel();
        let done = tokio::spawn(dispatcher.run(
            input_rx,
            async move {
                let _ = stop_rx.await;
            },
            grace,
        ));
        let (ack_to, acks) = mpsc::unbounded_channel();
        Running {
            input,
            acks,
            ack_to,
            stop: Some(stop),
            done,
            next_seq: 0,
        }
    }

    async fn send(&mut self, record: Record) -> u64 {
        self.next_seq += 1;
        let ack = Ack {
            to: self.ack_to.clone(),
            seq: self.next_seq,
            conn: 1,
        };
        self.input
            .send(Input::Record {
                record: Box::new(record),
                ack,
            })
            .await
            .unwrap();
        self.next_seq
    }

    /// Acknowledgements that arrived within `within`, counted per record.
    async fn acks(&mut self, want: usize, within: Duration) -> HashMap<u64, usize> {
        let mut seen = HashMap::new();
        let deadline = tokio::time::Instant::now() + within;
        while seen.values().sum::<usize>() < want {
            match tokio::time::timeout_at(deadline, self.acks.recv()).await {
                Ok(Some(seq)) => *seen.entry(seq).or_insert(0) += 1,
                _ => break,
            }
        }
        seen
    }

    async fn stop(self) -> Counts {
        self.stop_with_acks().await.0
    }

    /// Stop; also the acknowledgements not read yet.
    async fn stop_with_acks(mut self) -> (Counts, Vec<u64>) {
        let _ = self.stop.take().unwrap().send(());
        let counts = self.done.await.unwrap();
        let mut acks = Vec::new();
        while let Ok(seq) = self.acks.try_recv() {
            acks.push(seq);
        }
        (counts, acks)
    }
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

fn queued(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("queue"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
        })
        .count()
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn each_endpoint_gets_every_event_and_each_record_is_acknowledged_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (Sink::start(), Sink::start());
    let mut by_metadata = options(1, false);
    by_metadata.user_from_metadata = true;
    let endpoints = [
        endpoint(&a.url(Some("u:p")), options(1, false)),
        endpoint(&b.url(None), by_metadata),
    ];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(1));
    for n in 1..=3 {
        running.send(record(n)).await;
    }
    let acks = running.acks(3, WAIT).await;
    assert_eq!(acks, HashMap::from([(1, 1), (2, 1), (3, 1)]));
    assert_eq!(a.wait_for(3, WAIT).len(), 3);
    assert_eq!(b.wait_for(3, WAIT).len(), 3);
    assert!(a
        .requests()
        .iter()
        .all(|r| r.json()["user"] == "alice@example.com"
            && r.header("authorization") == Some("Basic dTpw")));
    assert!(b.requests().iter().all(|r| r.json()["user"] == "alice"));
    let ids = |s: &Sink| {
        let mut ids: Vec<String> = s
            .requests()
            .iter()
            .map(|r| r.event_id().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&a), ids(&b), "one id per event, for every endpoint");
    let counts = running.stop().await;
    assert_eq!((counts.sent, counts.persisted), (6, 0));
}

#[tokio::test]
async fn an_endpoint_gets_only_the_event_kinds_it_takes() {
    let tmp = tempfile::tempdir().unwrap();
    let (ox, mine) = (Sink::start(), Sink::start());
    let mut badges = options(1, false);
    badges.events = EventSet::parse("messageNew messageRead messageExpunge").unwrap();
    let endpoints = [
        endpoint(&ox.url(None), options(1, false)),
        endpoint(&mine.url(None), badges),
    ];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(1));
    let read = |n: u32, kind: EventKind| {
        let mut r = record(n);
        r.body.event = kind;
        r.body.subject = None;
        r
    };
    running.send(read(1, EventKind::MessageRead)).await;
    running.send(read(2, EventKind::MessageExpunge)).await;
    running.send(record(3)).await;
    // Every record is acknowledged, also those no endpoint but one takes.
    let acks = running.acks(3, WAIT).await;
    assert_eq!(acks, HashMap::from([(1, 1), (2, 1), (3, 1)]));
    let events = |s: &Sink| -> Vec<String> {
        let mut e: Vec<String> = s
            .requests()
            .iter()
            .map(|r| r.json()["event"].as_str().unwrap().to_string())
            .collect();
        e.sort();
        e
    };
    assert_eq!(mine.wait_for(3, WAIT).len(), 3);
    assert_eq!(
        events(&mine),
        ["messageExpunge", "messageNew", "messageRead"]
    );
    assert_eq!(ox.wait_for(1, WAIT).len(), 1);
    let counts = running.stop().await;
    assert_eq!(
        events(&ox),
        ["messageNew"],
        "the stock ox receiver sees no badge event"
    );
    assert_eq!(counts.sent, 4);
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_each_event_once_from_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoints = [endpoint(&url_for(port, None), options(1, false))];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(1));
    for n in 1..=5 {
        running.send(record(n)).await;
    }
    // Written to the spool before the retry, then acknowledged.
    assert_eq!(running.acks(5, WAIT).await.len(), 5);
    assert!(wait_until(WAIT, || queued(tmp.path()) == 5).await);
    let sink = Sink::start_on(port).unwrap();
    assert!(wait_until(WAIT, || queued(tmp.path()) == 0).await);
    let counts = running.stop().await;
    assert_eq!(sink.requests().len(), 5, "each event once");
    assert_eq!(counts.persisted, 5);
    assert_eq!(counts.sent, 5);
}

#[tokio::test]
async fn events_that_queue_during_a_request_travel_together() {
    let tmp = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    sink.set_delay(Duration::from_millis(300));
    let endpoints = [endpoint(&sink.url(None), options(1, true))];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(1));
    running.send(record(1)).await;
    assert!(wait_until(WAIT, || sink.attempts() == 1).await);
    for n in 2..=41 {
        running.send(record(n)).await;
    }
    assert_eq!(running.acks(41, WAIT).await.len(), 41);
    assert_eq!(sink.wait_for(41, WAIT).len(), 41);
    assert_eq!(
        sink.batches(),
        2,
        "the first alone, the 40 that waited in one"
    );
    assert!(sink
        .requests()
        .iter()
        .all(|r| r.path == "/preliminary/http-notify/v1/notify"));
    let counts = running.stop().await;
    assert_eq!((counts.sent, counts.requests), (41, 2));
}

#[tokio::test]
async fn a_receiver_without_a_batch_url_gets_single_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    sink.refuse_batches();
    let endpoints = [endpoint(&sink.url(None), options(1, true))];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(1));
    for n in 1..=4 {
        running.send(record(n)).await;
    }
    assert_eq!(running.acks(4, WAIT).await.len(), 4);
    let requests = sink.wait_for(4, WAIT);
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.method == "PUT"));
    running.stop().await;
}

#[tokio::test]
async fn a_final_refusal_is_tried_once_and_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    sink.set_status(400);
    let endpoints = [endpoint(&sink.url(None), options(3, false))];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(1));
    running.send(record(1)).await;
    assert_eq!(running.acks(1, WAIT).await.len(), 1);
    assert_eq!(sink.attempts(), 1);
    assert_eq!(queued(tmp.path()), 0);
    let counts = running.stop().await;
    assert_eq!((counts.refused, counts.persisted), (1, 0));
}

#[tokio::test]
async fn a_stop_keeps_what_was_not_sent_and_acknowledges_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    sink.set_delay(Duration::from_secs(3));
    let endpoints = [endpoint(&sink.url(None), options(1, false))];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_millis(100));
    for n in 1..=3 {
        running.send(record(n)).await;
    }
    assert!(wait_until(WAIT, || sink.attempts() == 3).await);
    let (counts, mut acks) = running.stop_with_acks().await;
    assert_eq!(counts.persisted, 3);
    assert_eq!(queued(tmp.path()), 3);
    acks.sort();
    assert_eq!(acks, [1, 2, 3], "kept, so the plugin may forget them");
}

#[tokio::test]
async fn records_of_a_closed_connection_are_kept_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    sink.set_delay(Duration::from_secs(2));
    let endpoints = [endpoint(&sink.url(None), options(1, false))];
    let mut running = Running::start(tmp.path(), &endpoints, Duration::from_secs(5));
    for n in 1..=2 {
        running.send(record(n)).await;
    }
    assert!(wait_until(WAIT, || sink.attempts() == 2).await);
    running.input.send(Input::Closed { conn: 1 }).await.unwrap();
    // Nobody else holds them now: they are on disk while the requests still run.
    assert!(wait_until(WAIT, || queued(tmp.path()) == 2).await);
    assert_eq!(sink.wait_for(2, WAIT).len(), 2);
    assert!(
        wait_until(WAIT, || queued(tmp.path()) == 0).await,
        "sent, so removed"
    );
    running.stop().await;
}
