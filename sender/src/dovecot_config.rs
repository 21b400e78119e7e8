//! The service's settings, read while still root, in one of two ways:
//!
//! - **Dovecot 2.3** ([`request`]): asked of Dovecot's config process, as every Dovecot
//!   service asks for its own: connect to the config socket (`CONFIG_FILE`, mode 0600
//!   root), say `VERSION` and `REQ service=<name>`, read `key=value` lines up to an
//!   empty line. `plugin {}` settings come as `plugin/<name>`.
//! - **Dovecot 2.4** ([`doveconf`]): the config socket of 2.4 answers with an fd of
//!   Dovecot's binary config, an internal format (`config-dump-full.c`) that only
//!   libdovecot reads. The service runs Dovecot's own `doveconf -P -c <CONFIG_FILE>
//!   <names>` instead: the documented tool, which resolves defaults, includes and named
//!   blocks itself, loads dovepush's settings module like the config process, and
//!   prints `key = value` lines and `dovepush <name> { … }` blocks ([`parse_doveconf`]).
//!   It runs with an empty environment (doveconf must not take the master's variables
//!   for its own) and no inherited descriptors; `-P` because `dovepush_url` carries the
//!   receiver's password.
//!
//! Either way only root-owned configuration reaches the service: the endpoints it sends
//! to, with their credentials, are the global `dovepush_*` settings (a userdb or a
//! `protocol {}` block can change the plugin's view, never the service's), read from the
//! root-only endpoint file that a local user's doveconf skips.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dovepush_settings::{Config, ConfigError, Settings, SETTING_NAMES};

use crate::trust::Trust;

/// Dovecot 2.3's config protocol (major version 2).
const HANDSHAKE: &str = "VERSION\tconfig\t2\t0\n";
/// Dovecot writes newlines inside values as this byte.
const VALUE_LF: char = '\x01';
/// Where Dovecot keeps its state when the config does not say.
const DEFAULT_STATE_DIR: &str = "/var/lib/dovecot";

/// The Dovecot settings the service reads besides the `dovepush_*` ones.
const DOVECOT_NAMES: &[&str] = &["state_dir", "mail_uid", "first_valid_uid", "last_valid_uid"];

/// The filter array of Dovecot 2.4's named endpoint blocks (`dovepush <name> { … }`).
const BLOCKS: &str = "dovepush";

/// Dovecot's settings as `key=value`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DovecotSettings {
    /// 2.3: as the config process names them (`plugin {}` ones as `plugin/<name>`);
    /// 2.4: plain names.
    pub values: HashMap<String, String>,
    /// 2.4: the `dovepush <name> { … }` blocks in config order, each with the settings it
    /// sets itself (full names).
    pub blocks: Vec<(String, HashMap<String, String>)>,
}

impl DovecotSettings {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A dovepush setting: of `plugin {}` on 2.3, global on 2.4.
    pub fn plugin(&self, name: &str) -> Option<String> {
        self.values
            .get(&format!("plugin/{name}"))
            .or_else(|| self.values.get(name))
            .cloned()
    }
}

impl Settings for DovecotSettings {
    fn get(&self, name: &str) -> Option<String> {
        self.plugin(name)
    }

    fn blocks(&self) -> Vec<String> {
        self.blocks.iter().map(|(name, _)| name.clone()).collect()
    }

    fn get_in(&self, block: &str, name: &str) -> Option<String> {
        let (_, set) = self.blocks.iter().find(|(n, _)| n == block)?;
        set.get(name).cloned()
    }
}

/// Ask the config process at `socket` for `service`'s settings.
pub fn request(socket: &Path, service: &str) -> io::Result<DovecotSettings> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", socket.display()),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    (&stream).write_all(format!("{HANDSHAKE}REQ\tservice={service}\n").as_bytes())?;
    read_reply(BufReader::new(stream))
}

/// Read one `REQ` answer: a line of flags, `key=value` lines, an empty line.
pub fn read_reply(mut reader: impl BufRead) -> io::Result<DovecotSettings> {
    let mut settings = HashMap::new();
    let mut first = true;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the config process closed the connection before the end of the settings",
            ));
        }
        let line = line.trim_end_matches('\n');
        if let Some(error) = line.strip_prefix("ERROR ") {
            return Err(io::Error::other(format!("the config process: {error}")));
        }
        if first {
            // Flags such as `service-uses-local`; none matter here.
            first = false;
            continue;
        }
        if line.is_empty() {
            return Ok(DovecotSettings {
                values: settings,
                blocks: Vec::new(),
            });
        }
        if let Some((key, value)) = line.split_once('=') {
            settings.insert(key.to_string(), value.replace(VALUE_LF, "\n"));
        }
    }
}

