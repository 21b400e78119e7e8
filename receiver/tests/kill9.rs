//! `kill -9` under load: every notification answered 200 is in the store after a restart.
//!
//! Runs the real binary as a child process, loads it with 2000 notifications over 32
//! keep-alive connections, SIGKILLs it mid-load, restarts it, and checks that every
//! acknowledged event id is committed (event log and outbox). Then the whole load is sent
//! again: committed events are recognised as duplicates, the rest are added, and the store
//! ends with exactly one event and one outbox item per notification.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dovepush_receiver::domain::device::DeviceRegistration;
use dovepush_receiver::store::sqlite::{inspect, SqliteStore};
use dovepush_receiver::store::Store;
use dovepush_receiver::transport::{Privacy, TransportKind};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const EVENTS: usize = 2000;
const CONNECTIONS: usize = 32;
const KILL_AFTER: usize = 600;

fn spawn_receiver(config: &Path, log: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dovepush-receiver"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .expect("a line on stdout")
        .expect("readable stdout");
    let addr = first
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    // Keep draining stdout so the child never blocks on it.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, addr)
}

/// Sends `ids` with `CONNECTIONS` workers; returns the ids answered 200.
async fn load(addr: SocketAddr, ids: Vec<usize>, stop: Arc<AtomicBool>) -> Vec<usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let (next, ids, acked, stop) = (next.clone(), ids.clone(), acked.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
            else {
                return;
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let auth = notify_auth();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&n) = ids.get(i) else { return };
                let req = hyper::Request::builder()
                    .method("PUT")
                    .uri(NOTIFY_PATH)
                    .header("host", "localhost")
                    .header("authorization", &auth)
                    .header("x-dovepush-event-id", format!("ev-{n}"))
                    .body(Full::new(Bytes::from(notification(
                        &format!("u{n}"),
                        n as u32,
                        1,
                    ))))
                    .unwrap();
                let Ok(resp) = sender.send_request(req).await else {
                    return;
                };
                let status = resp.status();
                let Ok(body) = resp.into_body().collect().await else {
                    return;
                };
                if status == 200 && &body.to_bytes()[..] == br#"{"success":true}"# {
                    acked.lock().unwrap().push(n);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("receiver.toml");
    std::fs::write(&config_path, config_text(dir.path(), "")).unwrap();
    let store_path = dir.path().join("store.sqlite");

    // One device per user, so every event becomes its own outbox item.
    {
        let store = SqliteStore::open(&store_path).unwrap();
        let regs: Vec<_> = (0..EVENTS)
            .map(|n| {
                store.register_device(
                    DeviceRegistration {
                        user: format!("u{n}"),
                        app: "mail".into(),
                        transport: TransportKind::Apns,
                        token: format!("tok{n}"),
                        mailboxes: vec!["INBOX".into()],
                        privacy: Privacy::Full,
                    },
                    1,
                )
            })
            .collect();
        for r in futures_util::future::join_all(regs).await {
            r.unwrap();
        }
    }

    let (mut child, addr) = spawn_receiver(&config_path, &dir.path().join("run1.log"));
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = {
        let stop = stop.clone();
        tokio::spawn(load(addr, (0..EVENTS).collect(), stop))
    };
    // Kill once enough events are committed (watching the store file).
    let pid = child.id() as libc::pid_t;
    let killer = {
        let store_path = store_path.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let n = inspect::event_ids(&store_path)
                    .map(|s| s.len())
                    .unwrap_or(0);
                if n >= KILL_AFTER || std::time::Instant::now() > deadline {
                    // SAFETY: plain FFI call sending a signal to our own child process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return n;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let committed_at_kill = killer.await.unwrap();
    let acked = load_task.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let status = child.wait().unwrap();
    assert!(!status.success(), "the receiver was killed");
    assert!(committed_at_kill >= KILL_AFTER);
    assert!(
        acked.len() < EVENTS,
        "the kill came after the whole load ({} acked): not a mid-load kill",
        acked.len()
    );
    assert!(acked.len() >= KILL_AFTER / 2, "only {} acked", acked.len());
    eprintln!(
        "killed with {committed_at_kill} events committed, {} acknowledged",
        acked.len()
    );

    // Restart and check every acknowledged event.
    let (mut child, addr) = spawn_receiver(&config_path, &dir.path().join("run2.log"));
    let events = inspect::event_ids(&store_path).unwrap();
    let outbox = inspect::outbox_event_ids(&store_path).unwrap();
    let missing: Vec<_> = acked
        .iter()
        .filter(|n| !events.contains(&format!("ev-{n}")) || !outbox.contains(&format!("ev-{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost: {missing:?}",
        missing.len()
    );

    // Send everything again: the lost-in-flight rest is added, the committed are duplicates.
    let again = load(
        addr,
        (0..EVENTS).collect(),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    assert_eq!(again.len(), EVENTS);
    let events = inspect::event_ids(&store_path).unwrap();
    let outbox = inspect::outbox_event_ids(&store_path).unwrap();
    let all: HashSet<String> = (0..EVENTS).map(|n| format!("ev-{n}")).collect();
    assert_eq!(events, all);
    assert_eq!(outbox, all);
    let m = admin_get(addr, "/metrics").await.text();
    let duplicates: usize = m
        .lines()
        .find_map(|l| l.strip_prefix("dovepush_ingest_duplicates_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        duplicates >= acked.len(),
        "{duplicates} duplicates < {} acked",
        acked.len()
    );
    assert!(
        m.contains(&format!("dovepush_outbox_depth {EVENTS}\n")),
        "{m}"
    );

    // SIGTERM: a clean stop.
    // SAFETY: plain FFI call sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}
