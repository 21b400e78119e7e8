//! Shared test support: a receiver on port 0 with injected test doubles (mail server,
//! transports), and a tiny HTTP/1.1 client.
#![allow(dead_code)]

pub mod child;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use dovepush_push::{Device, DeviceKind, Notification, Outcome, Transport};
use dovepush_receiver::config::Config;
use dovepush_receiver::domain::resync::{SubscriptionDirectory, UserValues};
use dovepush_receiver::mailserver::{MailCredential, MailError, MailServer, SubscriptionChange};
use dovepush_receiver::transport::Transports;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const NOTIFY_USER: &str = "dovecot";
pub const NOTIFY_PASSWORD: &str = "notify-secret";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";
pub const NOTIFY_PATH: &str = "/preliminary/http-notify/v1/notify";

/// A receiver config for tests, with a store in `dir`.
pub fn config_text(dir: &Path, extra: &str) -> String {
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
path = "{}"
[outbox]
retry_initial_seconds = 1
coalesce_milliseconds = 0
[devices]
# Tests log in wrongly on purpose: no throttling unless a test asks for it.
max_failed_logins = 1000
failure_delay_milliseconds = 0
[[apps]]
id = "mail"
{extra}
"#,
        dir.join("store.sqlite").display()
    )
}

pub fn config(dir: &Path, extra: &str) -> Config {
    Config::parse(&config_text(dir, extra), &dir.join("receiver.toml")).expect("test config")
}

/// Which store a test's receiver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    /// A database of its own on the test binary's private PostgreSQL.
    Postgres,
}

/// A config `text` (from [`config_text`]) whose `[dovecot]` section logs in to a private
/// Dovecot's plain IMAP port.
pub fn with_dovecot_imap(text: &str, imap_port: u16) -> String {
    text.replace(
        "[outbox]",
        &format!("[dovecot]\nimap = \"127.0.0.1:{imap_port}\"\ntls = \"none\"\n[outbox]"),
    )
}

/// [`config_text`] with the store on `backend`. The PostgreSQL database is made at the
/// first call for `dir` and named in a file there, so a receiver restarted with the same
/// `dir` finds its data again.
pub fn config_text_on(dir: &Path, extra: &str, backend: Backend) -> String {
    let text = config_text(dir, extra);
    match backend {
        Backend::Sqlite => text,
        Backend::Postgres => {
            let pg = dovepush_testkit::postgres::shared();
            let name_file = dir.join("pg-database");
            let db = match std::fs::read_to_string(&name_file) {
                Ok(db) => db,
                Err(_) => {
                    let db = pg.fresh_database("receiver").expect("a test database");
                    std::fs::write(&name_file, &db).unwrap();
                    db
                }
            };
            text.replace(
                &format!("path = \"{}\"", dir.join("store.sqlite").display()),
                &format!(
                    "url = \"{}\"\npassword_file = \"{}\"\nsslmode = \"disable\"\npool_size = 4",
                    pg.url(&db),
                    pg.password_file().display()
                ),
            )
        }
    }
}

/// The event ids committed in the store of the receiver configured with `dir`.
pub fn committed_event_ids(dir: &Path, backend: Backend) -> std::collections::HashSet<String> {
    match backend {
        Backend::Sqlite => {
            dovepush_receiver::store::sqlite::inspect::event_ids(&dir.join("store.sqlite")).unwrap()
        }
        Backend::Postgres => {
            let db = std::fs::read_to_string(dir.join("pg-database")).unwrap();
            dovepush_testkit::postgres::shared()
                .psql(
                    &db,
                    "SELECT event_id FROM events WHERE event_id IS NOT NULL",
                )
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }
}

/// [`config`] with the store on `backend`.
pub fn config_on(dir: &Path, extra: &str, backend: Backend) -> Config {
    Config::parse(
        &config_text_on(dir, extra, backend),
        &dir.join("receiver.toml"),
    )
    .expect("test config")
}

/// One `#[tokio::test]` per store for each `async fn name(backend: Backend)` named:
/// `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! on_both_stores {
    (multi_thread; $($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}

/// A mail server that knows fixed users and records subscription changes.
#[derive(Default)]
pub struct FakeMail {
    pub users: HashMap<String, String>,
    pub changes: Mutex<Vec<(String, SubscriptionChange)>>,
    pub logins: Mutex<u32>,
}

impl FakeMail {
    pub fn with_users(users: &[(&str, &str)]) -> Arc<Self> {
        Arc::new(Self {
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            ..Default::default()
        })
    }
}

impl MailServer for FakeMail {
    fn login<'a>(
        &'a self,
        login: &'a str,
        credential: &'a MailCredential,
        change: SubscriptionChange,
        _client: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            *self.logins.lock().unwrap() += 1;
            if self.users.get(login).map(String::as_str) != Some(credential.secret()) {
                return Err(MailError::Rejected);
            }
            if change != SubscriptionChange::Keep {
                self.changes
                    .lock()
                    .unwrap()
                    .push((login.to_owned(), change));
            }
            Ok(())
        })
    }

    fn clear_subscription_as_master<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            self.changes
                .lock()
                .unwrap()
                .push((user.to_owned(), SubscriptionChange::Clear));
            Ok(())
        })
    }
}