/// The `doveconf` of the Dovecot whose master started us: `DOVEPUSH_DOVECONF` when set
/// (tests), else `../bin/doveconf` beside the master's binary (`/usr/sbin/dovecot` →
/// `/usr/bin/doveconf`, and likewise under another prefix), else `/usr/bin/doveconf`.
pub fn doveconf_path() -> PathBuf {
    if let Some(path) = std::env::var_os("DOVEPUSH_DOVECONF") {
        return PathBuf::from(path);
    }
    let parent = std::os::unix::process::parent_id();
    std::fs::read_link(format!("/proc/{parent}/exe"))
        .ok()
        .and_then(|master| Some(master.parent()?.parent()?.join("bin/doveconf")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/doveconf"))
}

/// The names the service asks `doveconf` for.
pub fn doveconf_names() -> Vec<&'static str> {
    let mut names = DOVECOT_NAMES.to_vec();
    names.push("dovepush_url");
    names.extend(SETTING_NAMES);
    names.push(BLOCKS);
    names
}

/// Read the settings with `doveconf -P -c <config_file>` (Dovecot 2.4).
pub fn doveconf(doveconf: &Path, config_file: &Path) -> io::Result<DovecotSettings> {
    let output = Command::new(doveconf)
        .arg("-P")
        .arg("-c")
        .arg(config_file)
        .args(doveconf_names())
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", doveconf.display())))?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{} -c {} failed ({}): {}",
            doveconf.display(),
            config_file.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let settings = parse_doveconf(&String::from_utf8_lossy(&output.stdout));
    if settings.get("dovepush_url").is_none() {
        return Err(io::Error::other(format!(
            "{} does not know dovepush_url: is libdovepush_settings.so in Dovecot's \
             settings module directory ($moduledir/settings/)?",
            doveconf.display()
        )));
    }
    Ok(settings)
}

/// Is `name` one of dovepush's setting names?
fn is_dovepush_name(name: &str) -> bool {
    name == "dovepush_url" || name == "dovepush_name" || SETTING_NAMES.contains(&name)
}

/// The full name of key `key` printed inside block `dovepush <block> { … }`. doveconf
/// strips `dovepush_<block>_` from a name, else `dovepush_` unless that would make it
/// read as a `dovepush_<block>_…` name (`try_strip_prefix()` in Dovecot's doveconf.c).
fn block_key(block: &str, key: &str) -> String {
    let long = format!("{BLOCKS}_{block}_{key}");
    if is_dovepush_name(&long) {
        return long;
    }
    let short = format!("{BLOCKS}_{key}");
    if is_dovepush_name(&short) {
        return short;
    }
    key.to_string()
}

/// Parse what `doveconf <names>` prints: `key = value` lines, and `name value { … }`
/// blocks of which the `dovepush <name>` ones are kept.
pub fn parse_doveconf(text: &str) -> DovecotSettings {
    let mut settings = DovecotSettings::default();
    // Blocks open around the current line; the innermost is a dovepush block (an index
    // into `settings.blocks`) or some other block.
    let mut open: Vec<Option<usize>> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == "}" {
            open.pop();
            continue;
        }
        if let Some(head) = line.strip_suffix('{') {
            let words: Vec<&str> = head.split_whitespace().collect();
            let block = match words.as_slice() {
                [BLOCKS, name] if open.is_empty() => {
                    settings.blocks.push((name.to_string(), HashMap::new()));
                    Some(settings.blocks.len() - 1)
                }
                _ => None,
            };
            open.push(block);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match open.last() {
            None => {
                settings.values.insert(key.to_string(), value.to_string());
            }
            Some(Some(index)) => {
                let (name, set) = &mut settings.blocks[*index];
                let key = block_key(name, key);
                set.insert(key, value.to_string());
            }
            Some(None) => {}
        }
    }
    settings
}

/// What the service runs with.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// The `dovepush_*` settings (endpoints, spool, debug).
    pub config: Config,
    /// Settings that could not be used as written (each already has a fallback).
    pub problems: Vec<ConfigError>,
    pub trust: Trust,
}

