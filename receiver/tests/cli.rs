//! The operator CLI: config checking (exit 64, every bad key with its file), the
//! subscriptions listing and the queue commands, run as the real binary.

mod common;

use std::process::{Command, Output};

use common::*;
use dovepush_push::{DeviceKind, Privacy};
use dovepush_receiver::domain::device::DeviceRegistration;
use dovepush_receiver::domain::event::NewMailEvent;
use dovepush_receiver::domain::store::Store;
use dovepush_receiver::store::sqlite::SqliteStore;

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dovepush-receiver"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bad_config_exits_64_naming_every_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "localhost"
tls_cert = "/x.pem"
[notify]
username = "dovecot"
[admin]
token = "short"
[dovecot]
tls = "maybe"
colour = "red"
"#,
    )
    .unwrap();
    for command in ["check-config", "serve"] {
        let out = cli(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{command}");
        let err = text(&out.stderr);
        for key in [
            "server.listen",
            "server.tls_key",
            "notify.password",
            "admin.token",
            "dovecot.tls",
            "dovecot.colour",
        ] {
            assert!(
                err.contains(&format!("{}: `{key}`", path.display())),
                "{key} missing in:\n{err}"
            );
        }
    }
    let missing = cli(&["check-config", "--config", "/nonexistent/receiver.toml"]);
    assert_eq!(missing.status.code(), Some(64));
    assert!(text(&missing.stderr).contains("/nonexistent/receiver.toml"));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, config_text(dir.path(), "")).unwrap();
    let out = cli(&["check-config", "--config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK"));
}

#[test]
fn unreadable_tls_and_ca_files_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let path = dir.path().join("receiver.toml");
    let config = config_text(dir.path(), "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{0}\"\ntls_key = \"{0}\"",
            not_pem.display()
        ),
    )
        + "[dovecot]\nimap = \"127.0.0.1:143\"\ntls = \"implicit\"\nca_file = \"missing-ca.pem\"\n";
    std::fs::write(&path, config).unwrap();
    for command in ["check-config", "serve"] {
        let out = cli(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{command}");
        let err = text(&out.stderr);
        for key in ["server.tls_cert", "dovecot.ca_file"] {
            assert!(
                err.contains(&format!("{}: `{key}`", path.display())),
                "{command}: {key} missing in:\n{err}"
            );
        }
        // serve says nothing about listening before it has checked them.
        assert!(!text(&out.stdout).contains("listening"), "{command}");
    }
}

#[test]
fn push_app_keys_are_checked_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dovepush_mocks::ProviderKey::generate("TEAMAAAAAA", "KEYAAAAAAA");
    let apps = "privacy = \"full\"\n[apps.apns]\ntopic = \"com.example.mail\"\n\
                team_id = \"TEAMAAAAAA\"\nkey_id = \"KEYAAAAAAA\"\nkey_file = \"keys/AuthKey.p8\"\n\
                [apps.fcm]\nservice_account_file = \"firebase.json\"\nendpoint = \"ftp://x\"\n";
    let path = dir.path().join("receiver.toml");
    std::fs::write(&path, config_text(dir.path(), apps)).unwrap();
    for command in ["check-config", "serve"] {
        let out = cli(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{command}");
        let err = text(&out.stderr);
        // Relative paths resolve against the config file's directory.
        assert!(
            err.contains(&format!(
                "{}: `apps[0].apns.key_file`: {}: cannot read",
                path.display(),
                dir.path().join("keys/AuthKey.p8").display()
            )),
            "{err}"
        );
    }
    // With the key in place the next problem is named: the FCM file, then its endpoint.
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/AuthKey.p8"), &key.p8_pem).unwrap();
    let out = cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("`apps[0].fcm.service_account_file`"),
        "{}",
        text(&out.stderr)
    );
    let fcm = serde_json::json!({
        "type": "service_account",
        "project_id": "mock-project",
        "private_key_id": "0123",
        "private_key": dovepush_mocks::TEST_ONLY_SERVICE_ACCOUNT_KEY,
        "client_email": dovepush_mocks::TEST_CLIENT_EMAIL,
        "token_uri": "https://127.0.0.1:9444/token",
    })
    .to_string();
    std::fs::write(dir.path().join("firebase.json"), fcm).unwrap();
    let out = cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("`apps[0].fcm.endpoint`"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        &path,
        config_text(
            dir.path(),
            &apps.replace("ftp://x", "https://127.0.0.1:9444"),
        ),
    )
    .unwrap();
    let out = cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test]
