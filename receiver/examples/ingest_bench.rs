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
//! A fourth sends the same events in batches of `--batch` (20) to `POST /v1/notify/batch`,
//! as dovepush's sender service does under load with `dovepush_batch`, and reports events
//! per second beside requests per second.
//! The baseline and the 10,000-device receiver are measured at two concurrencies (64 and
//! 256 connections): group commit needs concurrent requests to share a disk flush, and a
//! closed loop of 64 leaves the receiver latency-bound rather than CPU-bound.

// Signals go out through libc: every unsafe block says why it is sound (the workspace
// cannot turn this lint on for every crate yet, see Cargo.toml).
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dovepush_push::{Device, DeviceKind, Notification, Outcome, Transport};
use dovepush_receiver::config::Config;
use dovepush_receiver::store::sqlite::SqliteStore;
use dovepush_receiver::transport::Transports;
use dovepush_testkit::procfs;
use futures_util::future::BoxFuture;
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
    /// Events per request: 1 sends single ox PUTs, more sends batches.
    batch: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("child-baseline") => child_baseline(),
        Some("child-receiver") => child_receiver(Path::new(&args[2])),
        Some("cluster") => cluster::main(&args[2..]),
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
    fn send<'a>(&'a self, _: &'a Device, _: &'a Notification) -> BoxFuture<'a, Outcome> {
        Box::pin(async { Outcome::Delivered { id: None } })
    }
}

fn child_receiver(config: &Path) {
    let config = Config::load(config).expect("bench config");
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        announce(listener.local_addr().unwrap());
        let transports = Transports::new()
            .with_kind(DeviceKind::Apns, Arc::new(InstantTransport))
            .with_kind(DeviceKind::Fcm, Arc::new(InstantTransport));
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
    let mut result = rt.block_on(load(&[addr], s, users, run));
    result.server_cpu = procfs::cpu_time(pid).saturating_sub(before);
    result
}

