//! A private, real Dovecot for tests.
//!
//! Everything lives in a temp dir: config, base and state dirs, log, mail homes, and a
//! private module dir holding links to the system modules the test loads plus the
//! freshly built dovepush plugin. It listens on free loopback ports (LMTP, IMAP) and is
//! stopped (and waited for) on drop. Mail is owned by a system user created on first
//! use (tests run as root, as Dovecot requires to switch to the mail user).
//!
//! See `../shared/reference/private-dovecot.md` for the traps this avoids.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::lmtp::LmtpClient;

/// The system user that owns test mail.
pub const MAIL_USER: &str = "dovepush-test";
/// Where Debian's Dovecot keeps its modules and helpers.
pub const SYSTEM_MODULE_DIR: &str = "/usr/lib/dovecot/modules";
pub const LDA: &str = "/usr/lib/dovecot/dovecot-lda";
/// The server METADATA entry the ox driver and dovepush read.
pub const HTTP_NOTIFY_ENTRY: &str = "/private/vendor/vendor.dovecot/http-notify";

static INSTANCES: AtomicUsize = AtomicUsize::new(0);

/// How to set up the private Dovecot.
#[derive(Debug, Clone)]
pub struct Options {
    /// `(login, password)` pairs; logins without a domain (LMTP may add one).
    pub users: Vec<(String, String)>,
    /// Plugins for `protocol lmtp` and `protocol lda`, e.g. `notify dovepush`.
    pub delivery_plugins: String,
    /// Lines for the `plugin {}` section.
    pub plugin_settings: Vec<(String, String)>,
    /// The built plugin to install as `lib20_dovepush_plugin.so`, if any.
    pub dovepush_module: Option<PathBuf>,
    /// `maildir:~/Maildir` by default.
    pub mail_location: String,
    /// Extra top-level config lines.
    pub extra_config: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            users: vec![
                ("alice".into(), "alice-secret".into()),
                ("bob".into(), "bob-secret".into()),
            ],
            delivery_plugins: String::new(),
            plugin_settings: Vec::new(),
            dovepush_module: None,
            mail_location: "maildir:~/Maildir".into(),
            extra_config: String::new(),
        }
    }
}

/// A running private Dovecot.
pub struct Dovecot {
    dir: tempfile::TempDir,
    pub lmtp_port: u16,
    pub imap_port: u16,
    config: PathBuf,
    running: bool,
}

