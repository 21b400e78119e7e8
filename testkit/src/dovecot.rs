//! A private, real Dovecot for tests: the system's 2.3, or 2.4.1 in a Debian 13 root.
//!
//! Everything lives in a temp dir: config, base and state dirs, log, mail homes, and a
//! private module dir holding links to the system modules the test loads plus the
//! freshly built dovepush plugin. With the plugin, the config also runs the freshly built
//! sender service (`service dovepush`, as `conf.d/90-dovepush.conf` declares it) as its
//! own system user. It listens on free loopback ports (LMTP, IMAP) and is stopped (and
//! waited for) on drop. Mail is owned by a system user created on first use (tests run as
//! root, as Dovecot requires to switch to the mail user).
//!
//! With [`Options::debian13`] the same happens with Dovecot 2.4.1 inside the Debian 13
//! root of [`crate::debian13`]: the temp dir is made in the root's `/tmp` (the config
//! names paths as Dovecot sees them there, [`Dovecot::inner`]), users are the root's,
//! the config is written in 2.4's syntax (`plugin_settings` become global settings,
//! `delivery_plugins` a `mail_plugins { … }` block), the settings module is installed in
//! the root's `$moduledir/settings`, and Dovecot's programs run there with `chroot`. The
//! methods are the same for both, so 2.4 tests read like the 2.3 ones.
//!
//! See `../shared/reference/private-dovecot.md` for the traps this avoids.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::debian13::Debian13;
use crate::free_port;
use crate::lmtp::LmtpClient;

/// The system user that owns test mail.
pub const MAIL_USER: &str = "dovepush-test";
/// The system user the test sender service runs as (the package's is `dovepush`).
pub const SENDER_USER: &str = "dovepush-test-sender";
/// A local user with no business with mail, for hostile tests.
pub const STRANGER_USER: &str = "dovepush-test-stranger";
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
    /// Plugins for `protocol imap` (dovepush's badge events: `notify dovepush`).
    pub imap_plugins: String,
    /// Lines for the `plugin {}` section.
    pub plugin_settings: Vec<(String, String)>,
    /// The built plugin to install as `lib20_dovepush_plugin.so`, if any.
    pub dovepush_module: Option<PathBuf>,
    /// The built sender service to run as `service dovepush`; with the plugin, the one
    /// built next to it unless set.
    pub dovepush_sender: Option<PathBuf>,
    /// `maildir:~/Maildir` by default.
    pub mail_location: String,
    /// Extra top-level config lines (in the syntax of the Dovecot that runs).
    pub extra_config: String,
    /// An `oauth2` passdb validating this issuer's JWTs locally (the user is the `email`
    /// claim; `aud` must be the issuer's audience), for `AUTHENTICATE OAUTHBEARER` and
    /// `XOAUTH2`, in front of the password passdb.
    pub oauth2: Option<crate::oauth::Issuer>,
    /// Run Dovecot 2.4.1 in this Debian 13 root (see [`crate::debian13`]) instead of the
    /// system's Dovecot; `plugin_settings` are then global settings.
    pub debian13: Option<&'static Debian13>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            users: vec![
                ("alice".into(), "alice-secret".into()),
                ("bob".into(), "bob-secret".into()),
            ],
            delivery_plugins: String::new(),
            imap_plugins: String::new(),
            plugin_settings: Vec::new(),
            dovepush_module: None,
            dovepush_sender: None,
            mail_location: "maildir:~/Maildir".into(),
            extra_config: String::new(),
            oauth2: None,
            debian13: None,
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
    debian13: Option<&'static Debian13>,
}

/// The uid and gid of the test mail user, created if missing.
pub fn mail_user() -> io::Result<(u32, u32)> {
    system_user(MAIL_USER)
}

/// The uid and gid of system user `name` (with a group of its own), created if missing.
pub fn system_user(name: &str) -> io::Result<(u32, u32)> {
    system_user_in(None, name)
}

