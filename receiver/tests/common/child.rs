//! The receiver binary as a child process (for kills), a load generator that tells
//! which notifications were acknowledged, and a store seeded with one device per user.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dovepush_push::{DeviceKind, Privacy};
use dovepush_receiver::domain::device::DeviceRegistration;
use dovepush_receiver::domain::store::Store;
use dovepush_receiver::store::sqlite::SqliteStore;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::{notification, notify_auth, NOTIFY_PATH};

/// A store at `path` where users `u0 … u{n-1}` each have one APNs device `tok{i}` of app
/// `mail`: every event then becomes its own outbox item.
pub async fn seed_devices(path: &Path, n: usize) {
    let store = SqliteStore::open(path).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let regs: Vec<_> = chunk
            .iter()
            .map(|i| {
                store.register_device(
                    DeviceRegistration {
                        user: format!("u{i}"),
                        app: "mail".into(),
                        transport: DeviceKind::Apns,
                        token: format!("tok{i}"),
                        mailboxes: vec!["INBOX".into()],
                        privacy: Privacy::Full,
                    },
                    dovepush_receiver::domain::now_millis(),
                )
            })
            .collect();
        for r in futures_util::future::join_all(regs).await {
            r.unwrap();
        }
    }
}

/// The receiver serving `config`, logging warnings to `log`; returns once it answers.
pub fn spawn_receiver(config: &Path, log: &Path) -> (Child, SocketAddr) {
    spawn_receiver_logging(config, log, "warn")
}

/// [`spawn_receiver`] with `RUST_LOG=level`.
pub fn spawn_receiver_logging(config: &Path, log: &Path, level: &str) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dovepush-receiver"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = match lines.next() {
        Some(Ok(line)) => line,
        _ => panic!(
            "no address on stdout:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    };
    let addr = first
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    // Keep draining stdout so the child never blocks on it.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    wait_until_serving(&mut child, addr, log);
    (child, addr)
}

/// Blocks until the receiver answers `GET /healthz`: the line on stdout comes when the
/// port is bound, before the store is open, and a test that fills the disk or kills the
/// receiver right away must not race the start-up. Panics with its log if it exits or
/// is not serving within 60 s.
fn wait_until_serving(child: &mut Child, addr: SocketAddr, log: &Path) {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the receiver exited ({status}) before serving:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let asked = stream.write_all(
                b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
            );
            let mut reply = Vec::new();
            if asked.is_ok()
                && stream.read_to_end(&mut reply).is_ok()
                && reply.starts_with(b"HTTP/1.1 200")
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the receiver at {addr} did not answer /healthz within 60 s:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Sends notification `ev-n` for user `un` for each `n` of `ids` over `connections`
/// keep-alive connections, until done, `stop`, or the receiver goes away; returns the ids
/// answered 200.
pub async fn load(
    addr: SocketAddr,
    ids: Vec<usize>,
    connections: usize,
    stop: Arc<AtomicBool>,
) -> Vec<usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..connections {
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
