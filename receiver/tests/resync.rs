//! `dovepush-receiver resync` and `GET /v1/status/drift` against a real, private Dovecot,
//! through the doveadm HTTP API and through the IMAP master-user fallback.
//!
//! The registry and Dovecot are made to disagree the three ways they do in the field:
//! alice's METADATA is deleted behind the receiver's back (doveadm), bob has a stray
//! subscription but no device (a push service removed his last one), and carol's device
//! was registered while the receiver's IMAP was down (her device is in the registry, her
//! subscription nowhere). erin is in sync. zed, unknown to the registry, also has a stray
//! subscription: only doveadm, which lists every user, can find him. `resync --dry-run`
//! lists exactly those, `resync` fixes them, a second run finds nothing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use dovepush_push::{DeviceKind, Outcome};
use dovepush_receiver::config::Config;
use dovepush_receiver::transport::Transports;
use dovepush_testkit::dovecot::{Dovecot, Options};
use dovepush_testkit::free_port;
use serde_json::Value;

const API_KEY: &str = "doveadm-api-key-for-tests";
const MASTER: &str = "dovepush-master";
const MASTER_PASSWORD: &str = "master-secret";

/// A Dovecot with a doveadm HTTP listener and a master user.
async fn dovecot(dir: &Path) -> (Dovecot, u16) {
    let doveadm_port = free_port();
    let masters = dir.join("masters");
    std::fs::write(
        &masters,
        format!("{MASTER}:{{PLAIN}}{MASTER_PASSWORD}::::::\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&masters, std::fs::Permissions::from_mode(0o644)).unwrap();
    let options = Options {
        users: ["alice", "bob", "carol", "erin", "zed"]
            .iter()
            .map(|u| (u.to_string(), format!("{u}-secret")))
            .collect(),
        extra_config: format!(
            "doveadm_api_key = {API_KEY}\n\
             service doveadm {{\n  inet_listener http {{\n    address = 127.0.0.1\n    port = {doveadm_port}\n  }}\n}}\n\
             passdb {{\n  driver = passwd-file\n  master = yes\n  args = scheme=PLAIN {}\n}}\n",
            masters.display()
        ),
        ..Options::default()
    };
    let dovecot = tokio::task::spawn_blocking(move || Dovecot::start(options))
        .await
        .unwrap()
        .expect("private dovecot starts");
    (dovecot, doveadm_port)
}

/// Writes the receiver's config (its `[dovecot]` reaching Dovecot through `directory`)
/// and loads it.
fn write_config(dir: &Path, dovecot: &Dovecot, directory: &str) -> Config {
    let text = config_text(dir, "").replace(
        "[outbox]",
        &format!(
            "[dovecot]\nimap = \"127.0.0.1:{}\"\n{directory}\n[outbox]",
            dovecot.imap_port
        ),
    );
    let path = dir.join("receiver.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Registers `user`'s device through a receiver whose mail server is a fake (as if
/// Dovecot's IMAP were down for the METADATA), with `transport` behind it.
async fn registry_with_drift(config: &Config) {
    // bob: a push service removes his only device; the registry remembers him, deviceless.
    let gone = RecordingTransport::always(Outcome::DeleteDevice {
        reason: "Unregistered".into(),
        unregistered_at: None,
    });
    let mail = FakeMail::with_users(&[
        ("alice", "alice-secret"),
        ("bob", "bob-secret"),
        ("carol", "carol-secret"),
        ("erin", "erin-secret"),
    ]);
    let r = Running::start(
        config.clone(),
        Transports::new().with_kind(DeviceKind::Apns, gone),
        mail.clone(),
    )
    .await;
    assert_eq!(
        register(r.addr, "bob", "bob-secret", "tok-bob")
            .await
            .status,
        201
    );
    assert_eq!(notify(r.addr, "bob", 1, 1, Some("b1")).await.status, 200);
    outbox_settled(r.addr).await;
    r.stop().await;
    let r = Running::start(
        config.clone(),
        Transports::new().with_kind(DeviceKind::Apns, RecordingTransport::new()),
        mail,
    )
    .await;
    for user in ["alice", "carol", "erin"] {
        let reply = register(
            r.addr,
            user,
            &format!("{user}-secret"),
            &format!("tok-{user}"),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let subs = admin_get(r.addr, "/v1/status/subscriptions").await.json();
    let bob = subs
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "bob")
        .expect("bob stays known");
    assert_eq!(bob["devices"].as_array().unwrap().len(), 0, "{subs}");
    r.stop().await;
}

/// Dovecot's side: alice's METADATA deleted, bob's and zed's stray, erin's in sync,
/// carol's never set.
fn dovecot_with_drift(dovecot: &Dovecot) {
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    dovecot.set_subscription("alice", None).unwrap();
    dovecot.set_subscription("bob", Some("user=bob")).unwrap();
    dovecot.set_subscription("zed", Some("user=zed")).unwrap();
    dovecot.set_subscription("erin", Some("user=erin")).unwrap();
}

fn resync(config: &Config, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dovepush-receiver"))
        .args(["resync", "--json", "--config"])
        .arg(&config.source)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn listed(report: &Value) -> Vec<(String, String)> {
    report["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["user"].as_str().unwrap().to_owned(),
                d["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(u, a)| (u.to_string(), a.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_through_the_doveadm_http_api() {
    let dir = tempfile::tempdir().unwrap();
    let (dovecot, port) = dovecot(dir.path()).await;
    let config = write_config(
        dir.path(),
        &dovecot,
        &format!(
            "doveadm_url = \"http://127.0.0.1:{port}/doveadm/v1\"\ndoveadm_api_key = \"{API_KEY}\""
        ),
    );
    registry_with_drift(&config).await;
    dovecot_with_drift(&dovecot);
    let expected = pairs(&[
        ("alice", "set"),
        ("bob", "clear"),
        ("carol", "set"),
        ("zed", "clear"),
    ]);

    // The status endpoint of a running receiver sees the same.
    let r = Running::start(config.clone(), Transports::new(), FakeMail::with_users(&[])).await;
    let status = admin_get(r.addr, "/v1/status/drift").await;
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(status.json()["directory"], "doveadm");
    assert_eq!(listed(&status.json()), expected);
    let only = admin_get(r.addr, "/v1/status/drift?user=carol")
        .await
        .json();
    assert_eq!(listed(&only), pairs(&[("carol", "set")]));
    r.stop().await;

    let dry = resync(&config, &["--dry-run"]);
    assert_eq!(listed(&dry), expected, "{dry}");
    assert_eq!(
        dovecot.subscription("alice").unwrap(),
        None,
        "dry run changed nothing"
    );
    let fixed = resync(&config, &[]);
    assert_eq!(listed(&fixed), expected);
    for (user, value) in [
        ("alice", Some("user=alice")),
        ("bob", None),
        ("carol", Some("user=carol")),
        ("erin", Some("user=erin")),
        ("zed", None),
    ] {
        assert_eq!(
            dovecot.subscription(user).unwrap().as_deref(),
            value,
            "{user}"
        );
    }
    assert_eq!(listed(&resync(&config, &["--dry-run"])), Vec::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_through_the_imap_master_user() {
    let dir = tempfile::tempdir().unwrap();
    let (dovecot, _) = dovecot(dir.path()).await;
    let config = write_config(
        dir.path(),
        &dovecot,
        &format!("master_user = \"{MASTER}\"\nmaster_password = \"{MASTER_PASSWORD}\""),
    );
    registry_with_drift(&config).await;
    dovecot_with_drift(&dovecot);
    // Without doveadm, only the registry's users are checked: zed goes unseen.
    let expected = pairs(&[("alice", "set"), ("bob", "clear"), ("carol", "set")]);
    let dry = resync(&config, &["--dry-run"]);
    assert_eq!(dry["directory"], "imap master user");
    assert_eq!(listed(&dry), expected, "{dry}");
    assert_eq!(listed(&resync(&config, &[])), expected);
    for (user, value) in [
        ("alice", Some("user=alice")),
        ("bob", None),
        ("carol", Some("user=carol")),
        ("erin", Some("user=erin")),
        ("zed", Some("user=zed")),
    ] {
        assert_eq!(
            dovecot.subscription(user).unwrap().as_deref(),
            value,
            "{user}"
        );
    }
    assert_eq!(listed(&resync(&config, &["--dry-run"])), Vec::new());
}