/// [`system_user`] of the Debian 13 root, or of this system (`None`).
pub fn system_user_in(debian13: Option<&Debian13>, name: &str) -> io::Result<(u32, u32)> {
    // useradd locks /etc/passwd: one at a time within a test process.
    static USERADD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let passwd = match debian13 {
        Some(d) => d.root.join("etc/passwd"),
        None => PathBuf::from("/etc/passwd"),
    };
    if let Some(ids) = lookup_user(&passwd, name) {
        return Ok(ids);
    }
    let _one = USERADD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ids) = lookup_user(&passwd, name) {
        return Ok(ids);
    }
    let mut useradd = match debian13 {
        Some(d) => {
            let mut command = Command::new("chroot");
            command.arg(&d.root).arg("useradd");
            command
        }
        None => Command::new("useradd"),
    };
    let status = useradd
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()?;
    if !status.success() && lookup_user(&passwd, name).is_none() {
        return Err(io::Error::other(format!(
            "useradd {name} failed (tests must run as root)"
        )));
    }
    lookup_user(&passwd, name).ok_or_else(|| io::Error::other("useradd gave no user"))
}

fn lookup_user(passwd: &Path, name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string(passwd).ok()?;
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
        let d13 = options.debian13;
        let (uid, gid) = system_user_in(d13, MAIL_USER)?;
        let dir = match d13 {
            // In the root's /tmp, or in TMPDIR when that is inside the root (benchmarks
            // mount a fresh file system there).
            Some(d) => tempfile::Builder::new()
                .prefix("dovepush-dovecot24-")
                .tempdir_in(
                    Some(std::env::temp_dir())
                        .filter(|t| t.starts_with(&d.root))
                        .unwrap_or_else(|| d.root.join("tmp")),
                )?,
            None => tempfile::Builder::new()
                .prefix("dovepush-dovecot-")
                .tempdir()?,
        };
        let root = dir.path();
        // The instance dir as Dovecot sees it (inside the Debian 13 root: under its /tmp).
        let inner_root = match d13 {
            Some(d) => Path::new("/").join(root.strip_prefix(&d.root).expect("in the root")),
            None => root.to_path_buf(),
        };
        if let Some(d) = d13 {
            d.install_settings_module()?;
        }
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
        // The sender service lays out its spool (drop/, queue/, quarantine/) at start.
        let spool = root.join("spool");
        fs::create_dir_all(&spool)?;
        let sender = match (&options.dovepush_sender, &options.dovepush_module) {
            (Some(sender), _) => Some(sender.clone()),
            (None, Some(_)) => Some(match d13 {
                Some(d) => d.sender.clone(),
                None => built_sender(),
            }),
            (None, None) => None,
        };
        // Inside the root, Dovecot runs a copy in the instance dir.
        let sender = match (sender, d13) {
            (Some(built), Some(_)) => {
                let copy = root.join("dovepush-sender");
                fs::copy(&built, &copy)?;
                Some(inner_root.join("dovepush-sender"))
            }
            (sender, _) => sender,
        };
        let service = match &sender {
            None => String::new(),
            Some(sender) => {
                system_user_in(d13, SENDER_USER)?;
                format!(
                    r#"service dovepush {{
  executable = {sender}
  user = {SENDER_USER}
  process_limit = 1
  process_min_avail = 1
  unix_listener dovepush {{
    mode = 0660
    user = {SENDER_USER}
    group = {MAIL_USER}
  }}
}}
"#,
                    sender = sender.display()
                )
            }
        };

        let lmtp_port = free_port();
        let imap_port = free_port();
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let mut settings = options.plugin_settings.clone();
        // With the dovepush plugin, its spool goes into the temp dir unless the caller
        // chose one.
        if options.dovepush_module.is_some()
            && !settings.iter().any(|(key, _)| key == "dovepush_spool_dir")
        {
            settings.push((
                "dovepush_spool_dir".into(),
                inner_root.join("spool").display().to_string(),
            ));
        }
        let (mechanisms, oauth2_passdb) = match (&options.oauth2, d13) {
            (None, _) => ("plain login", String::new()),
            (Some(_), Some(_)) => {
                return Err(io::Error::other(
                    "the oauth2 option is for Dovecot 2.3 only",
                ));
            }
            (Some(issuer), None) => {
                let settings = issuer.write_dovecot_files(root, "email")?;
                (
                    "plain login oauthbearer xoauth2",
                    format!(
                        "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
                        settings.display()
                    ),
                )
            }
        };
        let ids = Ids { uid, gid, n };
        let ports = (lmtp_port, imap_port);
        let config = match d13 {
            Some(_) => config_24(&inner_root, &options, &settings, ids, ports, &service),
            None => config_23(
                &inner_root,
                &options,
                &settings,
                ids,
                ports,
                &service,
                (mechanisms, &oauth2_passdb),
            ),
        };
        let config_path = root.join("dovecot.conf");
        fs::write(&config_path, config)?;
        let mut dovecot = Dovecot {
            dir,
            lmtp_port,
            imap_port,
            config: config_path,
            running: false,
            debian13: d13,
        };
        dovecot.launch()?;
        Ok(dovecot)
    }

    fn launch(&mut self) -> io::Result<()> {
        // Never hand Dovecot a pipe: its children keep stdio open forever.
        let status = self
            .command("dovecot")
            .arg("-c")
            .arg(self.inner(&self.config))
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

    /// The Debian 13 root this instance runs in (Dovecot 2.4), if any.
    pub fn debian13(&self) -> Option<&'static Debian13> {
        self.debian13
    }

    /// `path` (under [`Dovecot::path`]) as Dovecot sees it: inside the Debian 13 root,
    /// without the root's prefix.
    pub fn inner(&self, path: &Path) -> PathBuf {
        match self.debian13 {
            Some(d) => Path::new("/").join(path.strip_prefix(&d.root).unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }

    /// A command for one of Dovecot's programs (`dovecot`, `doveadm`, `doveconf`, the
    /// full path of `dovecot-lda`), run inside the Debian 13 root when there is one.
    pub fn command(&self, program: &str) -> Command {
        match self.debian13 {
            Some(d) => d.command(program),
            None => Command::new(program),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The dovepush spool inside the temp dir (`drop/`, `queue/`, `quarantine/`).
    pub fn spool_dir(&self) -> PathBuf {
        self.path().join("spool")
    }

    /// The records waiting in the sender service's own queue (`spool/queue`).
    pub fn queued_files(&self) -> Vec<PathBuf> {
        spool_files(&self.spool_dir().join("queue"))
    }

    /// The master's pid, while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        fs::read_to_string(self.path().join("run").join("master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The pid of this instance's sender service, if it runs.
    pub fn sender_pid(&self) -> Option<u32> {
        // The master passes the config socket (2.3: CONFIG_FILE, 2.4: CONFIG_FILE_SOCKET).
        let socket = self.inner(&self.path().join("run/config"));
        let ours = [
            format!("CONFIG_FILE={}", socket.display()),
            format!("CONFIG_FILE_SOCKET={}", socket.display()),
        ];
        crate::procfs::all()
            .into_iter()
            .filter(|p| p.comm == "dovepush-sender")
            .map(|p| p.pid)
            .find(|pid| {
                crate::procfs::environ(*pid)
                    .iter()
                    .any(|e| ours.contains(e))
            })
    }

    /// Wait up to `timeout` for the sender service to run; its pid.
    pub fn wait_for_sender(&self, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = self.sender_pid() {
                return Some(pid);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
        self.command("doveadm")
            .arg("-c")
            .arg(self.inner(&self.config))
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
        let mut child = self
            .command(LDA)
            .arg("-c")
            .arg(self.inner(&self.config))
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
        let master = self.master_pid();
        let _ = self.doveadm(&["stop"]);
        let pid_file = self.path().join("run").join("master.pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        while pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // doveadm could not stop it (a broken instance: its file system gone read-only,
        // say): no test leaves a Dovecot behind.
        if let Some(pid) = master.filter(|pid| crate::procfs::stat(*pid).is_some()) {
            for signal in ["-TERM", "-KILL"] {
                let _ = Command::new("kill")
                    .args([signal, &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while crate::procfs::stat(pid).is_some() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
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

/// Numbers a config needs: the mail user's ids and the instance's number.
#[derive(Clone, Copy)]
struct Ids {
    uid: u32,
    gid: u32,
    n: usize,
}

/// The Dovecot 2.3 config: `settings` go into `plugin {}`.
fn config_23(
    root: &Path,
    options: &Options,
    settings: &[(String, String)],
    Ids { uid, gid, n }: Ids,
    (lmtp_port, imap_port): (u16, u16),
    service: &str,
    (mechanisms, oauth2_passdb): (&str, &str),
) -> String {
    let r = root.display();
    let mut plugin = String::new();
    for (key, value) in settings {
        plugin.push_str(&format!("  {key} = {value}\n"));
    }
    format!(
        r#"# Private Dovecot for dovepush tests (generated).
base_dir = {r}/run
state_dir = {r}/state
instance_name = dovepush-test-{pid}-{n}
log_path = {r}/dovecot.log
listen = 127.0.0.1
protocols = imap lmtp
ssl = no
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
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
{oauth2_passdb}passdb {{
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
  mail_plugins = $mail_plugins {imap_plugins}
}}
plugin {{
{plugin}}}
{extra}
{service}"#,
        pid = std::process::id(),
        mail_location = options.mail_location,
        plugins = options.delivery_plugins,
        imap_plugins = options.imap_plugins,
        extra = options.extra_config,
    )
}

/// The Dovecot 2.4 config (2.4.1 syntax): `settings` are global settings, the delivery
/// plugins a `mail_plugins { … }` block; LMTP names users `alice@example.com` while
/// their passwd-file entry is `alice`, as with 2.3's `username_format=%n`.
fn config_24(
    root: &Path,
    options: &Options,
    settings: &[(String, String)],
    Ids { uid, gid, n }: Ids,
    (lmtp_port, imap_port): (u16, u16),
    service: &str,
) -> String {
    let r = root.display();
    let mut global = String::new();
    for (key, value) in settings {
        global.push_str(&format!("{key} = {value}\n"));
    }
    let mut plugins = String::new();
    for plugin in options.delivery_plugins.split_whitespace() {
        plugins.push_str(&format!("    {plugin} = yes\n"));
    }
    let mut imap_plugins = String::new();
    for plugin in options.imap_plugins.split_whitespace() {
        imap_plugins.push_str(&format!("    {plugin} = yes\n"));
    }
    let (driver, path) = options
        .mail_location
        .split_once(':')
        .unwrap_or((options.mail_location.as_str(), ""));
    format!(
        r#"# Private Dovecot 2.4 for dovepush tests (generated).
dovecot_config_version = 2.4.1
dovecot_storage_version = 2.4.1
base_dir = {r}/run
state_dir = {r}/state
instance_name = dovepush-test24-{pid}-{n}
log_path = {r}/dovecot.log
listen = 127.0.0.1
protocols = imap lmtp
ssl = no
auth_allow_cleartext = yes
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_home = {r}/home/%{{user | username}}
mail_driver = {driver}
mail_path = {path}
mail_plugin_dir = {r}/modules
mail_attribute {{
  dict file {{
    path = %{{home}}/dovecot-attributes
  }}
}}
namespace inbox {{
  inbox = yes
}}
passdb passwd-file {{
  passwd_file_path = {r}/users
  auth_username_format = %{{user | username}}
}}
userdb passwd-file {{
  passwd_file_path = {r}/users
  auth_username_format = %{{user | username}}
}}
service imap-login {{
  inet_listener imap {{
    listen = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    listen = 127.0.0.1
    port = {lmtp_port}
  }}
}}
imap_metadata = yes
protocol lmtp {{
  mail_plugins {{
{plugins}  }}
}}
protocol lda {{
  mail_plugins {{
{plugins}  }}
}}
protocol imap {{
  mail_plugins {{
{imap_plugins}  }}
}}
{global}{extra}
{service}"#,
        pid = std::process::id(),
        extra = options.extra_config,
    )
}

/// `target/<profile>/` of the running test or bench binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// The dovepush plugin built next to the running test binary (`target/<profile>/`).
pub fn built_plugin() -> PathBuf {
    let plugin = profile_dir().join("libdovepush_plugin.so");
    assert!(
        plugin.exists(),
        "{} is missing: build it first (`cargo build --workspace`)",
        plugin.display()
    );
    plugin
}

/// The sender service built next to the running test binary (`target/<profile>/`).
pub fn built_sender() -> PathBuf {
    let sender = profile_dir().join("dovepush-sender");
    assert!(
        sender.exists(),
        "{} is missing: build it first (`cargo build --workspace`)",
        sender.display()
    );
    sender
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
