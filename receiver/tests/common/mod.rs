//! Shared test support: a receiver on port 0 with injected test doubles (mail server,
//! transports), and a tiny HTTP/1.1 client.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use dovepush_receiver::config::Config;
use dovepush_receiver::mailserver::{MailError, MailServer, SubscriptionChange};
use dovepush_receiver::store::BoxFuture;
use dovepush_receiver::transport::{Outcome, Push, SendFuture, Transport, Transports};
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
        password: &'a str,
        change: SubscriptionChange,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            *self.logins.lock().unwrap() += 1;
            if self.users.get(login).map(String::as_str) != Some(password) {
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
    fn send<'a>(&'a self, push: &'a Push) -> SendFuture<'a> {
        Box::pin(async move {
            self.pushes.lock().unwrap().push(push.clone());
            if let Some(o) = self.script.lock().unwrap().pop_front() {
                return o;
            }
            self.default
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Outcome::Delivered)
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store_path = config.store.path.clone();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            dovepush_receiver::run_with(listener, config, transports, mail, async {
                let _ = rx.await;
            })
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