/// The load generator: `connections` keep-alive connections (spread over `addrs` in
/// turn), bounded by count and time.
async fn load(addrs: &[SocketAddr], s: &Settings, users: usize, run: &str) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(s.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..s.connections {
        let addr = addrs[c % addrs.len()];
        let next = next.clone();
        let requests = s.requests;
        let batch = s.batch;
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
                let event = |i: usize| {
                    format!(
                        r#"{{"user":"user{}","event":"messageNew","folder":"INBOX","imap-uidvalidity":1655200000,"imap-uid":{i},"from":"Alice <alice@example.org>","subject":"Benchmark message {i}","snippet":"Hello there, this is a short preview of the message body.","unseen":{}}}"#,
                        i % users,
                        i % 100
                    )
                };
                let req = hyper::Request::builder()
                    .header("host", "127.0.0.1")
                    .header("authorization", AUTH)
                    .header("content-type", "application/json; charset=utf-8");
                let req = if batch <= 1 {
                    req.method("PUT")
                        .uri(NOTIFY_PATH)
                        .header("x-dovepush-event-id", format!("{run}-{i}"))
                        .body(Full::new(Bytes::from(event(i))))
                } else {
                    let items: Vec<String> = (i * batch..(i + 1) * batch)
                        .map(|e| format!(r#"{{"event_id":"{run}-{e}","notification":{}}}"#, event(e)))
                        .collect();
                    let body = format!(r#"{{"notifications":[{}]}}"#, items.join(","));
                    req.method("POST")
                        .uri("/v1/notify/batch")
                        .body(Full::new(Bytes::from(body)))
                }
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

/// A fresh store with `n` devices (users `user0..user{n-1}`), bulk-inserted, registered
/// now (so that the idle sweep leaves them).
fn seed_store(path: &Path, n: usize) {
    drop(SqliteStore::open(path).expect("store"));
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA synchronous = OFF").unwrap();
    let tx = conn.transaction().unwrap();
    let now = dovepush_receiver::domain::now_millis();
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO devices (user, app, token, transport, mailboxes, privacy, created_at, updated_at)
                 VALUES (?1, 'mail', ?2, ?3, '[\"INBOX\"]', 'full', ?4, ?4)",
            )
            .unwrap();
        for i in 0..n {
            let transport = if i % 2 == 0 { "apns" } else { "fcm" };
            stmt.execute(rusqlite::params![
                format!("user{i}"),
                format!("{:064x}", i as u128 * 0x9E37_79B9_7F4A_7C15),
                transport,
                now
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

/// `--requests N` and the like into `s`, and the `--batch` size for the batch run (20
/// unless given); exits 2 on anything else.
fn parse_settings(args: &[String], mut s: Settings) -> (Settings, usize) {
    let mut batch = 20;
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
            ("--batch", Some(v)) => batch = v.max(2),
            _ => {
                eprintln!("usage: ingest_bench [cluster] [--requests N] [--seconds S] [--connections C] [--wide-connections C] [--devices D] [--big-devices D] [--batch B]");
                std::process::exit(2);
            }
        }
    }
    (s, batch)
}

fn parent(args: &[String]) {
    let (s, batch) = parse_settings(
        args,
        Settings {
            requests: 300_000,
            seconds: 15,
            connections: 64,
            wide_connections: 256,
            devices: 10_000,
            big_devices: 1_000_000,
            batch: 1,
        },
    );
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
    let batched = Settings {
        batch,
        requests: s.requests / batch,
        ..s
    };
    let recv_batched = measure(&rt, child.id(), addr, &batched, s.devices, "recv-batch");
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
    let events_per_second = recv_batched.rps() * batch as f64;
    println!(
        "batches of {batch} ({} connections): {:.0} requests/s = {:.0} events/s, {:.1} server µs per event, p99 {} ms per batch; {:.2}x the single-request receiver's events/s, {:.2}x the baseline's requests/s",
        s.connections,
        recv_batched.rps(),
        events_per_second,
        recv_batched.cpu_us_per_request() / batch as f64,
        ms(recv_batched.p99),
        events_per_second / recv.rps(),
        events_per_second / base.rps(),
    );
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

/// `ingest_bench cluster`: ingest and fan-out with 1, 2 and 3 receivers on one private
/// PostgreSQL (fsync on, `synchronous_commit` on: the defaults) against the SQLite single
/// node and the bare hyper baseline, the same load generator spreading its connections
/// over the nodes. Also what decides how far a real cluster scales, since here the nodes,
/// the database and the load generator share 2 CPUs: database transactions, WAL fsyncs
/// and server CPU (nodes + PostgreSQL) per notification.
mod cluster {
    use super::*;
    use dovepush_receiver::config::{PostgresConfig, Secret, SslMode};
    use dovepush_receiver::store::postgres::PgStore;
    use dovepush_testkit::postgres::{self, Postgres};

    const ADMIN: &str = "bench-admin-token-0123456789";

    /// One row of the table.
    struct Row {
        name: String,
        load: LoadResult,
        pushes: u64,
        /// PostgreSQL transactions and WAL fsyncs during the run and until the outbox was
        /// empty again.
        db: Option<(u64, u64, u64)>,
        /// Of the server CPU, PostgreSQL's.
        db_cpu: Duration,
    }

    pub fn main(args: &[String]) {
        let (s, _) = parse_settings(
            args,
            Settings {
                requests: 100_000,
                seconds: 10,
                connections: 64,
                wide_connections: 0,
                devices: 10_000,
                big_devices: 0,
                batch: 1,
            },
        );
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let mut rows = Vec::new();

        eprintln!("baseline: bare hyper …");
        let (child, addr) = spawn_child(&["child-baseline"]);
        let base = measure(&rt, child.id(), addr, &s, s.devices, "base");
        stop_child(child);
        rows.push(Row {
            name: "bare hyper 200 (baseline)".into(),
            load: base,
            pushes: 0,
            db: None,
            db_cpu: Duration::ZERO,
        });

        eprintln!("SQLite, one node: seeding {} devices …", s.devices);
        let store = dir.path().join("sqlite/store.sqlite");
        std::fs::create_dir_all(store.parent().unwrap()).unwrap();
        seed_store(&store, s.devices);
        let config = write_config(store.parent().unwrap(), &store);
        let (child, addr) = spawn_child(&["child-receiver", config.to_str().unwrap()]);
        let sent_before = rt.block_on(pushes_sent(&[addr]));
        let load = measure(&rt, child.id(), addr, &s, s.devices, "sqlite");
        let pushes = rt.block_on(pushes_sent(&[addr])) - sent_before;
        stop_child(child);
        rows.push(Row {
            name: "receiver, SQLite, 1 node".into(),
            load,
            pushes,
            db: None,
            db_cpu: Duration::ZERO,
        });

        eprintln!("starting a private PostgreSQL (fsync on) …");
        // DOVEPUSH_BENCH_STATEMENTS=1: also print where PostgreSQL's time went, per
        // statement (pg_stat_statements, part of Debian's postgresql package).
        let statements = std::env::var_os("DOVEPUSH_BENCH_STATEMENTS").is_some();
        let pg = Postgres::start_with(postgres::Options {
            fsync: true,
            settings: if statements {
                vec![(
                    "shared_preload_libraries".into(),
                    "pg_stat_statements".into(),
                )]
            } else {
                Vec::new()
            },
            ..Default::default()
        })
        .expect("a private PostgreSQL");
        for nodes in 1..=3 {
            eprintln!(
                "PostgreSQL, {nodes} node(s): seeding {} devices …",
                s.devices
            );
            let db = format!("bench{nodes}");
            pg.create_database(&db).unwrap();
            let store = PostgresConfig {
                url: pg.url(&db),
                password: Some(Secret::new(postgres::PASSWORD)),
                sslmode: SslMode::Disable,
                ca_file: None,
                pool_size: 16,
                lease: Duration::from_secs(30),
            };
            rt.block_on(PgStore::migrate(&store)).unwrap();
            pg.psql(
                &db,
                &format!(
                    "INSERT INTO devices (login, app, token, transport, mailboxes, privacy,
                         created_at, updated_at)
                     SELECT 'user' || i, 'mail', lpad(to_hex(i), 64, '0'),
                         CASE WHEN i % 2 = 0 THEN 'apns' ELSE 'fcm' END, '[\"INBOX\"]', 'full',
                         1700000000000, 1700000000000
                     FROM generate_series(0, {}) i",
                    s.devices - 1
                ),
            )
            .unwrap();
            pg.psql(&db, "VACUUM ANALYZE").unwrap();
            if statements {
                pg.psql(&db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                    .unwrap();
                pg.psql(&db, "SELECT pg_stat_statements_reset()").unwrap();
            }
            let node_dir = dir.path().join(format!("pg{nodes}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let config = write_pg_config(&node_dir, &pg, &db);
            let children: Vec<(Child, SocketAddr)> = (0..nodes)
                .map(|_| spawn_child(&["child-receiver", config.to_str().unwrap()]))
                .collect();
            let addrs: Vec<SocketAddr> = children.iter().map(|(_, a)| *a).collect();
            let pids: Vec<u32> = children.iter().map(|(c, _)| c.id()).collect();
            let stats_before = db_stats(&pg, &db);
            let cpu_before = cpu_of(&pids, &pg);
            let db_cpu_before = cpu_of(&[], &pg);
            let sent_before = rt.block_on(pushes_sent(&addrs));
            let mut load = rt.block_on(super::load(&addrs, &s, s.devices, &db));
            let pushes = rt.block_on(pushes_sent(&addrs)) - sent_before;
            load.server_cpu = cpu_of(&pids, &pg).saturating_sub(cpu_before);
            let db_cpu = cpu_of(&[], &pg).saturating_sub(db_cpu_before);
            rt.block_on(settle(&addrs));
            // PostgreSQL publishes its counters within a second of a transaction.
            std::thread::sleep(Duration::from_millis(1500));
            let stats_after = db_stats(&pg, &db);
            if statements {
                eprintln!("{nodes} node(s): statements by total time (calls, total ms, mean µs):");
                eprintln!(
                    "{}",
                    pg.psql(
                        &db,
                        "SELECT calls || ' | ' || round(total_exec_time) || ' | '
                             || round(mean_exec_time * 1000) || ' | '
                             || left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
                         FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12"
                    )
                    .unwrap_or_default()
                );
            }
            for (child, _) in children {
                stop_child(child);
            }
            rows.push(Row {
                name: format!("receiver, PostgreSQL, {nodes} node(s)"),
                load,
                pushes,
                db: Some((
                    stats_after.0.saturating_sub(stats_before.0),
                    stats_after.1.saturating_sub(stats_before.1),
                    stats_after.2.saturating_sub(stats_before.2),
                )),
                db_cpu,
            });
        }

        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
        println!();
        println!(
            "ingest and fan-out: ≤{} requests, ≤{} s per run, {} connections, {} devices (one per user), loopback, {} CPUs shared by the load generator, the nodes and PostgreSQL (fsync on)",
            s.requests,
            s.seconds,
            s.connections,
            s.devices,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        println!();
        println!("| server | requests | failed | req/s | p50 ms | p99 ms | pushes/s | server CPU µs/req | of which PostgreSQL | DB transactions/notification | WAL fsyncs/notification | WAL KiB/notification |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            let per = |n: u64| n as f64 / r.load.ok.max(1) as f64;
            let (tx, fsync, wal) = match r.db {
                Some((tx, fsync, bytes)) => (
                    format!("{:.2}", per(tx)),
                    format!("{:.3}", per(fsync)),
                    format!("{:.1}", per(bytes) / 1024.0),
                ),
                None => ("–".into(), "–".into(), "–".into()),
            };
            println!(
                "| {} | {} | {} | {:.0} | {} | {} | {:.0} | {:.1} | {} | {tx} | {fsync} | {wal} |",
                r.name,
                r.load.ok,
                r.load.failed,
                r.load.rps(),
                ms(r.load.p50),
                ms(r.load.p99),
                r.pushes as f64 / r.load.elapsed.as_secs_f64(),
                r.load.cpu_us_per_request(),
                if r.db.is_some() {
                    format!(
                        "{:.1}",
                        r.db_cpu.as_secs_f64() * 1e6 / r.load.ok.max(1) as f64
                    )
                } else {
                    "–".into()
                },
            );
        }
        println!();
        println!("(server CPU: the receiver process(es), plus PostgreSQL's for its rows)");
    }

    fn write_pg_config(dir: &Path, pg: &Postgres, db: &str) -> std::path::PathBuf {
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
token = "{ADMIN}"
[store]
url = "{}"
password_file = "{}"
sslmode = "disable"
pool_size = 16
[[apps]]
id = "mail"
"#,
                pg.url(db),
                pg.password_file().display()
            ),
        )
        .unwrap();
        path
    }

    /// (committed transactions of `db`, WAL syncs and bytes of the server).
    fn db_stats(pg: &Postgres, db: &str) -> (u64, u64, u64) {
        let out = pg
            .psql(
                "postgres",
                &format!(
                    "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}')
                         || ' ' || (SELECT wal_sync || ' ' || wal_bytes FROM pg_stat_wal)"
                ),
            )
            .unwrap();
        let mut it = out.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    }

    /// CPU time of `pids` and of PostgreSQL (the postmaster and its children).
    fn cpu_of(pids: &[u32], pg: &Postgres) -> Duration {
        let postmaster: u32 = std::fs::read_to_string(pg.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .unwrap_or(0);
        let mut total: Duration = pids.iter().map(|p| procfs::cpu_time(*p)).sum();
        total += procfs::cpu_time(postmaster);
        for stat in procfs::all() {
            if stat.ppid() == Some(postmaster) {
                total += procfs::cpu_time(stat.pid);
            }
        }
        total
    }

    async fn get_metrics(addr: SocketAddr) -> String {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .uri("/metrics")
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Pushes sent so far by the nodes at `addrs`.
    async fn pushes_sent(addrs: &[SocketAddr]) -> u64 {
        let mut total = 0;
        for addr in addrs {
            let text = get_metrics(*addr).await;
            total += text
                .lines()
                .filter(|l| l.starts_with("dovepush_push_sent_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        total
    }

    /// Waits (bounded) until the outbox is empty.
    async fn settle(addrs: &[SocketAddr]) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if get_metrics(addrs[0])
                .await
                .contains("dovepush_outbox_depth 0\n")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("the outbox did not empty within 120 s");
    }
}
