//! Dovecot 2.4.1 for tests, in a Debian 13 (trixie) root.
//!
//! The machines run Debian 12 (Dovecot 2.3). [`get`] makes sure, once per test process,
//! that the cached Debian 13 root exists (`scripts/debian13-root`: debootstrap with
//! Dovecot 2.4 and a C toolchain, a minute or two the first time) and that dovepush is
//! built inside it against Dovecot 2.4 (`scripts/debian13 build`: the plugin, the
//! settings module and the sender service, in `target/debian13/`; up to date in seconds
//! afterwards). A [`crate::dovecot::Dovecot`] started with
//! [`Options::debian13`](crate::dovecot::Options::debian13) then runs in that root with
//! `chroot` (its instance dir lives in the root's `/tmp`; loopback is the host's, so
//! sinks and LMTP clients work as with 2.3).
//!
//! When the root cannot be built here (no debootstrap, no mirror, not root), or
//! `DOVEPUSH_SKIP_DOVECOT24=1`, [`get`] says why and the 2.4 tests skip themselves; a
//! build of dovepush that fails inside the root is a test failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The Debian 13 root and what was built in it.
#[derive(Debug, Clone)]
pub struct Debian13 {
    /// The root, as the host sees it.
    pub root: PathBuf,
    /// `libdovepush_plugin.so` built against Dovecot 2.4 (host path).
    pub plugin: PathBuf,
    /// `libdovepush_settings.so`, Dovecot 2.4's settings module (host path).
    pub settings_module: PathBuf,
    /// `dovepush-sender` built in the root (host path).
    pub sender: PathBuf,
    /// `dovecot --version` in the root, e.g. `2.4.1-4 (7d8c0e5759)`.
    pub version: String,
}

/// Where Dovecot 2.4 keeps settings modules in the root (its compiled-in
/// `$moduledir/settings`; the config process knows no other).
pub const SETTINGS_MODULE_DIR: &str = "usr/lib/dovecot/modules/settings";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .to_path_buf()
}

fn run(script: &str, args: &[&str]) -> Result<String, String> {
    let path = workspace().join("scripts").join(script);
    let out = Command::new(&path)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {} failed ({}):\n{}{}",
            path.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn prepare() -> Result<Debian13, String> {
    if std::env::var_os("DOVEPUSH_SKIP_DOVECOT24").is_some_and(|v| v != "0") {
        return Err("DOVEPUSH_SKIP_DOVECOT24 is set".into());
    }
    let root = PathBuf::from(run("debian13-root", &[])?.trim());
    // Built inside the root: a failure here is dovepush's, not the machine's.
    if let Err(e) = run("debian13", &["build"]) {
        panic!(
            "building dovepush against Dovecot 2.4 in {} failed: {e}",
            root.display()
        );
    }
    let built = workspace().join("target/debian13/debug");
    let version = Command::new("chroot")
        .arg(&root)
        .args(["dovecot", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(Debian13 {
        plugin: built.join("libdovepush_plugin.so"),
        settings_module: built.join("libdovepush_settings.so"),
        sender: built.join("dovepush-sender"),
        root,
        version,
    })
}

/// The Debian 13 root with dovepush built in it, or why there is none (then the caller
/// skips). Prepared once per process; the skip reason is printed once.
pub fn get() -> Result<&'static Debian13, &'static str> {
    static ROOT: OnceLock<Result<Debian13, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let prepared = prepare();
        if let Err(why) = &prepared {
            eprintln!(
                "SKIPPING the Dovecot 2.4 tests: no Debian 13 root could be built on this \
                 machine ({why})"
            );
        }
        prepared
    })
    .as_ref()
    .map_err(String::as_str)
}

impl Debian13 {
    /// `program args…` run inside the root: in a mount namespace of its own with the
    /// root's `/proc` mounted (gone when the last process in it exits), then `chroot`.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(r#"mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#)
            .arg(&self.root)
            .arg(program);
        command
    }

    /// A path inside the root as the host sees it.
    pub fn host_path(&self, inner: &Path) -> PathBuf {
        self.root.join(inner.strip_prefix("/").unwrap_or(inner))
    }

    /// Install the settings module where the root's config process loads it, by copy and
    /// rename (a running doveconf keeps the file it mapped), unless it is there already.
    pub fn install_settings_module(&self) -> std::io::Result<()> {
        // Tests start instances from several threads: one install at a time (the
        // temporary name is per process).
        static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.root.join(SETTINGS_MODULE_DIR);
        let dest = dir.join("libdovepush_settings.so");
        let new = std::fs::read(&self.settings_module)?;
        if std::fs::read(&dest).is_ok_and(|old| old == new) {
            return Ok(());
        }
        let tmp = dir.join(format!(".libdovepush_settings.so.{}", std::process::id()));
        std::fs::write(&tmp, new)?;
        std::fs::rename(&tmp, &dest)
    }
}