async fn subscriptions_and_queue_commands() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("receiver.toml");
    std::fs::write(&cfg, config_text(dir.path(), "")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    {
        let store = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
        for (user, token) in [
            ("alice", "aaaaaaaaaaaaaaaaaaaaaaaa11"),
            ("bob", "bbbbbbbbbbbbbbbbbbbbbbbb22"),
        ] {
            store
                .register_device(
                    DeviceRegistration {
                        user: user.into(),
                        app: "mail".into(),
                        transport: DeviceKind::Fcm,
                        token: token.into(),
                        mailboxes: vec!["INBOX".into()],
                        privacy: Privacy::Generic,
                    },
                    1_700_000_000_000,
                )
                .await
                .unwrap();
        }
        store
            .ingest(
                NewMailEvent {
                    event_id: Some("e1".into()),
                    kind: dovepush_receiver::domain::event::EventKind::MessageNew,
                    user: "alice".into(),
                    folder: "INBOX".into(),
                    uidvalidity: 1,
                    uid: 1,
                    from: None,
                    subject: None,
                    snippet: None,
                    unseen: Some(1),
                    time_ms: None,
                    received_at: 1_700_000_000_000,
                },
                4_000_000_000_000,
                0,
            )
            .await
            .result
            .unwrap();
    }

    let out = cli(&["subscriptions", "list", "--config", &cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<_> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("USER") && lines[0].contains("PENDING"));
    assert!(
        lines[1].starts_with("alice")
            && lines[1].contains("fcm")
            && lines[1].trim_end().ends_with('1')
    );
    assert!(lines[1].contains("aaaaaa…aaaa11") && !table.contains("aaaaaaaaaaaaaaaaaaaaaaaa11"));
    assert!(lines[1].contains("2023-11-14T22:13:20.000Z"));

    let out = cli(&[
        "subscriptions",
        "list",
        "--config",
        &cfg,
        "--user",
        "bob",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["user"], "bob");
    assert_eq!(v[0]["devices"][0]["privacy"], "generic");
    assert_eq!(v[0]["devices"][0]["pending"], 0);

    let out = cli(&["queue", "list", "--config", &cfg, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q.as_array().unwrap().len(), 1);
    assert_eq!(q[0]["event_id"], "e1");
    assert_eq!(q[0]["state"], "pending");
    let id = q[0]["id"].as_i64().unwrap().to_string();
    let out = cli(&["queue", "list", "--config", &cfg]);
    assert!(text(&out.stdout).lines().nth(1).unwrap().starts_with(&id));

    let out = cli(&["queue", "retry", &id, "--config", &cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let q: serde_json::Value =
        serde_json::from_slice(&cli(&["queue", "list", "--config", &cfg, "--json"]).stdout)
            .unwrap();
    assert!(q[0]["due"].as_str().unwrap() < "2100", "{q}");

    assert!(cli(&["queue", "drop", &id, "--config", &cfg])
        .status
        .success());
    let again = cli(&["queue", "drop", &id, "--config", &cfg]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains(&format!("no item {id}")));
    assert_eq!(
        cli(&["queue", "retry", "999", "--config", &cfg])
            .status
            .code(),
        Some(1)
    );
    let q: serde_json::Value =
        serde_json::from_slice(&cli(&["queue", "list", "--config", &cfg, "--json"]).stdout)
            .unwrap();
    assert!(q.as_array().unwrap().is_empty());

    // A missing store is an error, not a new empty file.
    let other = tempfile::tempdir().unwrap();
    let other_cfg = other.path().join("r.toml");
    std::fs::write(&other_cfg, config_text(other.path(), "")).unwrap();
    let out = cli(&["queue", "list", "--config", other_cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!other.path().join("store.sqlite").exists());
}

#[tokio::test]
async fn migrate_then_copy_a_sqlite_store_into_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("receiver.toml");
    std::fs::write(&config, config_text(dir.path(), "")).unwrap();
    let config = config.to_str().unwrap();
    let out = cli(&["migrate", "--config", config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("schema migrated from version 0 to 3"),
        "{}",
        text(&out.stdout)
    );
    let out = cli(&["migrate", "--config", config]);
    assert!(text(&out.stdout).contains("at version 3 already"));
    {
        let store = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
        store
            .register_device(
                DeviceRegistration {
                    user: "alice".into(),
                    app: "mail".into(),
                    transport: DeviceKind::Apns,
                    token: "tok-a".into(),
                    mailboxes: vec!["INBOX".into()],
                    privacy: Privacy::Full,
                },
                1,
            )
            .await
            .unwrap();
    }
    let pg = dovepush_testkit::postgres::shared();
    let db = pg.fresh_database("cli").unwrap();
    let sqlite = dir.path().join("store.sqlite");
    let password = pg.password_file();
    let copy = |sslmode: &str| {
        cli(&[
            "store",
            "copy",
            "--from",
            sqlite.to_str().unwrap(),
            "--to",
            &pg.url(&db),
            "--password-file",
            password.to_str().unwrap(),
            "--sslmode",
            sslmode,
        ])
    };
    let out = copy("never");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("`store.sslmode`"),
        "{}",
        text(&out.stderr)
    );
    let out = copy("disable");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .starts_with("copied 1 devices, 0 users with a last error and 0 outbox items"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        pg.psql(&db, "SELECT login || ' ' || token FROM devices")
            .unwrap(),
        "alice tok-a"
    );
    // The PostgreSQL store's operator commands see it.
    std::fs::write(
        dir.path().join("pg.toml"),
        config_text(dir.path(), "").replace(
            &format!("path = \"{}\"", sqlite.display()),
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\nsslmode = \"disable\"",
                pg.url(&db),
                password.display()
            ),
        ),
    )
    .unwrap();
    let out = cli(&[
        "subscriptions",
        "list",
        "--json",
        "--config",
        dir.path().join("pg.toml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["user"], "alice");
}

#[test]
fn an_unreadable_database_ca_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("receiver.toml");
    let config = config_text(dir.path(), "").replace(
        &format!("path = \"{}\"", dir.path().join("store.sqlite").display()),
        "url = \"postgresql://dovepush@db.invalid/dovepush\"\nsslmode = \"verify-full\"\nca_file = \"db-ca.pem\"",
    );
    std::fs::write(&path, config).unwrap();
    let out = cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: `store.ca_file`: {}",
            path.display(),
            dir.path().join("db-ca.pem").display()
        )),
        "{err}"
    );
}