/// The fake's users' subscriptions, as a directory that knows none (no drift).
impl SubscriptionDirectory for FakeMail {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn get<'a>(&'a self, _user: &'a str) -> BoxFuture<'a, Result<Option<String>, MailError>> {
        Box::pin(async { Ok(None) })
    }
    fn set<'a>(
        &'a self,
        _user: &'a str,
        _value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async { Ok(()) })
    }
    fn list_all(&self) -> BoxFuture<'_, Result<Option<UserValues>, MailError>> {
        Box::pin(async { Ok(None) })
    }
}

/// One push as a test transport saw it: the device's and the notification's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub app: String,
    pub transport: DeviceKind,
    pub token: String,
    pub user: String,
    pub event_id: Option<String>,
    pub folder: String,
    pub uid: u32,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub unseen: Option<u32>,
    pub coalesced: u32,
    pub badge_only: bool,
}

impl Push {
    fn of(device: &Device, n: &Notification) -> Self {
        Self {
            app: device.app_id.clone(),
            transport: device.kind,
            token: device.token.clone(),
            user: n.user.clone(),
            event_id: n.event_id.clone(),
            folder: n.folder.clone(),
            uid: n.uid,
            from: n.from.clone(),
            subject: n.subject.clone(),
            unseen: n.unseen,
            coalesced: n.coalesced,
            badge_only: n.badge_only,
        }
    }
}

/// A transport that records pushes and answers with scripted outcomes (then `Delivered`).
#[derive(Default)]
pub struct RecordingTransport {
    pub pushes: Mutex<Vec<Push>>,
    pub script: Mutex<VecDeque<Outcome>>,
    pub default: Mutex<Option<Outcome>>,
}

impl RecordingTransport {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn always(outcome: Outcome) -> Arc<Self> {
        let t = Self::default();
        *t.default.lock().unwrap() = Some(outcome);
        Arc::new(t)
    }
    pub fn pushes(&self) -> Vec<Push> {
        self.pushes.lock().unwrap().clone()
    }
}

impl Transport for RecordingTransport {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            self.pushes
                .lock()
                .unwrap()
                .push(Push::of(device, notification));
            if let Some(o) = self.script.lock().unwrap().pop_front() {
                return o;
            }
            self.default
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Outcome::Delivered { id: None })
        })
    }
}

/// A receiver running in this process.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub store_path: PathBuf,
}

impl Running {
    pub async fn start(config: Config, transports: Transports, mail: Arc<dyn MailServer>) -> Self {
        let directory = dovepush_receiver::directory::from_config(&config.dovecot).unwrap();
        Self::start_with_directory(config, transports, mail, directory).await
    }

    /// With this directory behind `/v1/status/drift` instead of the configured one.
    pub async fn start_with_directory(
        config: Config,
        transports: Transports,
        mail: Arc<dyn MailServer>,
        directory: Option<Arc<dyn SubscriptionDirectory>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store_path = config
            .store
            .sqlite_path()
            .map(PathBuf::from)
            .unwrap_or_default();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            dovepush_receiver::run_with_directory(
                listener,
                config,
                transports,
                mail,
                directory,
                async {
                    let _ = rx.await;
                },
            )
            .await
            .expect("receiver runs");
        });
        Running {
            addr,
            stop: Some(stop),
            task: Some(task),
            store_path,
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

pub fn notify_auth() -> String {
    basic(NOTIFY_USER, NOTIFY_PASSWORD)
}

pub fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// An ox notification body.
/// `GET path` with the admin bearer token (status, metrics).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[("authorization", &bearer())], "").await
}

