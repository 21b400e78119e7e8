//! What Dovecot's master hands a service it starts, and giving up root.
//!
//! The master forks, sets up descriptors and environment, then execs the service as
//! root (see `src/lib-master/master-interface.h` in Dovecot):
//! - fd 5, a pipe to the master for status reports (`struct master_status`): a process
//!   that sends none within 30 s is killed, so one is sent at start;
//! - fd 6, the writing end of a pipe whose reading end the master holds: it reports an
//!   error when the master dies;
//! - the service's listeners (non-blocking), from fd 7 on Dovecot 2.3 and from fd 8 on
//!   2.4 (which keeps fd 7 for a config fd it gives the log process only);
//! - `RESTRICT_SETUID` / `RESTRICT_SETGID`: the `user =` of the service block, which a
//!   program not linked with libdovecot must switch to itself; `GENERATION` (the value
//!   status reports carry), `CLIENT_LIMIT`, `SERVICE_NAME`, `DOVECOT_VERSION` (unless
//!   `version_ignore`); on 2.3 `CONFIG_FILE` is the config process's socket, on 2.4 it
//!   is the config file and `CONFIG_FILE_SOCKET` the socket (which hands out Dovecot's
//!   binary config only: see [`ConfigSource`]).
//!
//! [`drop_privileges`] checks every step and that root cannot be regained; the service
//! refuses to run as root at all.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid};

/// Status reports to the master.
pub const STATUS_FD: RawFd = 5;
/// The writing end of a pipe the master reads: it reports an error once the master is
/// gone.
pub const DEAD_FD: RawFd = 6;
/// The first (here: only) listener on Dovecot 2.3 (`MASTER_LISTEN_FD_FIRST`).
pub const LISTENER_FD: RawFd = 7;
/// The same on Dovecot 2.4, whose fd 7 is `MASTER_CONFIG_FD`.
pub const LISTENER_FD_24: RawFd = 8;

/// Why the service cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterError(pub String);

impl std::fmt::Display for MasterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MasterError {}

/// Where the service's settings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Dovecot 2.3: the config process's socket, which answers `key=value` lines.
    Socket(PathBuf),
    /// Dovecot 2.4: the config file, read with `doveconf` (the config socket of 2.4 hands
    /// out only an fd of Dovecot's internal binary config).
    File(PathBuf),
}

/// The environment the master sets for a service process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterEnv {
    pub service_name: String,
    /// Where the settings come from (this also says which Dovecot started us).
    pub config: ConfigSource,
    /// The (only) listener's descriptor.
    pub listener_fd: RawFd,
    /// The `user =` of the service block, as uid and gid.
    pub run_as: Option<(u32, u32)>,
    /// What status reports carry as `uid` (the master ignores others).
    pub generation: u32,
    pub client_limit: u32,
}

impl MasterEnv {
    /// Read it with `get` (the process environment in production). `None` when the
    /// process was not started by Dovecot's master.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Option<MasterEnv>, MasterError> {
        if get("DOVECOT_CHILD_PROCESS").is_none() {
            return Ok(None);
        }
        let number = |name: &str| -> Result<Option<u32>, MasterError> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| {
                    MasterError(format!(
                        "the master set {name}={v:?}, which is not a number"
                    ))
                }),
            }
        };
        let run_as = match (number("RESTRICT_SETUID")?, number("RESTRICT_SETGID")?) {
            (Some(uid), Some(gid)) => Some((uid, gid)),
            (Some(uid), None) => Some((uid, uid)),
            _ => None,
        };
        let config_file = get("CONFIG_FILE")
            .map(PathBuf::from)
            .ok_or_else(|| MasterError("the master set no CONFIG_FILE".into()))?;
        // DOVECOT_VERSION is missing with version_ignore = yes; then only 2.4 sets
        // CONFIG_FILE_SOCKET.
        let dovecot24 = match get("DOVECOT_VERSION") {
            Some(version) if !version.is_empty() => version_at_least_24(&version),
            _ => get("CONFIG_FILE_SOCKET").is_some(),
        };
        let (config, listener_fd) = if dovecot24 {
            (ConfigSource::File(config_file), LISTENER_FD_24)
        } else {
            (ConfigSource::Socket(config_file), LISTENER_FD)
        };
        Ok(Some(MasterEnv {
            service_name: get("SERVICE_NAME").unwrap_or_else(|| "dovepush".into()),
            config,
            listener_fd,
            run_as,
            generation: number("GENERATION")?.unwrap_or(0),
            client_limit: number("CLIENT_LIMIT")?.unwrap_or(1000),
        }))
    }
}

