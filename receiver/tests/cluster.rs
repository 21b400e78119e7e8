//! Several receivers on one PostgreSQL (a private server from `dovepush-testkit`), as
//! real processes pushing to the mock APNs:
//!
//! * three nodes: a device registered through node A (a real IMAP login to a private
//!   Dovecot) is listed by node B; 2000 notifications spread over the three nodes reach
//!   the mock APNs, one push per device per event or coalesced, none lost, none twice;
//! * SIGKILL of one node mid-load: every notification any node answered 200 is pushed,
//!   the dead node's items by the others once its lease ran out;
//! * the database restarted under load: the nodes answer 503 (never 200) while it is
//!   down, reconnect by themselves and lose nothing they acknowledged.

// Signals go out through libc: every unsafe block says why it is sound.
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dovepush_mocks::{MockApns, ProviderKey, TestPki};
use dovepush_push::{DeviceKind, Privacy};
use dovepush_receiver::config::{PostgresConfig, Secret, SslMode};
use dovepush_receiver::domain::device::DeviceRegistration;
use dovepush_receiver::domain::store::Store;
use dovepush_receiver::store::postgres::PgStore;
use dovepush_testkit::postgres::{self, Postgres};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// How long a node's lease lasts in these tests.
const LEASE_SECONDS: u64 = 3;

/// The mock APNs, a database, and the config files of the nodes.
struct Cluster {
    dir: tempfile::TempDir,
    apns: MockApns,
    url: String,
    password_file: PathBuf,
    nodes: Vec<Node>,
}

/// One receiver process.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    async fn new(pg: &Postgres, db: &str, imap_port: Option<u16>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new();
        pki.write_ca(&dir.path().join("ca.pem")).unwrap();
        let key = ProviderKey::generate("TEAMAAAAAA", "KEYAAAAAAA");
        std::fs::write(dir.path().join("AuthKey.p8"), &key.p8_pem).unwrap();
        let apns = MockApns::start(&pki, std::slice::from_ref(&key))
            .await
            .unwrap();
        let url = pg.url(db);
        let cluster = Cluster {
            apns,
            url,
            password_file: pg.password_file(),
            nodes: Vec::new(),
            dir,
        };
        std::fs::write(
            cluster.dir.path().join("node.toml"),
            cluster.config_text(&key, imap_port),
        )
        .unwrap();
        cluster
    }

    fn config_text(&self, key: &ProviderKey, imap_port: Option<u16>) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[notify]