impl ServiceSettings {
    /// From Dovecot's settings; `uid_of` resolves user names (`mail_uid = vmail`).
    pub fn from_dovecot(
        settings: &DovecotSettings,
        uid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<ServiceSettings, String> {
        let state_dir = settings
            .get("state_dir")
            .filter(|d| !d.is_empty())
            .unwrap_or(DEFAULT_STATE_DIR);
        let (config, problems) = Config::from_settings(settings, state_dir);
        let uid = |key: &str| -> Result<Option<u32>, String> {
            match settings.get(key).map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(value) => match value.parse() {
                    Ok(n) => Ok(Some(n)),
                    Err(_) => uid_of(value)
                        .map(Some)
                        .ok_or_else(|| format!("{key} = {value}: no such user")),
                },
            }
        };
        let trust = Trust {
            mail_uid: uid("mail_uid")?,
            first_valid_uid: uid("first_valid_uid")?.unwrap_or(500),
            last_valid_uid: uid("last_valid_uid")?.unwrap_or(0),
        };
        Ok(ServiceSettings {
            config,
            problems,
            trust,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = "\nbase_dir=/run/dovecot\nstate_dir=/var/lib/dovecot-x\nmail_uid=vmail\nfirst_valid_uid=100\nplugin=\nplugin/dovepush_url=http://u:p@127.0.0.1:9/notify\nplugin/dovepush_batch=yes\nplugin/note=a\x01b\n\n";

    #[test]
    fn reads_a_reply_up_to_the_empty_line() {
        let s = read_reply(REPLY.as_bytes()).unwrap();
        assert_eq!(s.get("base_dir"), Some("/run/dovecot"));
        assert_eq!(s.plugin("dovepush_batch").as_deref(), Some("yes"));
        assert_eq!(s.plugin("note").as_deref(), Some("a\nb"));
    }

    #[test]
    fn errors_and_cut_replies() {
        let err = read_reply("\nERROR bad config\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("bad config"));
        let err = read_reply("\nbase_dir=/x\n".as_bytes()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// What doveconf 2.4.1 printed for `doveconf -P -c … <doveconf_names()>`: defaults in
    /// its own spelling, a block named like a setting prefix.
    const DOVECONF: &str = "state_dir = /tmp/t1/state
mail_uid = vmail
first_valid_uid = 1
last_valid_uid = 0
dovepush_url = http://u:p@127.0.0.1:9/x
dovepush_cache_lifetime = 1 mins
dovepush_negative_cache_lifetime = 5 secs
dovepush_max_retries = 1
dovepush_timeout_msecs = 2 secs
dovepush_user_from_metadata = no
dovepush_batch = yes
dovepush_mailboxes = INBOX Work
dovepush_spool_dir = /var/lib/dovecot/dovepush-spool
dovepush_spool_max_size = 256 M
dovepush_spool_max_age = 2 days
dovepush_spool_retry_interval = 30 secs
dovepush_queue_size = 10000
dovepush_debug = no
dovepush a {
  max_retries = 3
  url = http://a:b@host/a
}
dovepush spool {
  max_size = 1 M
  dovepush_timeout_msecs = 5s
}
";

    #[test]
    fn reads_doveconf_output_with_named_blocks() {
        let s = parse_doveconf(DOVECONF);
        assert_eq!(s.get("state_dir"), Some("/tmp/t1/state"));
        assert_eq!(s.plugin("dovepush_batch").as_deref(), Some("yes"));
        assert_eq!(s.blocks.len(), 2);
        assert_eq!(
            s.get_in("a", "dovepush_url").as_deref(),
            Some("http://a:b@host/a")
        );
        assert_eq!(s.get_in("a", "dovepush_max_retries").as_deref(), Some("3"));
        // In block "spool", doveconf strips dovepush_spool_ from dovepush_spool_max_size,
        // and keeps dovepush_timeout_msecs whole (timeout_msecs would be read as
        // dovepush_spool_timeout_msecs if that existed; it does not, but the rule holds).
        assert_eq!(
            s.get_in("spool", "dovepush_spool_max_size").as_deref(),
            Some("1 M")
        );
        assert_eq!(
            s.get_in("spool", "dovepush_timeout_msecs").as_deref(),
            Some("5s")
        );
        let lookup = |name: &str| (name == "vmail").then_some(5000);
        let service = ServiceSettings::from_dovecot(&s, &lookup).unwrap();
        assert!(service.problems.is_empty(), "{:?}", service.problems);
        let endpoints = &service.config.endpoints;
        assert_eq!(
            endpoints.len(),
            2,
            "one per block; the global URL is their default"
        );
        assert_eq!(endpoints[0].display_url, "http://host/a");
        assert_eq!(endpoints[0].max_retries, 3);
        assert_eq!(endpoints[1].display_url, "http://127.0.0.1:9/x");
        assert_eq!(endpoints[1].timeout, Duration::from_secs(5));
        assert!(endpoints.iter().all(|e| e.batch));
        assert_eq!(service.config.spool.max_size, 256 << 20);
        assert_eq!(service.config.spool.max_age, Duration::from_secs(172_800));
        assert_eq!(service.config.mailboxes, ["INBOX", "Work"]);
        assert_eq!(service.trust.mail_uid, Some(5000));
        assert_eq!(service.trust.first_valid_uid, 1);
    }

    #[test]
    fn without_blocks_dovepush_url_is_the_endpoint() {
        let text: String = DOVECONF.split("dovepush a {").next().unwrap().to_string();
        let s = parse_doveconf(&text);
        let service = ServiceSettings::from_dovecot(&s, &|_| Some(1)).unwrap();
        assert_eq!(service.config.endpoints.len(), 1);
        assert_eq!(service.config.endpoints[0].timeout, Duration::from_secs(2));
        assert_eq!(service.config.cache_lifetime, Duration::from_secs(60));
    }

    /// A stand-in doveconf: prints its arguments' count and a canned answer, or fails.
    fn fake_doveconf(dir: &Path, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("doveconf");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn runs_doveconf_with_an_empty_environment_and_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let args = dir.path().join("args");
        let env = dir.path().join("env");
        let fake = fake_doveconf(
            dir.path(),
            &format!(
                "echo \"$@\" > {}\nenv > {}\ncat <<'EOF'\n{DOVECONF}EOF",
                args.display(),
                env.display()
            ),
        );
        let s = doveconf(&fake, Path::new("/etc/dovecot/dovecot.conf"));
        assert_eq!(s.unwrap().blocks.len(), 2);
        let args = std::fs::read_to_string(args).unwrap();
        assert!(
            args.starts_with("-P -c /etc/dovecot/dovecot.conf state_dir mail_uid"),
            "{args}"
        );
        assert!(
            args.trim_end().ends_with(" dovepush_debug dovepush"),
            "{args}"
        );
        let env = std::fs::read_to_string(env).unwrap();
        // Nothing of ours (HOME stands for the master's DOVECOT_CHILD_PROCESS, CONFIG_FILE, …).
        assert!(!env.contains("HOME=") && env.contains("PATH="), "{env}");
    }

    #[test]
    fn doveconf_failures_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let failing = fake_doveconf(
            dir.path(),
            "echo 'doveconf: Fatal: Error in configuration file x line 3: dovepush_bogus: Unknown setting: dovepush_bogus' >&2; exit 89",
        );
        let err = doveconf(&failing, Path::new("/x.conf")).unwrap_err();
        assert!(
            err.to_string().contains("Unknown setting: dovepush_bogus"),
            "{err}"
        );
        // Without the settings module, doveconf skips the unknown names silently.
        let unaware = fake_doveconf(dir.path(), "echo 'state_dir = /var/lib/dovecot'");
        let err = doveconf(&unaware, Path::new("/x.conf")).unwrap_err();
        assert!(err.to_string().contains("libdovepush_settings.so"), "{err}");
        let missing = doveconf(&dir.path().join("nope"), Path::new("/x.conf")).unwrap_err();
        assert!(missing.to_string().contains("cannot run"), "{missing}");
    }

    #[test]
    fn service_settings_from_dovecots() {
        let s = read_reply(REPLY.as_bytes()).unwrap();
        let lookup = |name: &str| (name == "vmail").then_some(5000);
        let service = ServiceSettings::from_dovecot(&s, &lookup).unwrap();
        assert_eq!(service.trust.mail_uid, Some(5000));
        assert_eq!(service.trust.first_valid_uid, 100);
        assert_eq!(service.config.endpoints.len(), 1);
        assert!(service.config.endpoints[0].batch);
        assert_eq!(
            service.config.spool.dir,
            Path::new("/var/lib/dovecot-x/dovepush-spool")
        );
        let mut unknown = s.clone();
        unknown
            .values
            .insert("mail_uid".into(), "nobody-here".into());
        let err = ServiceSettings::from_dovecot(&unknown, &lookup).unwrap_err();
        assert!(err.contains("mail_uid"));
    }
}
