//! Ingest benchmark (not a test): the receiver's ingest endpoint, durable commit included,
//! against a bare hyper server that answers 200 — same machine, same load generator, one run.
//!
//! ```text
//! cargo run --release --example ingest_bench [-- --requests N --seconds S --connections C --wide-connections C]
//! ```
//!
//! Each server runs in its own child process (this program re-executed with a `child-*`
//! argument); the parent is the load generator: C keep-alive HTTP/1.1 connections on
//! loopback, each sending ox notifications back to back, bounded by N requests and S
//! seconds. The receiver child runs the library's `run` with the default config, a store
//! seeded with devices (so every event fans out into the outbox) and a transport that
//! answers `Delivered` at once, so the dispatcher works during the run too.
//! A third run seeds 1,000,000 devices and reports the receiver's resident memory under load.
//! The baseline and the 10,000-device receiver are measured at two concurrencies (64 and
//! 256 connections): group commit needs concurrent requests to share a disk flush, and a
//! closed loop of 64 leaves the receiver latency-bound rather than CPU-bound.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dovepush_receiver::config::Config;
use dovepush_receiver::store::sqlite::SqliteStore;
use dovepush_receiver::transport::{
    Outcome, Push, SendFuture, Transport, TransportKind, Transports,
};
use dovepush_testkit::procfs;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const NOTIFY_PATH: &str = "/preliminary/http-notify/v1/notify";
const AUTH: &str = "Basic ZG92ZWNvdDpub3RpZnktc2VjcmV0"; // dovecot:notify-secret

#[derive(Clone, Copy)]
struct Settings {
    requests: usize,
    seconds: u64,
    connections: usize,
    /// A second, wider run of the baseline and the 10,000-device receiver.
    wide_connections: usize,
    devices: usize,
    big_devices: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("child-baseline") => child_baseline(),
        Some("child-receiver") => child_receiver(Path::new(&args[2])),
        _ => parent(&args[1..]),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn announce(addr: SocketAddr) {
    use std::io::Write;
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
}

/// The baseline: hyper-util's auto builder (as the receiver uses), answering 200 with the
/// same body, after reading the request body.
fn child_baseline() {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;
    use hyper_util::server::conn::auto;
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        announce(listener.local_addr().unwrap());
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut resp =
                        hyper::Response::new(Full::new(Bytes::from_static(br#"{"success":true}"#)));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
}

/// Answers `Delivered` at once.
struct InstantTransport;

impl Transport for InstantTransport {
    fn send<'a>(&'a self, _push: &'a Push) -> SendFuture<'a> {
        Box::pin(async { Outcome::Delivered })
    }
}

fn child_receiver(config: &Path) {
    let config = Config::load(config).expect("bench config");
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        announce(listener.local_addr().unwrap());
        let transports = Transports::new()
            .with_kind(TransportKind::Apns, Arc::new(InstantTransport))
            .with_kind(TransportKind::Fcm, Arc::new(InstantTransport));
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            term.recv().await;
        };
        dovepush_receiver::run(listener, config, transports, shutdown)
            .await
            .unwrap();
    });
}

fn spawn_child(args: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let addr = line.trim_start_matches("listening on ").parse().unwrap();
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, addr)
}

fn stop_child(mut child: Child) {
    // SAFETY: plain FFI call sending SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
}

/// Resident and peak resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let field = |name| procfs::status_field(pid, name).unwrap_or(0);
    (field("VmRSS"), field("VmHWM"))
}

struct LoadResult {
    ok: usize,
    failed: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// CPU the server process used during the run.
    server_cpu: Duration,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// Server CPU per answered request, in microseconds.
    fn cpu_us_per_request(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.ok.max(1) as f64
    }
}

/// Loads the server child `pid` at `addr` and measures the CPU it used meanwhile.
fn measure(
    rt: &tokio::runtime::Runtime,
    pid: u32,
    addr: SocketAddr,
    s: &Settings,
    users: usize,
    run: &str,
) -> LoadResult {
    let before = procfs::cpu_time(pid);
    let mut result = rt.block_on(load(addr, s, users, run));
    result.server_cpu = procfs::cpu_time(pid).saturating_sub(before);
    result
}

