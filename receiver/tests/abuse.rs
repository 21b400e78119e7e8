//! The receiver as an attacker meets it: guessing passwords and tokens is throttled per
//! client address and user (without reaching Dovecot), proxies are believed only when
//! trusted, and silent, half-sent and idle connections are cut so that they cannot keep
//! others out.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use dovepush_receiver::transport::Transports;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A config with login throttling switched on (the shared test config switches it off)
/// and the test's own address trusted as a proxy.
fn throttled_config(dir: &std::path::Path) -> dovepush_receiver::config::Config {
    let text = config_text(dir, "")
        .replace(
            "max_failed_logins = 1000\nfailure_delay_milliseconds = 0",
            "max_failed_logins = 4\nfailure_delay_milliseconds = 60000\nlock_seconds = 600",
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1\"]",
        );
    dovepush_receiver::config::Config::parse(&text, &dir.join("receiver.toml")).unwrap()
}

fn from(client: &str) -> (&'static str, &str) {
    ("x-forwarded-for", client)
}

#[tokio::test]
async fn guessing_is_throttled_per_address_and_user_and_never_reaches_dovecot() {
    let dir = tempfile::tempdir().unwrap();
    let mail = FakeMail::with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let r = Running::start(
        throttled_config(dir.path()),
        Transports::new(),
        mail.clone(),
    )
    .await;
    let guess = basic("alice", "guess");
    let attacker = from("192.0.2.66");
    let devices = |auth: &str, who: (&'static str, &str)| {
        let auth = auth.to_string();
        let who = (who.0, who.1.to_string());
        async move {
            request(
                r.addr,
                "GET",
                "/v1/devices",
                &[("authorization", &auth), (who.0, &who.1)],
                "",
            )
            .await
        }
    };
    // The first failure is free; after the second the next must wait a minute.
    assert_eq!(devices(&guess, attacker).await.status, 401);
    assert_eq!(devices(&guess, attacker).await.status, 401);
    let refused = devices(&guess, attacker).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.headers["retry-after"], "60");
    assert_eq!(
        refused.json()["error"],
        "too many failed logins: try again later"
    );
    assert_eq!(
        *mail.logins.lock().unwrap(),
        2,
        "the refused guess reached nobody"
    );
    // Another user from another address is not slowed down.
    let bob = devices(&basic("bob", "bob-pw"), from("192.0.2.7")).await;
    assert_eq!(bob.status, 200, "{}", bob.text());
    // alice herself, from elsewhere, waits too: her name is the one being guessed.
    assert_eq!(
        devices(&basic("alice", "alice-pw"), from("192.0.2.8"))
            .await
            .status,
        429
    );
    // The attacker's address is refused whatever it tries, the notify endpoint included.
    let notify = request(
        r.addr,
        "PUT",
        NOTIFY_PATH,
        &[("authorization", &notify_auth()), attacker],
        notification("bob", 1, 1),
    )
    .await;
    assert_eq!(notify.status, 429);

    // Wrong notify passwords and admin tokens are throttled by address alike, while
    // Dovecot's real sender (another address) goes on.
    let wrong = basic(NOTIFY_USER, "wrong");
    let prober = from("198.51.100.9");
    for expected in [401, 401, 429] {
        let reply = request(
            r.addr,
            "PUT",
            NOTIFY_PATH,
            &[("authorization", &wrong), prober],
            notification("bob", 1, 1),
        )
        .await;
        assert_eq!(reply.status, expected);
    }
    let sender = request(
        r.addr,
        "PUT",
        NOTIFY_PATH,
        &[("authorization", &notify_auth()), from("198.51.100.10")],
        notification("bob", 2, 1),
    )
    .await;
    assert_eq!(sender.status, 200);
    for expected in [401, 401, 429] {
        let reply = request(
            r.addr,
            "GET",
            "/metrics",
            &[("authorization", "Bearer wrong-token"), from("203.0.113.5")],
            "",
        )
        .await;
        assert_eq!(reply.status, expected);
    }
    let m = request(
        r.addr,
        "GET",
        "/metrics",
        &[("authorization", &bearer()), from("203.0.113.6")],
        "",
    )
    .await
    .text();
    assert!(m.contains("dovepush_login_throttled_total 5\n"), "{m}");
    r.stop().await;
}

/// A request over a connection from `source` (a loopback address of our choosing).
async fn request_from(source: &str, addr: SocketAddr, headers: &str) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /v1/devices HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{headers}\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let mail = FakeMail::with_users(&[("alice", "alice-pw")]);
    let r = Running::start(throttled_config(dir.path()), Transports::new(), mail).await;
    let guess = format!("authorization: {}\r\n", basic("mallory", "x"));
    // 127.0.0.2 is not a trusted proxy: its X-Forwarded-For is ignored, so a fresh
    // header on each try does not reset its count.
    for (i, expected) in ["401", "401", "429"].iter().enumerate() {
        let headers = format!("{guess}x-forwarded-for: 192.0.2.{}\r\n", 100 + i);
        let answer = request_from("127.0.0.2", r.addr, &headers).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {expected}")),
            "{answer}"
        );
    }
    r.stop().await;
}

/// Whether the server closed `stream` within `within` (reads until EOF, discarding).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

fn impatient_config(dir: &std::path::Path) -> dovepush_receiver::config::Config {
    let text = config_text(dir, "").replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nheader_read_timeout_seconds = 1\nidle_timeout_seconds = 2\nmax_connections = 4",
    );
    dovepush_receiver::config::Config::parse(&text, &dir.join("receiver.toml")).unwrap()
}

#[tokio::test]
async fn silent_half_sent_and_idle_connections_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mail = FakeMail::with_users(&[]);
    let r = Running::start(impatient_config(dir.path()), Transports::new(), mail).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(r.addr).await.unwrap();
    let mut half = TcpStream::connect(r.addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(r.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 17];
    idle.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
    for (name, stream) in [
        ("silent", &mut silent),
        ("half-sent", &mut half),
        ("idle", &mut idle),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(5)).await,
            "the {name} connection stayed open"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    r.stop().await;
}

#[tokio::test]
async fn at_the_connection_limit_new_clients_wait_and_are_then_served() {
    let dir = tempfile::tempdir().unwrap();
    let mail = FakeMail::with_users(&[]);
    let r = Running::start(impatient_config(dir.path()), Transports::new(), mail).await;
    // Four silent connections take every slot.
    let mut hogs = Vec::new();
    for _ in 0..4 {
        hogs.push(TcpStream::connect(r.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let health = request(r.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(health.status, 200);
    // Served once the silent ones were cut (header timeout 1 s), not never.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let m = admin_get(r.addr, "/metrics").await.text();
    assert!(m.contains("dovepush_connections_limited_total 1\n"), "{m}");
    drop(hogs);
    r.stop().await;
}