/// Whether a Dovecot version such as `2.4.1` or `2.3.19.1` is 2.4 or later.
fn version_at_least_24(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 4)
}

/// The descriptors the master passed.
pub struct Inherited {
    pub listener: UnixListener,
    pub status: File,
    /// Reports an error when the master is gone.
    pub dead: OwnedFd,
}

fn adopt(fd: RawFd, what: &str) -> Result<OwnedFd, MasterError> {
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open; nothing else in this process
    // has claimed the descriptors the master passed (this runs once, at start, before any
    // other file is opened), so the OwnedFd becomes their only owner.
    unsafe {
        if libc::fcntl(fd, libc::F_GETFD) == -1 {
            return Err(MasterError(format!(
                "fd {fd} ({what}) is not open: start dovepush-sender from Dovecot's master (service dovepush {{ … }})"
            )));
        }
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

impl Inherited {
    /// Take fds 5, 6 and the listener (7 or 8). Call once, first thing.
    pub fn adopt(listener_fd: RawFd) -> Result<Inherited, MasterError> {
        let status = File::from(adopt(STATUS_FD, "master status pipe")?);
        let dead = adopt(DEAD_FD, "master death pipe")?;
        let listener = UnixListener::from(adopt(listener_fd, "unix_listener")?);
        listener
            .set_nonblocking(true)
            .map_err(|e| MasterError(format!("the listener (fd {listener_fd}): {e}")))?;
        Ok(Inherited {
            listener,
            status,
            dead,
        })
    }
}

/// The master's `struct master_status`: pid, generation, connections still accepted.
pub fn status_report(pid: u32, generation: u32, available: u32) -> [u8; 12] {
    let mut report = [0u8; 12];
    report[..4].copy_from_slice(&pid.to_ne_bytes());
    report[4..8].copy_from_slice(&generation.to_ne_bytes());
    report[8..].copy_from_slice(&available.to_ne_bytes());
    report
}

/// Tell the master the process is up and accepting (one write: atomic on a pipe).
pub fn report_status(status: &mut File, env: &MasterEnv) -> io::Result<()> {
    status.write_all(&status_report(
        std::process::id(),
        env.generation,
        env.client_limit,
    ))
}

/// Become `uid`/`gid` for good: supplementary groups, then gid, then uid, each checked,
/// and then that root cannot be had back. Refuses uid 0.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), MasterError> {
    if uid == 0 {
        return Err(MasterError(
            "refusing to run as root: give the service block a user (service dovepush { user = dovepush })".into(),
        ));
    }
    let fail = |step: &str, e: nix::Error| MasterError(format!("{step} failed: {e}"));
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    if Uid::effective().is_root() {
        nix::unistd::setgroups(&[gid]).map_err(|e| fail("setgroups", e))?;
    }
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| fail("setresgid", e))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| fail("setresuid", e))?;
    let ids = nix::unistd::getresuid().map_err(|e| fail("getresuid", e))?;
    let gids = nix::unistd::getresgid().map_err(|e| fail("getresgid", e))?;
    if [ids.real, ids.effective, ids.saved] != [uid; 3]
        || [gids.real, gids.effective, gids.saved] != [gid; 3]
    {
        return Err(MasterError(format!(
            "still uid {ids:?} gid {gids:?} after switching to {uid}/{gid}"
        )));
    }
    let groups = nix::unistd::getgroups().map_err(|e| fail("getgroups", e))?;
    if groups.iter().any(|&g| g != gid) {
        return Err(MasterError(format!(
            "supplementary groups {groups:?} remain after switching to gid {gid}"
        )));
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || Uid::effective().is_root() {
        return Err(MasterError(
            "root could be regained after dropping it".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<MasterEnv>, MasterError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        MasterEnv::read(|name| map.get(name).cloned())
    }

    #[test]
    fn not_started_by_the_master() {
        assert_eq!(env(&[("CONFIG_FILE", "/run/dovecot/config")]), Ok(None));
    }

    #[test]
    fn reads_what_the_master_sets() {
        let e = env(&[
            ("DOVECOT_CHILD_PROCESS", "1"),
            ("SERVICE_NAME", "dovepush"),
            ("CONFIG_FILE", "/run/dovecot/config"),
            ("RESTRICT_SETUID", "998"),
            ("RESTRICT_SETGID", "997"),
            ("GENERATION", "4"),
            ("CLIENT_LIMIT", "1000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.run_as, Some((998, 997)));
        assert_eq!(e.generation, 4);
        assert_eq!(
            e.config,
            ConfigSource::Socket(PathBuf::from("/run/dovecot/config"))
        );
        assert_eq!(e.listener_fd, 7);
    }

    #[test]
    fn dovecot_24_passes_the_config_file_and_listeners_from_fd_8() {
        let e = env(&[
            ("DOVECOT_CHILD_PROCESS", "1"),
            ("CONFIG_FILE", "/etc/dovecot/dovecot.conf"),
            ("CONFIG_FILE_SOCKET", "/run/dovecot/config"),
            ("DOVECOT_VERSION", "2.4.1-4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e.config,
            ConfigSource::File(PathBuf::from("/etc/dovecot/dovecot.conf"))
        );
        assert_eq!(e.listener_fd, 8);
        // version_ignore = yes: no DOVECOT_VERSION, but 2.4's CONFIG_FILE_SOCKET.
        let e = env(&[
            ("DOVECOT_CHILD_PROCESS", "1"),
            ("CONFIG_FILE", "/etc/dovecot/dovecot.conf"),
            ("CONFIG_FILE_SOCKET", "/run/dovecot/config"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.listener_fd, 8);
        let e = env(&[
            ("DOVECOT_CHILD_PROCESS", "1"),
            ("CONFIG_FILE", "/run/dovecot/config"),
            ("DOVECOT_VERSION", "2.3.19.1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.listener_fd, 7);
        assert!(version_at_least_24("2.10.0") && !version_at_least_24("1.9"));
    }

    #[test]
    fn no_user_and_bad_numbers() {
        let e = env(&[("DOVECOT_CHILD_PROCESS", "1"), ("CONFIG_FILE", "/c")])
            .unwrap()
            .unwrap();
        assert_eq!(e.run_as, None);
        let bad = env(&[
            ("DOVECOT_CHILD_PROCESS", "1"),
            ("CONFIG_FILE", "/c"),
            ("RESTRICT_SETUID", "dovepush"),
        ]);
        assert!(bad.unwrap_err().0.contains("RESTRICT_SETUID"));
    }

    #[test]
    fn status_is_the_masters_struct() {
        let r = status_report(0x01020304, 7, 1000);
        assert_eq!(&r[..4], &0x01020304u32.to_ne_bytes());
        assert_eq!(&r[4..8], &7u32.to_ne_bytes());
        assert_eq!(&r[8..], &1000u32.to_ne_bytes());
    }

    #[test]
    fn root_is_refused() {
        assert!(drop_privileges(0, 0).unwrap_err().0.contains("root"));
    }
}