username = "{NOTIFY_USER}"
password = "{NOTIFY_PASSWORD}"
[admin]
token = "{ADMIN_TOKEN}"
[store]
url = "{url}"
password_file = "{password}"
sslmode = "disable"
pool_size = 8
lease_seconds = {LEASE_SECONDS}
[dovecot]
imap = "127.0.0.1:{imap}"
[outbox]
retry_initial_seconds = 1
coalesce_milliseconds = 0
concurrency = 16
[[apps]]
id = "mail"
privacy = "full"
[apps.apns]
topic = "com.example.mail"
team_id = "{team}"
key_id = "{key_id}"
key_file = "AuthKey.p8"
endpoint = "{endpoint}"
ca_file = "ca.pem"
request_timeout_secs = 10
"#,
            url = self.url,
            password = self.password_file.display(),
            imap = imap_port.unwrap_or(1),
            team = key.team_id,
            key_id = key.key_id,
            endpoint = self.apns.url(),
        )
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("node.toml")
    }

    /// Starts one more node; returns its index.
    fn start_node(&mut self) -> usize {
        let i = self.nodes.len();
        let log = self.dir.path().join(format!("node{i}.log"));
        self.nodes.push(spawn_receiver(&self.config_path(), &log));
        i
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| {
                let log = self.dir.path().join(format!("node{i}.log"));
                format!(
                    "--- node {i} ---\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect()
    }

    fn store_config(&self) -> PostgresConfig {
        PostgresConfig {
            url: self.url.clone(),
            password: Some(Secret::new(postgres::PASSWORD)),
            sslmode: SslMode::Disable,
            ca_file: None,
            pool_size: 4,
            lease: Duration::from_secs(LEASE_SECONDS),
        }
    }

    /// One device per user `u0`…, straight into the store.
    async fn seed_devices(&self, users: usize) {
        let config = self.store_config();
        PgStore::migrate(&config).await.unwrap();
        let store = PgStore::open_existing(&config).await.unwrap();
        for n in 0..users {
            store
                .register_device(
                    DeviceRegistration {
                        user: format!("u{n}"),
                        app: "mail".into(),
                        transport: DeviceKind::Apns,
                        token: format!("{n:064x}"),
                        mailboxes: vec!["INBOX".into()],
                        privacy: Privacy::Full,
                    },
                    dovepush_receiver::domain::now_millis(),
                )
                .await
                .unwrap();
        }
    }

    /// The pushes the mock saw: (token, event id, uid).
    fn pushes(&self) -> Vec<(String, String, u64)> {
        self.apns
            .requests()
            .iter()
            .map(|r| {
                let body = r.json();
                (
                    r.device_token.clone(),
                    body["dovepush"]["event_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    body["dovepush"]["uid"].as_u64().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Waits until every node reports an empty outbox (read from the database).
    async fn settled(&self) {
        for addr in self.addrs() {
            outbox_settled(addr).await;
        }
    }
}

fn spawn_receiver(config: &Path, log: &Path) -> Node {
    let (child, addr) = common::child::spawn_receiver_logging(config, log, "info");
    Node { child, addr }
}

/// The value of a counter in a metrics text.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The sum of a counter over the nodes at `addrs`.
async fn total(addrs: &[SocketAddr], name: &str) -> u64 {
    let mut sum = 0;
    for addr in addrs {
        sum += counter(&admin_get(*addr, "/metrics").await.text(), name);
    }
    sum
}

/// One notification: `(event id, user, uid)`.
type Job = (String, String, u32);

/// What a load run saw.
#[derive(Default)]
struct Answers {
    /// Event ids answered 200.
    acked: Vec<String>,
    /// Jobs not answered 200 (to send again).
    failed: Vec<Job>,
    /// Status codes other than 200, counted.
    statuses: BTreeMap<u16, usize>,
}

/// Sends `jobs` over `per_node` keep-alive connections to each of `addrs`; a connection
/// that breaks stops (its job counts as failed).
async fn load(addrs: &[SocketAddr], jobs: Vec<Job>, per_node: usize) -> Answers {
    load_counting(addrs, jobs, per_node, Arc::default()).await
}

/// [`load`], counting the answers 200 in `acked` as they come.
async fn load_counting(
    addrs: &[SocketAddr],
    jobs: Vec<Job>,
    per_node: usize,
    acked: Arc<AtomicUsize>,
) -> Answers {
    let next = Arc::new(AtomicUsize::new(0));
    let jobs = Arc::new(jobs);
    let answers = Arc::new(Mutex::new(Answers::default()));
    let mut workers = Vec::new();
    for addr in addrs {
        for _ in 0..per_node {
            let (next, jobs, answers, addr) = (next.clone(), jobs.clone(), answers.clone(), *addr);
            let acked = acked.clone();
            workers.push(tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                        .await
                else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let auth = notify_auth();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { return };
                    let (id, user, uid) = job.clone();
                    let req = hyper::Request::builder()
                        .method("PUT")
                        .uri(NOTIFY_PATH)
                        .header("host", "localhost")
                        .header("authorization", &auth)
                        .header("x-dovepush-event-id", &id)
                        .body(Full::new(Bytes::from(notification(&user, uid, uid))))
                        .unwrap();
                    let status = match sender.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match resp.into_body().collect().await {
                                Ok(body) if status == 200 => {
                                    assert_eq!(&body.to_bytes()[..], br#"{"success":true}"#);
                                    Some(200)
                                }
                                Ok(_) => Some(status),
                                Err(_) => None,
                            }
                        }
                        Err(_) => None,
                    };
                    let mut a = answers.lock().unwrap();
                    match status {
                        Some(200) => {
                            a.acked.push(id);
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            if let Some(s) = other {
                                *a.statuses.entry(s).or_default() += 1;
                            }
                            a.failed.push(job.clone());
                        }
                    }
                    if status.is_none() {
                        // This node is gone: the job counted as failed, the worker stops.
                        return;
                    }
                }
            }));
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let mut answers = std::mem::take(&mut *answers.lock().unwrap());
    // Jobs no worker reached (every connection to a node broke) failed too.
    let reached = next.load(Ordering::Relaxed).min(jobs.len());
    answers.failed.extend(jobs[reached..].iter().cloned());
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_devices_and_push_every_event_once() {
    const USERS: usize = 200;
    const ROUNDS: u32 = 10;
    let pg = postgres::shared();
    let db = pg.fresh_database("cluster").unwrap();
    let dovecot = tokio::task::spawn_blocking(|| {
        dovepush_testkit::dovecot::Dovecot::start(Default::default())
    })
    .await
    .unwrap()
    .expect("private dovecot");
    let mut c = Cluster::new(pg, &db, Some(dovecot.imap_port)).await;
    c.seed_devices(USERS).await;
    // A coalescing window: a user's next events, through any node, fold into the item
    // that waits.
    let text = std::fs::read_to_string(c.config_path()).unwrap();
    std::fs::write(
        c.config_path(),
        text.replace("coalesce_milliseconds = 0", "coalesce_milliseconds = 300"),
    )
    .unwrap();
    for _ in 0..3 {
        c.start_node();
    }
    let [a, b, node_c] = c.addrs()[..] else {
        unreachable!()
    };

    // Registered through A (a real IMAP login, METADATA set), listed by B.
    let reply = register(a, "alice", "alice-secret", "alice-token").await;
    assert_eq!(reply.status, 201, "{}\n{}", reply.text(), c.logs());
    assert_eq!(
        dovecot.subscription("alice").unwrap().as_deref(),
        Some("user=alice")
    );
    let auth = basic("alice", "alice-secret");
    let listed = request(b, "GET", "/v1/devices", &[("authorization", &auth)], "").await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json()["devices"][0]["token"], "alice-token");
    let status = admin_get(node_c, "/v1/status/subscriptions?user=alice").await;
    assert_eq!(status.json()[0]["devices"][0]["app"], "mail");

    // 2000 notifications: round r is event r of every user, spread over the three nodes
    // (each user's events in order, so the newest content is the last event's).
    for round in 1..=ROUNDS {
        let jobs: Vec<Job> = (0..USERS)
            .map(|n| (format!("ev-{n}-{round}"), format!("u{n}"), round))
            .collect();
        let answers = load(&c.addrs(), jobs, 4).await;
        assert_eq!(
            answers.acked.len(),
            USERS,
            "round {round}: {:?}",
            answers.statuses
        );
    }
    c.settled().await;
    let addrs = c.addrs();
    assert_eq!(total(&addrs, "dovepush_ingested_total").await, 2000);
    let queued = total(&addrs, "dovepush_outbox_queued_total").await;
    let coalesced = total(&addrs, "dovepush_outbox_coalesced_total").await;
    assert_eq!(queued + coalesced, 2000, "every event queued or coalesced");
    let pushes = c.pushes();
    assert_eq!(
        pushes.len() as u64,
        queued,
        "one push per queued item:\n{}",
        c.logs()
    );
    let ids: HashSet<&String> = pushes.iter().map(|p| &p.1).collect();
    assert_eq!(ids.len(), pushes.len(), "no event pushed twice");
    // Each device's last push carries its last event.
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (token, _, uid) in &pushes {
        let e = newest.entry(token.as_str()).or_default();
        *e = (*e).max(*uid);
    }
    assert_eq!(newest.len(), USERS);
    assert!(newest.values().all(|uid| *uid == u64::from(ROUNDS)));
    // Every node reads the same depth from the database.
    for addr in addrs {
        assert!(admin_get(addr, "/metrics")
            .await
            .text()
            .contains("dovepush_outbox_depth 0\n"));
    }
    eprintln!("2000 events: {queued} pushes, {coalesced} coalesced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_acknowledged_events_are_pushed_by_the_others() {
    const EVENTS: usize = 2000;
    const KILL_AFTER: usize = 600;
    let pg = postgres::shared();
    let db = pg.fresh_database("cluster").unwrap();
    let mut c = Cluster::new(pg, &db, None).await;
    c.seed_devices(EVENTS).await;
    // Slow answers keep pushes in flight on every node when one dies.
    c.apns.set_delay(Duration::from_millis(20));
    for _ in 0..3 {
        c.start_node();
    }
    let addrs = c.addrs();
    let victim = c.nodes[1].child.id() as libc::pid_t;
    let jobs: Vec<Job> = (0..EVENTS)
        .map(|n| (format!("ev-{n}"), format!("u{n}"), 1))
        .collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let loading = tokio::spawn({
        let (addrs, acked) = (addrs.clone(), acked.clone());
        async move { load_counting(&addrs, jobs, 4, acked).await }
    });
    let killer = {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let n = acked.load(Ordering::Relaxed);
                if n >= KILL_AFTER || std::time::Instant::now() > deadline {
                    // SAFETY: plain FFI call sending a signal to our own child process.
                    unsafe { libc::kill(victim, libc::SIGKILL) };
                    return (std::time::Instant::now(), n);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (killed_at, acked_at_kill) = killer.await.unwrap();
    let first = loading.await.unwrap();
    assert!(
        acked_at_kill < EVENTS / 2,
        "the kill came after {acked_at_kill} of {EVENTS} acknowledged: not a mid-load kill"
    );
    // What was not acknowledged goes again to the living nodes (as the sender service's
    // spool would replay it).
    let living = [addrs[0], addrs[2]];
    let again = load(&living, first.failed.clone(), 4).await;
    assert!(again.failed.is_empty(), "{:?}", again.statuses);
    // Everything is pushed, the dead node's items after its lease.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let pushed: HashSet<String> = c.pushes().into_iter().map(|p| p.1).collect();
            if pushed.len() >= EVENTS {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not every event was pushed:\n{}", c.logs()));
    for addr in living {
        outbox_settled(addr).await;
    }
    let pushes = c.pushes();
    let pushed: HashSet<&String> = pushes.iter().map(|p| &p.1).collect();
    let lost: Vec<_> = first
        .acked
        .iter()
        .chain(&again.acked)
        .filter(|id| !pushed.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but never pushed: {lost:?}");
    // Twice only what the dead node had pushed without recording the provider's answer
    // (in flight, or answered and not yet recorded): the first push of every event pushed
    // twice went over one of its connections (those that carried nothing from a second
    // after the kill, when requests it had written were surely in; the living nodes
    // pushed on: its items after the lease of 3 s), the second over another node's.
    let requests = c.apns.requests();
    let mut last_use: HashMap<u64, std::time::Instant> = HashMap::new();
    for r in &requests {
        let at = last_use.entry(r.connection).or_insert(r.received);
        *at = (*at).max(r.received);
    }
    let dead: HashSet<u64> = last_use
        .iter()
        .filter(|(_, at)| **at < killed_at + Duration::from_secs(1))
        .map(|(conn, _)| *conn)
        .collect();
    let mut by_event: HashMap<String, Vec<u64>> = HashMap::new();
    for r in &requests {
        let id = r.json()["dovepush"]["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        by_event.entry(id).or_default().push(r.connection);
    }
    let twice: Vec<_> = by_event.iter().filter(|(_, c)| c.len() > 1).collect();
    for (id, conns) in &twice {
        assert!(
            conns.len() == 2 && dead.contains(&conns[0]) && !dead.contains(&conns[1]),
            "{id} pushed over connections {conns:?} (the dead node's: {dead:?})"
        );
    }
    let twice = twice.len();
    eprintln!(
        "killed a node after {acked_at_kill} of {EVENTS} acknowledged; {} acknowledged in \
         all, {} sent again; {twice} pushed twice",
        first.acked.len(),
        first.failed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_gives_503_then_nothing_acknowledged_is_lost() {
    const EVENTS: usize = 1500;
    // A server of its own: this test stops it.
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    pg.create_database("restart").unwrap();
    let mut c = Cluster::new(&pg, "restart", None).await;
    c.seed_devices(EVENTS).await;
    c.start_node();
    c.start_node();
    let addrs = c.addrs();
    let jobs: Vec<Job> = (0..EVENTS)
        .map(|n| (format!("ev-{n}"), format!("u{n}"), 1))
        .collect();
    // Send in slices, restarting the database during the third one.
    let mut acked = Vec::new();
    let mut pending: Vec<Job> = Vec::new();
    let mut saw_503 = 0;
    let pg = Arc::new(Mutex::new(pg));
    for (i, slice) in jobs.chunks(250).enumerate() {
        let restart = (i == 2).then(|| {
            let pg = pg.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let mut pg = pg.lock().unwrap();
                pg.stop();
                std::thread::sleep(Duration::from_secs(2));
                pg.restart().unwrap();
            })
        });
        let answers = load(&addrs, slice.to_vec(), 4).await;
        acked.extend(answers.acked);
        pending.extend(answers.failed);
        saw_503 += answers.statuses.get(&503).copied().unwrap_or(0);
        assert!(
            answers.statuses.keys().all(|s| *s == 503),
            "only 503 while the database is away: {:?}",
            answers.statuses
        );
        if let Some(r) = restart {
            r.join().unwrap();
        }
    }
    // Replayed until accepted, as the sender service does; the nodes reconnect alone.
    for _ in 0..20 {
        if pending.is_empty() {
            break;
        }
        let answers = load(&addrs, std::mem::take(&mut pending), 4).await;
        acked.extend(answers.acked);
        pending = answers.failed;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(pending.is_empty(), "never accepted: {}", pending.len());
    assert!(saw_503 > 0, "the outage was not seen");
    for addr in &addrs {
        outbox_settled(*addr).await;
    }
    let pushed: HashSet<String> = c.pushes().into_iter().map(|p| p.1).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !pushed.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged but never pushed: {lost:?}");
    assert_eq!(pushed.len(), EVENTS);
    eprintln!("database restarted under load: {saw_503} answers 503, all {EVENTS} pushed");
    drop(c);
}