/// The load generator: `connections` keep-alive connections, bounded by count and time.
async fn load(addr: SocketAddr, s: &Settings, users: usize, run: &str) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(s.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..s.connections {
        let next = next.clone();
        let requests = s.requests;
        let run = run.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(requests / 8);
            let mut failed = 0usize;
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() >= deadline {
                    break;
                }
                let body = format!(
                    r#"{{"user":"user{}","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":{i},"from":"Alice <alice@example.org>","subject":"Benchmark message {i}","snippet":"Hello there, this is a short preview of the message body.","unseen":{}}}"#,
                    i % users,
                    i % 100
                );
                let req = hyper::Request::builder()
                    .method("PUT")
                    .uri(NOTIFY_PATH)
                    .header("host", "127.0.0.1")
                    .header("authorization", AUTH)
                    .header("content-type", "application/json; charset=utf-8")
                    .header("x-dovepush-event-id", format!("{run}-{i}"))
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let t = Instant::now();
                match sender.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status() == 200;
                        let _ = resp.into_body().collect().await;
                        if ok {
                            latencies.push(t.elapsed());
                        } else {
                            failed += 1;
                        }
                    }
                    Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await.unwrap();
        all.extend(l);
        failed += f;
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    LoadResult {
        ok: all.len(),
        failed,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        max: all.last().copied().unwrap_or_default(),
        server_cpu: Duration::ZERO,
    }
}

/// A fresh store with `n` devices (users `user0..user{n-1}`), bulk-inserted.
fn seed_store(path: &Path, n: usize) {
    drop(SqliteStore::open(path).expect("store"));
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA synchronous = OFF").unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO devices (user, app, token, transport, mailboxes, privacy, created_at, updated_at)
                 VALUES (?1, 'mail', ?2, ?3, '[\"INBOX\"]', 'full', 1700000000000, 1700000000000)",
            )
            .unwrap();
        for i in 0..n {
            let transport = if i % 2 == 0 { "apns" } else { "fcm" };
            stmt.execute(rusqlite::params![
                format!("user{i}"),
                format!("{:064x}", i as u128 * 0x9E37_79B9_7F4A_7C15),
                transport
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
}

fn write_config(dir: &Path, store: &Path) -> std::path::PathBuf {
    let path = dir.join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
[notify]
username = "dovecot"
password = "notify-secret"
[admin]
token = "bench-admin-token-0123456789"
[store]
path = "{}"
[[apps]]
id = "mail"
"#,
            store.display()
        ),
    )
    .unwrap();
    path
}