pub fn notification(user: &str, uid: u32, unseen: u32) -> String {
    serde_json::json!({
        "user": user,
        "event": "messageNew",
        "folder": "INBOX",
        "imap-uidvalidity": 1655200000u32,
        "imap-uid": uid,
        "from": "Alice <alice@example.org>",
        "subject": format!("Message {uid}"),
        "snippet": "Hello",
        "unseen": unseen,
    })
    .to_string()
}

/// Sends a notification; returns the status.
pub async fn notify(
    addr: SocketAddr,
    user: &str,
    uid: u32,
    unseen: u32,
    event_id: Option<&str>,
) -> Reply {
    let auth = notify_auth();
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(id) = event_id {
        headers.push(("x-dovepush-event-id", id));
    }
    request(
        addr,
        "PUT",
        NOTIFY_PATH,
        &headers,
        notification(user, uid, unseen),
    )
    .await
}

/// Sends a badge event (`messageRead`, `messageExpunge`, `messageAppend`) for `user`'s
/// INBOX as the plugin in imap does, with its commit time if given; returns the reply.
pub async fn notify_badge(
    addr: SocketAddr,
    user: &str,
    event: &str,
    unseen: u32,
    time_ms: Option<u64>,
    event_id: &str,
) -> Reply {
    let mut body = serde_json::json!({
        "user": user,
        "event": event,
        "folder": "INBOX",
        "imap-uidvalidity": 1655200000u32,
        "imap-uid": 9,
        "unseen": unseen,
    });
    if let Some(at) = time_ms {
        body["event-time-ms"] = at.into();
    }
    let auth = notify_auth();
    request(
        addr,
        "PUT",
        NOTIFY_PATH,
        &[
            ("authorization", auth.as_str()),
            ("x-dovepush-event-id", event_id),
        ],
        body.to_string(),
    )
    .await
}

/// Registers a device as `user`.
pub async fn register(addr: SocketAddr, user: &str, password: &str, token: &str) -> Reply {
    let auth = basic(user, password);
    request(
        addr,
        "PUT",
        "/v1/devices",
        &[("authorization", auth.as_str())],
        format!(r#"{{"app":"mail","transport":"apns","token":"{token}"}}"#),
    )
    .await
}

/// Waits until `check` holds (bounded).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the receiver's metrics show every one of `lines` (whole lines, with their
/// newline) and its outbox is empty: for events sent by a process the test does not wait
/// on (the sender service sends to its endpoints concurrently).
pub async fn settled_showing(addr: SocketAddr, lines: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = admin_get(addr, "/metrics").await.text();
        if m.contains("dovepush_outbox_depth 0\n") && lines.iter().all(|l| m.contains(l)) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {lines:?} and an empty outbox:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the receiver's outbox is empty (`dovepush_outbox_depth 0`): every push it
/// had to send has been sent and its outcome recorded, so nothing more is pushed until the
/// next event. Returns the metrics text. (Sleeping a while would only make that likely.)
pub async fn outbox_settled(addr: SocketAddr) -> String {
    settled_showing(addr, &[]).await
}

/// A mock APNs (HTTP/2 + TLS, checking provider tokens) and the `[[apps]]` keys of app
/// `mail` pointing at it; its CA and the provider key are written into `dir`.
pub async fn mock_apns_app(dir: &Path) -> (dovepush_mocks::MockApns, String) {
    let pki = dovepush_mocks::TestPki::new();
    pki.write_ca(&dir.join("ca.pem")).unwrap();
    let key = dovepush_mocks::ProviderKey::generate("TEAMAAAAAA", "KEYAAAAAAA");
    std::fs::write(dir.join("AuthKey.p8"), &key.p8_pem).unwrap();
    let apns = dovepush_mocks::MockApns::start(&pki, std::slice::from_ref(&key))
        .await
        .unwrap();
    let app = format!(
        "privacy = \"full\"\n[apps.apns]\ntopic = \"com.example.mail\"\nteam_id = \"{}\"\n\
         key_id = \"{}\"\nkey_file = \"AuthKey.p8\"\nendpoint = \"{}\"\nca_file = \"ca.pem\"\n",
        key.team_id,
        key.key_id,
        apns.url()
    );
    (apns, app)
}
