//! The whole dovepush path on one machine, for `./scripts/demo` and the end-to-end
//! latency benchmark: mock APNs and FCM (in this process), a private Dovecot with the
//! plugin (testkit), and the real `dovepush-receiver` binary as a child process,
//! configured the way an operator would (a TOML file). Everything stops on drop.

#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dovepush_mocks::{MockApns, MockFcm, ProviderKey, TempDir, TestPki};
use dovepush_testkit::dovecot::{Dovecot, Options};
use dovepush_testkit::free_port;

pub const APP_ID: &str = "com.example.mail";
pub const NOTIFY_USER: &str = "dovecot";
pub const NOTIFY_PASSWORD: &str = "demo-notify-secret";
pub const ADMIN_TOKEN: &str = "demo-admin-token-0123456789";
pub const USER: &str = "alice";
pub const USER_PASSWORD: &str = "alice-secret";

/// Where the built artifacts are: the directory of the running binary
/// (`target/<profile>/`).
pub fn artifact(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let path = exe.parent().expect("target dir").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p dovepush-plugin -p dovepush-sender -p dovepush-receiver)",
        path.display()
    );
    path
}

/// A minimal HTTP/1.1 exchange on loopback; returns status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(auth) = authorization {
        request.push_str(&format!("Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut rest = String::new();
    reader.read_to_string(&mut rest)?;
    let body = rest.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Mock APNs + FCM, Dovecot with the plugin, and the receiver.
pub struct Stack {
    pub apns: MockApns,
    pub fcm: MockFcm,
    pub dovecot: Dovecot,
    pub receiver_port: u16,
    pub receiver_log: PathBuf,
    receiver: Child,
    pub files: TempDir,
}

impl Stack {
    /// Start everything for `users` (`(login, password)`); `receiver_extra` is appended
    /// to the receiver's TOML.
    pub async fn start(users: &[(String, String)], receiver_extra: &str) -> io::Result<Stack> {
        let files = TempDir::new("demo")?;
        let pki = TestPki::new();
        let key = ProviderKey::generate("TEAMID1234", "KEYID12345");
        let apns = MockApns::start(&pki, std::slice::from_ref(&key)).await?;
        let fcm = MockFcm::start(Some(&pki), "dovepush-demo").await?;
        let ca = files.path().join("ca.pem");
        pki.write_ca(&ca)?;
        files.write("AuthKey_KEYID12345.p8", &key.p8_pem);
        files.write("firebase.json", fcm.service_account_json());
        files.write("notify.secret", NOTIFY_PASSWORD);

        let receiver_port = free_port();
        let dovecot = Dovecot::start(Options {
            users: users.to_vec(),
            delivery_plugins: "notify dovepush".into(),
            dovepush_module: Some(artifact("libdovepush_plugin.so")),
            dovepush_sender: Some(artifact("dovepush-sender")),
            plugin_settings: vec![
                (
                    "dovepush_url".into(),
                    format!(
                        "http://{NOTIFY_USER}:{NOTIFY_PASSWORD}@127.0.0.1:{receiver_port}/preliminary/http-notify/v1/notify"
                    ),
                ),
                ("dovepush_user_from_metadata".into(), "yes".into()),
            ],
            ..Options::default()
        })?;

        let config = format!(
            r#"[server]
listen = "127.0.0.1:{receiver_port}"

[notify]
username = "{NOTIFY_USER}"
password_file = "notify.secret"

[admin]
token = "{ADMIN_TOKEN}"

[store]
path = "receiver.sqlite3"

[dovecot]
imap = "127.0.0.1:{imap}"
tls = "none"

[[apps]]
id = "{APP_ID}"
privacy = "full"
[apps.apns]
topic = "{APP_ID}"
environment = "sandbox"
team_id = "{team}"
key_id = "{key_id}"
key_file = "AuthKey_KEYID12345.p8"
endpoint = "{apns_url}"
ca_file = "ca.pem"
[apps.fcm]
service_account_file = "firebase.json"
endpoint = "{fcm_url}"
ca_file = "ca.pem"
{receiver_extra}
"#,
            imap = dovecot.imap_port,
            team = key.team_id,
            key_id = key.key_id,
            apns_url = apns.url(),
            fcm_url = fcm.url(),
        );
        let config_path = files.write("receiver.toml", config);
        let receiver_log = files.path().join("receiver.log");
        let receiver = Command::new(artifact("dovepush-receiver"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&receiver_log)?)
            .spawn()?;
        let stack = Stack {
            apns,
            fcm,
            dovecot,
            receiver_port,
            receiver_log,
            receiver,
            files,
        };
        stack.wait_for_receiver()?;
        Ok(stack)
    }

    fn wait_for_receiver(&self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http(self.receiver_port, "GET", "/healthz", None, None) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the receiver did not start:\n{}",
                    std::fs::read_to_string(&self.receiver_log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Register an APNs device for `user` with the user's own IMAP password.
    pub fn register_device(
        &self,
        user: &str,
        password: &str,
        token: &str,
    ) -> io::Result<(u16, String)> {
        let body = format!(
            r#"{{"app":"{APP_ID}","transport":"apns","token":"{token}","mailboxes":["INBOX"],"privacy":"full"}}"#
        );
        http(
            self.receiver_port,
            "PUT",
            "/v1/devices",
            Some(&basic(user, password)),
            Some(&body),
        )
    }

    pub fn status(&self) -> io::Result<(u16, String)> {
        http(
            self.receiver_port,
            "GET",
            "/v1/status/subscriptions",
            Some(&format!("Bearer {ADMIN_TOKEN}")),
            None,
        )
    }

    pub fn receiver_log(&self) -> String {
        std::fs::read_to_string(&self.receiver_log).unwrap_or_default()
    }

    pub fn files(&self) -> &Path {
        self.files.path()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SIGTERM: the receiver shuts down cleanly; then make sure it is gone.
        let _ = Command::new("kill")
            .args(["-TERM", &self.receiver.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.receiver.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.receiver.kill();
        let _ = self.receiver.wait();
    }
}