fn parent(args: &[String]) {
    let mut s = Settings {
        requests: 300_000,
        seconds: 15,
        connections: 64,
        wide_connections: 256,
        devices: 10_000,
        big_devices: 1_000_000,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().and_then(|v| v.parse::<usize>().ok());
        match (a.as_str(), v) {
            ("--requests", Some(v)) => s.requests = v,
            ("--seconds", Some(v)) => s.seconds = v as u64,
            ("--connections", Some(v)) => s.connections = v,
            ("--wide-connections", Some(v)) => s.wide_connections = v,
            ("--devices", Some(v)) => s.devices = v,
            ("--big-devices", Some(v)) => s.big_devices = v,
            _ => {
                eprintln!("usage: ingest_bench [--requests N] [--seconds S] [--connections C] [--wide-connections C] [--devices D] [--big-devices D]");
                std::process::exit(2);
            }
        }
    }
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();

    eprintln!("baseline: bare hyper …");
    let (child, addr) = spawn_child(&["child-baseline"]);
    let base = measure(&rt, child.id(), addr, &s, s.devices, "base");
    let wide = Settings {
        connections: s.wide_connections,
        ..s
    };
    let base_wide = measure(&rt, child.id(), addr, &wide, s.devices, "base-wide");
    stop_child(child);

    eprintln!("receiver: seeding {} devices …", s.devices);
    let store = dir.path().join("small/store.sqlite");
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    seed_store(&store, s.devices);
    let config = write_config(store.parent().unwrap(), &store);
    let (child, addr) = spawn_child(&["child-receiver", config.to_str().unwrap()]);
    let recv = measure(&rt, child.id(), addr, &s, s.devices, "recv");
    let recv_wide = measure(&rt, child.id(), addr, &wide, s.devices, "recv-wide");
    let (recv_rss, recv_hwm) = rss_kib(child.id());
    stop_child(child);

    eprintln!("receiver: seeding {} devices …", s.big_devices);
    let seed_started = Instant::now();
    let big = dir.path().join("big/store.sqlite");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    seed_store(&big, s.big_devices);
    let seed_time = seed_started.elapsed();
    let config = write_config(big.parent().unwrap(), &big);
    let (child, addr) = spawn_child(&["child-receiver", config.to_str().unwrap()]);
    let (idle_rss, _) = rss_kib(child.id());
    let big_settings = Settings {
        requests: s.requests.min(50_000),
        seconds: s.seconds.min(10),
        ..s
    };
    let big_load = measure(
        &rt,
        child.id(),
        addr,
        &big_settings,
        big_settings.big_devices,
        "big",
    );
    let (big_rss, big_hwm) = rss_kib(child.id());
    stop_child(child);
    let db_size = std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0);

    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    println!();
    println!(
        "ingest benchmark: ≤{} requests, ≤{} s per run, loopback, {} CPUs (load generator and server share them)",
        s.requests,
        s.seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| {:<34} | {:>5} | {:>9} | {:>7} | {:>9} | {:>9} | {:>9} | {:>10} | {:>13} |",
        "server",
        "conns",
        "requests",
        "failed",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "server µs/req"
    );
    println!(
        "|{:-<36}|{:->7}|{:->11}|{:->9}|{:->11}|{:->11}|{:->11}|{:->12}|{:->15}|",
        "", "", "", "", "", "", "", "", ""
    );
    let small = format!("receiver, {} devices", s.devices);
    let large = format!("receiver, {} devices", s.big_devices);
    for (name, conns, r) in [
        ("bare hyper 200 (baseline)", s.connections, &base),
        (small.as_str(), s.connections, &recv),
        (large.as_str(), s.connections, &big_load),
        ("bare hyper 200 (baseline)", s.wide_connections, &base_wide),
        (small.as_str(), s.wide_connections, &recv_wide),
    ] {
        println!(
            "| {:<34} | {:>5} | {:>9} | {:>7} | {:>9.0} | {:>9} | {:>9} | {:>10} | {:>13.1} |",
            name,
            conns,
            r.ok,
            r.failed,
            r.rps(),
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.cpu_us_per_request()
        );
    }
    println!();
    for (conns, recv, base) in [
        (s.connections, &recv, &base),
        (s.wide_connections, &recv_wide, &base_wide),
    ] {
        let ratio = recv.rps() / base.rps();
        println!(
            "{conns} connections: throughput ratio receiver/baseline {:.2} (target ≥ 0.50) {}; p99 ratio {:.1}x",
            ratio,
            if ratio >= 0.5 { "PASS" } else { "FAIL" },
            recv.p99.as_secs_f64() / base.p99.as_secs_f64().max(1e-9)
        );
    }
    println!(
        "RSS, {} devices: {:.1} MiB after load (peak {:.1} MiB)",
        s.devices,
        recv_rss as f64 / 1024.0,
        recv_hwm as f64 / 1024.0
    );
    println!(
        "RSS, {} devices: {:.1} MiB idle, {:.1} MiB after load, peak {:.1} MiB (target ≤ 64 MiB) {}; store file {:.0} MiB, seeded in {:.1} s",
        s.big_devices,
        idle_rss as f64 / 1024.0,
        big_rss as f64 / 1024.0,
        big_hwm as f64 / 1024.0,
        if big_hwm <= 64 * 1024 { "PASS" } else { "FAIL" },
        db_size as f64 / 1048576.0,
        seed_time.as_secs_f64()
    );
}