/// The uid and gid of the test mail user, created if missing.
pub fn mail_user() -> io::Result<(u32, u32)> {
    if let Some(ids) = lookup_user(MAIL_USER) {
        return Ok(ids);
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            MAIL_USER,
        ])
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "useradd {MAIL_USER} failed (tests must run as root)"
        )));
    }
    lookup_user(MAIL_USER).ok_or_else(|| io::Error::other("useradd gave no user"))
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl Dovecot {
    pub fn start(options: Options) -> io::Result<Dovecot> {
        let (uid, gid) = mail_user()?;
        let dir = tempfile::Builder::new()
            .prefix("dovepush-dovecot-")
            .tempdir()?;
        let root = dir.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        let modules = root.join("modules");
        fs::create_dir_all(&modules)?;
        for module in [
            "lib15_notify_plugin.so",
            "lib20_push_notification_plugin.so",
        ] {
            symlink(
                Path::new(SYSTEM_MODULE_DIR).join(module),
                modules.join(module),
            )?;
        }
        if let Some(built) = &options.dovepush_module {
            // Copy, as an install would: never map a file the build may rewrite.
            fs::copy(built, modules.join("lib20_dovepush_plugin.so"))?;
        }
        let homes = root.join("home");
        fs::create_dir_all(&homes)?;
        let mut users = String::new();
        for (login, password) in &options.users {
            users.push_str(&format!("{login}:{{PLAIN}}{password}::::::\n"));
            fs::create_dir_all(homes.join(login))?;
        }
        fs::write(root.join("users"), users)?;
        chown_tree(&homes, uid, gid)?;
        let spool = root.join("spool");
        fs::create_dir_all(&spool)?;
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o1777))?;

        let lmtp_port = free_port();
        let imap_port = free_port();
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let r = root.display();
        let mut plugin = String::new();
        for (key, value) in &options.plugin_settings {
            plugin.push_str(&format!("  {key} = {value}\n"));
        }
        // With the dovepush plugin, its spool goes into the temp dir unless the caller
        // chose one.
        if options.dovepush_module.is_some()
            && !options
                .plugin_settings
                .iter()
                .any(|(key, _)| key == "dovepush_spool_dir")
        {
            plugin.push_str(&format!("  dovepush_spool_dir = {}\n", spool.display()));
        }
        let config = format!(
            r#"# Private Dovecot for dovepush tests (generated).
base_dir = {r}/run
state_dir = {r}/state
instance_name = dovepush-test-{pid}-{n}
log_path = {r}/dovecot.log
listen = 127.0.0.1
protocols = imap lmtp
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_home = {r}/home/%n
mail_location = {mail_location}
mail_attribute_dict = file:%h/dovecot-attributes
mail_plugin_dir = {r}/modules
lmtp_rcpt_check_quota = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {r}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {r}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
protocol lmtp {{
  mail_plugins = $mail_plugins {plugins}
}}
protocol lda {{
  mail_plugins = $mail_plugins {plugins}
}}
protocol imap {{
  imap_metadata = yes
}}
plugin {{
{plugin}}}
{extra}
"#,
            pid = std::process::id(),
            mail_location = options.mail_location,
            plugins = options.delivery_plugins,
            extra = options.extra_config,
        );
        let config_path = root.join("dovecot.conf");
        fs::write(&config_path, config)?;
        let mut dovecot = Dovecot {
            dir,
            lmtp_port,
            imap_port,
            config: config_path,
            running: false,
        };
        dovecot.launch()?;
        Ok(dovecot)
    }

    fn launch(&mut self) -> io::Result<()> {
        // Never hand Dovecot a pipe: its children keep stdio open forever.
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.path().join("dovecot.stderr"))?)
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "dovecot did not start: {}\n{}",
                fs::read_to_string(self.path().join("dovecot.stderr")).unwrap_or_default(),
                self.log()
            )));
        }
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(20);
        while LmtpClient::connect(self.lmtp_port).is_err() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "LMTP never answered:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The temp dir holding everything.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// A spool dir inside the temp dir, writable by every uid.
    pub fn spool_dir(&self) -> PathBuf {
        self.path().join("spool")
    }

    /// The Maildir of `login`.
    pub fn maildir(&self, login: &str) -> PathBuf {
        self.path().join("home").join(login).join("Maildir")
    }

    /// The Dovecot log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Run doveadm against this instance.
    pub fn doveadm(&self, args: &[&str]) -> io::Result<Output> {
        Command::new("doveadm")
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Set (or with `None`, unset) the ox subscription METADATA of `login`.
    pub fn set_subscription(&self, login: &str, value: Option<&str>) -> io::Result<()> {
        let mut args = vec!["mailbox", "metadata"];
        match value {
            Some(value) => {
                args.extend(["set", "-u", login, "-s", "", HTTP_NOTIFY_ENTRY, value]);
            }
            None => args.extend(["unset", "-u", login, "-s", "", HTTP_NOTIFY_ENTRY]),
        }
        let out = self.doveadm(&args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "doveadm metadata failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Read the ox subscription METADATA of `login`.
    pub fn subscription(&self, login: &str) -> io::Result<Option<String>> {
        let out = self.doveadm(&[
            "mailbox",
            "metadata",
            "get",
            "-u",
            login,
            "-s",
            "",
            HTTP_NOTIFY_ENTRY,
        ])?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Deliver with `dovecot-lda -d login`; returns its exit status and stderr.
    pub fn deliver_lda(&self, login: &str, message: &[u8]) -> io::Result<(bool, String)> {
        use std::io::Write;
        let mut child = Command::new(LDA)
            .arg("-c")
            .arg(&self.config)
            .args(["-d", login, "-f", "sender@example.net"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(message)?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// A connected LMTP client.
    pub fn lmtp(&self) -> io::Result<LmtpClient> {
        LmtpClient::connect(self.lmtp_port)
    }

    /// Stop the instance and wait until its master is gone.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let _ = self.doveadm(&["stop"]);
        let pid_file = self.path().join("run").join("master.pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        while pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the instance and leave its directory for the caller to remove. Benchmarks use
    /// it: removing a run's thousands of mail files right before the next run makes that
    /// run's file creations slower (ext4 skips recently deleted inodes when it allocates),
    /// which would bias whichever variant runs next.
    pub fn stop_keeping_files(mut self) -> PathBuf {
        self.stop();
        self.dir.disable_cleanup(true);
        self.path().to_owned()
    }

    /// Stop and start again (same config, ports, mail).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.launch()
    }

    /// Kill the idle lmtp processes of this instance (so their plugin `deinit` runs).
    pub fn reload(&self) -> io::Result<()> {
        self.doveadm(&["reload"]).map(|_| ())
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- dovecot log ({}) ---\n{}",
                self.path().display(),
                self.log()
            );
        }
    }
}

/// The dovepush plugin built next to the running test binary (`target/<profile>/`).
pub fn built_plugin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let plugin = profile_dir.join("libdovepush_plugin.so");
    assert!(
        plugin.exists(),
        "{} is missing: build it first (`cargo build -p dovepush-plugin`, or run the tests with `cargo test --workspace`)",
        plugin.display()
    );
    plugin
}

/// The event files in a dovepush spool dir (ignoring temporaries).
pub fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(".json") && !n.starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
