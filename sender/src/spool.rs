//! The spool: the drop directory mail processes write into when the service's socket is
//! unreachable, and the service's own queue of events it could not send yet.
//!
//! Postfix's `maildrop` and `pickup` are the model. Under the `dovepush_spool_dir`
//! (mode 0755, root):
//! - `drop/`, mode 3733, owned by the service's user and group: every local user may
//!   create files there but not list or read the directory; the sticky bit keeps users
//!   from removing or renaming each other's files, and the setgid bit gives every new
//!   file the service's group, which the plugin's mode 0640 lets the service read. The
//!   plugin writes a temporary dot-file and renames it to the record's name.
//! - `queue/`, mode 0700: records the service took responsibility for and has not sent
//!   (claimed drop files, and socket records that failed or were pending at exit).
//! - `quarantine/`, mode 0700: what was refused from `drop/` and is worth a look.
//!
//! A file in `drop/` is trusted only as far as its owner ([`crate::trust::Trust`]).
//! [`Spool::claim_drops`] looks at each entry without following links (`lstat`), removes
//! anything that is not a regular file or is larger than a record can be, opens the rest
//! with `O_NOFOLLOW|O_NONBLOCK` and checks it is still the same file, reads at most
//! [`MAX_RECORD_BYTES`] + 1 bytes and validates the record; the dispatcher then writes
//! its own copies (one per endpoint) into `queue/` and removes the file. Nothing planted
//! can block it (a FIFO is never opened for reading), make it read a file it was not
//! given (links are never followed), choose where an event goes (records name no
//! endpoint), or evict a valid record (the size limit counts only `queue/`, which only
//! the service writes).

use std::collections::HashSet;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dovepush_protocol::record::{Record, MAX_RECORD_BYTES};
use dovepush_settings::SpoolSettings;

use crate::trust::Trust;

pub const DROP_DIR: &str = "drop";
pub const QUEUE_DIR: &str = "queue";
pub const QUARANTINE_DIR: &str = "quarantine";
/// `drop/`: setgid, sticky, rwx for the service, wx for everyone else.
pub const DROP_MODE: u32 = 0o3733;
/// Temporary files a crashed writer left in `drop/` go after this long.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// At most this many refused files are kept in `quarantine/`; beyond, they are removed.
const MAX_QUARANTINED: usize = 1000;

/// Where the spool's directories are.
#[derive(Debug, Clone)]
pub struct Spool {
    pub settings: SpoolSettings,
    pub drop: PathBuf,
    pub queue: PathBuf,
    pub quarantine: PathBuf,
}

/// What happened to one refused entry of `drop/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub name: String,
    /// The owner's uid, if the entry could be looked at.
    pub owner: Option<u32>,
    pub why: String,
    /// `removed` or `quarantined`.
    pub action: &'static str,
}

/// The result of one look at `drop/`.
#[derive(Debug, Default)]
pub struct Claims {
    /// Valid records of trusted owners, with their paths in `drop/` (removed once the
    /// dispatcher has its copies).
    pub claimed: Vec<(PathBuf, Record)>,
    pub refused: Vec<Refusal>,
}

/// What [`Spool::enforce_limits`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub too_old: usize,
    pub over_size: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Create `path` as a directory owned by `uid`/`gid` with `mode`, or repair one; an entry
/// that is not a directory, or a directory someone else owns, is moved aside first.
fn ensure_dir(
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    notes: &mut Vec<String>,
) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() && (meta.uid() == uid || meta.uid() == 0) => {}
        Ok(meta) => {
            let aside = path.with_file_name(format!(
                ".untrusted-{}-{}",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
                now_ms()
            ));
            fs::rename(path, &aside)?;
            notes.push(format!(
                "{} was owned by uid {} (or not a directory) and was moved to {}",
                path.display(),
                meta.uid(),
                aside.display()
            ));
            DirBuilder::new().mode(0o700).create(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new().recursive(true).mode(0o700).create(path)?;
        }
        Err(e) => return Err(e),
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

impl Spool {
    pub fn new(settings: SpoolSettings) -> Spool {
        let dir = settings.dir.clone();
        Spool {
            settings,
            drop: dir.join(DROP_DIR),
            queue: dir.join(QUEUE_DIR),
            quarantine: dir.join(QUARANTINE_DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.settings.dir
    }

    /// As root, before privileges are dropped: create or repair the layout for the
    /// service's `uid`/`gid`. Returns notes for the log (what was repaired or found).
    pub fn prepare(&self, uid: u32, gid: u32) -> io::Result<Vec<String>> {
        let mut notes = Vec::new();
        let root = self.dir();
        match fs::symlink_metadata(root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new().recursive(true).mode(0o755).create(root)?;
            }
            Err(e) => return Err(e),
            Ok(meta) if !meta.is_dir() => {
                return Err(io::Error::other(format!(
                    "{} is not a directory",
                    root.display()
                )))
            }
            Ok(meta) => {
                if meta.mode() & 0o022 != 0 {
                    // An older dovepush made it world-writable: its subdirectories may
                    // be anyone's.
                    notes.push(format!(
                        "{} was writable by others (mode {:o}); it is now 0755",
                        root.display(),
                        meta.mode() & 0o7777
                    ));
                }
                let old_records = fs::read_dir(root)?
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json")))
                    .count();
                if old_records > 0 {
                    notes.push(format!(
                        "{} holds {old_records} records of an older dovepush version; they are not sent",
                        root.display()
                    ));
                }
            }
        }
        std::os::unix::fs::chown(root, Some(0), Some(0))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        ensure_dir(&self.drop, uid, gid, DROP_MODE, &mut notes)?;
        ensure_dir(&self.queue, uid, gid, 0o700, &mut notes)?;
        ensure_dir(&self.quarantine, uid, gid, 0o700, &mut notes)?;
        Ok(notes)
    }

    /// Write `record` into `queue/` (the service's own copy), synced, under its name.
    pub fn persist(&self, record: &Record) -> io::Result<PathBuf> {
        let name = record.file_name();
        let path = self.queue.join(&name);
        let tmp = self.queue.join(format!(".tmp-{name}"));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(record.encode().as_bytes())?;
            file.sync_data()?;
            fs::rename(&tmp, &path)?;
            Ok(path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The records in `queue/`, oldest first.
    pub fn queued(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.queue)?
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(".json"))
            })
            .map(|e| e.path())
            .collect();
        files.sort();
        Ok(files)
    }

    /// Read a record of `queue/`.
    pub fn load(path: &Path) -> Result<Record, String> {
        let bytes = read_at_most(path, MAX_RECORD_BYTES).map_err(|e| e.to_string())?;
        Record::decode(&bytes).map_err(|e| e.to_string())
    }

    pub fn remove(path: &Path) {
        let _ = fs::remove_file(path);
    }

    /// Move a `queue/` record that cannot be sent to `quarantine/`.
    pub fn set_aside(&self, path: &Path) {
        if let Some(name) = path.file_name() {
            let _ = fs::rename(path, self.quarantine.join(name));
        }
    }

    /// Drop `queue/` records older than `max_age`, then the oldest until the rest fits
    /// `max_size`. `busy` names records in use (never dropped).
    pub fn enforce_limits(&self, busy: &HashSet<String>) -> io::Result<Dropped> {
        let mut dropped = Dropped::default();
        let now = now_ms();
        let max_age_ms = self.settings.max_age.as_millis() as u64;
        let mut kept = Vec::new();
        for path in self.queued()? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if busy.contains(name) {
                continue;
            }
            let created: Option<u64> = name.split('-').next().and_then(|t| t.parse().ok());
            let old = created.is_some_and(|t| now.saturating_sub(t) > max_age_ms);
            if old && fs::remove_file(&path).is_ok() {
                dropped.too_old += 1;
                continue;
            }
            let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            kept.push((path, size));
        }
        let mut total: u64 = kept.iter().map(|(_, size)| size).sum();
        for (path, size) in kept {
            if total <= self.settings.max_size {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                dropped.over_size += 1;
                total -= size;
            }
        }
        Ok(dropped)
    }

    /// Look at every entry of `drop/`: return the valid records of trusted owners, refuse
    /// the rest. `uid_of` resolves user names for [`Trust::admits`].
    pub fn claim_drops(
        &self,
        trust: &Trust,
        uid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> io::Result<Claims> {
        let mut claims = Claims::default();
        for entry in fs::read_dir(&self.drop)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                self.remove_if_stale(&path);
                continue;
            }
            match self.claim_one(&path, &name, trust, uid_of) {
                Ok(record) => claims.claimed.push((path, record)),
                Err(refusal) => claims.refused.push(refusal),
            }
        }
        Ok(claims)
    }

    /// A writer's temporary file is left alone for a while, then removed (never read).
    fn remove_if_stale(&self, path: &Path) {
        let stale = fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP);
        if stale {
            let _ = self.remove_entry(path);
        }
    }

    /// Remove an entry (`removed`); a directory someone made cannot be emptied here,
    /// only moved away (`quarantined`).
    fn remove_entry(&self, path: &Path) -> &'static str {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => self.quarantine_entry(path),
            _ => {
                let _ = fs::remove_file(path);
                "removed"
            }
        }
    }

    fn quarantine_entry(&self, path: &Path) -> &'static str {
        let count = fs::read_dir(&self.quarantine)
            .map(|d| d.count())
            .unwrap_or(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = self.quarantine.join(format!("{}-{name}", now_ms()));
        if count < MAX_QUARANTINED && fs::rename(path, target).is_ok() {
            return "quarantined";
        }
        let _ = fs::remove_file(path);
        "removed"
    }

    /// The record in `path`, or why it was refused (and removed or quarantined).
    fn claim_one(
        &self,
        path: &Path,
        name: &str,
        trust: &Trust,
        uid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Record, Refusal> {
        let refuse = |owner: Option<u32>, why: String, keep: bool| {
            let action = if keep {
                self.quarantine_entry(path)
            } else {
                self.remove_entry(path)
            };
            Refusal {
                name: name.to_string(),
                owner,
                why,
                action,
            }
        };
        let meta = fs::symlink_metadata(path)
            .map_err(|e| refuse(None, format!("cannot look at it: {e}"), false))?;
        let owner = Some(meta.uid());
        let kind = meta.file_type();
        if !kind.is_file() {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_dir() {
                "a directory"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            return Err(refuse(owner, format!("{what}, not a record"), false));
        }
        if meta.len() > MAX_RECORD_BYTES as u64 {
            return Err(refuse(
                owner,
                format!("{} bytes, more than a record can be", meta.len()),
                false,
            ));
        }
        if meta.nlink() > 1 {
            return Err(refuse(owner, "a hard link, not a record".into(), false));
        }
        let bytes = read_same_file(path, &meta).map_err(|why| refuse(owner, why, false))?;
        let record = Record::decode(&bytes)
            .map_err(|e| refuse(owner, format!("not a valid record: {e}"), true))?;
        trust
            .admits(meta.uid(), &record.user, uid_of)
            .map_err(|why| refuse(owner, format!("record for {}: {why}", record.user), true))?;
        if let Some(endpoint) = &record.endpoint {
            return Err(refuse(
                owner,
                format!(
                    "record for {} names an endpoint ({endpoint}): mail processes never do",
                    record.user
                ),
                true,
            ));
        }
        Ok(record)
    }
}

/// Open `path` without following links or blocking, check it is the file `meta`
/// describes, and read at most one record's worth.
fn read_same_file(path: &Path, meta: &fs::Metadata) -> Result<Vec<u8>, String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let now = file
        .metadata()
        .map_err(|e| format!("cannot look at it: {e}"))?;
    if !now.is_file() || now.ino() != meta.ino() || now.dev() != meta.dev() {
        return Err("it was replaced while being looked at".into());
    }
    let mut bytes = Vec::with_capacity(now.len().min(MAX_RECORD_BYTES as u64) as usize);
    (&mut file)
        .take(MAX_RECORD_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err("it grew beyond the size of a record".into());
    }
    Ok(bytes)
}

fn read_at_most(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dovepush_protocol::notification::{EventKind, Notification};
    use std::os::unix::fs::symlink;

    const URL: &str = "http://127.0.0.1:9/notify";

    fn record(id: &str, user: &str) -> Record {
        Record::new(
            id.into(),
            user.into(),
            user.into(),
            now_ms(),
            Notification {
                user: user.into(),
                event: EventKind::MessageNew,
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: 1,
                from: None,
                subject: Some("hi".into()),
                snippet: None,
                unseen: None,
                time_ms: None,
            },
        )
    }

    /// A spool in a temp dir, laid out as `prepare` would (without needing root).
    fn spool(dir: &Path) -> Spool {
        let spool = Spool::new(SpoolSettings {
            dir: dir.join("spool"),
            max_size: 1 << 20,
            max_age: Duration::from_secs(3600),
            retry_interval: Duration::from_secs(30),
        });
        for d in [&spool.drop, &spool.queue, &spool.quarantine] {
            fs::create_dir_all(d).unwrap();
        }
        spool
    }

    fn me() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    /// Trust this test's own uid as the mail uid.
    fn trust() -> Trust {
        Trust {
            mail_uid: Some(me()),
            first_valid_uid: 0,
            last_valid_uid: 0,
        }
    }

    fn claim(spool: &Spool) -> Claims {
        spool.claim_drops(&trust(), &|_| None).unwrap()
    }

    #[test]
    fn a_valid_record_is_claimed() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = spool(tmp.path());
        let r = record("e1", "alice");
        let path = spool.drop.join(r.file_name());
        fs::write(&path, r.encode()).unwrap();
        let claims = claim(&spool);
        assert!(claims.refused.is_empty(), "{:?}", claims.refused);
        assert_eq!(claims.claimed, [(path, r)]);
    }

    #[test]
    fn planted_entries_are_refused_without_being_read() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = spool(tmp.path());
        let secret = tmp.path().join("secret");
        fs::write(&secret, record("s1", "alice").encode()).unwrap();
        symlink(&secret, spool.drop.join("link.json")).unwrap();
        nix::unistd::mkfifo(&spool.drop.join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let big = fs::File::create(spool.drop.join("big.json")).unwrap();
        big.set_len(200 << 20).unwrap();
        fs::create_dir(spool.drop.join("dir.json")).unwrap();
        fs::hard_link(&secret, spool.drop.join("hard.json")).unwrap();
        fs::write(spool.drop.join("junk.json"), "not json").unwrap();
        let foreign = record("f1", "alice").for_endpoint("http://attacker.example/notify", false);
        fs::write(spool.drop.join("foreign.json"), foreign.encode()).unwrap();

        let claims = claim(&spool);
        assert!(claims.claimed.is_empty());
        let mut refused: Vec<(String, &str)> = claims
            .refused
            .iter()
            .map(|r| (r.name.clone(), r.action))
            .collect();
        refused.sort();
        assert_eq!(
            refused,
            [
                ("big.json".to_string(), "removed"),
                ("dir.json".to_string(), "quarantined"),
                ("fifo.json".to_string(), "removed"),
                ("foreign.json".to_string(), "quarantined"),
                ("hard.json".to_string(), "removed"),
                ("junk.json".to_string(), "quarantined"),
                ("link.json".to_string(), "removed"),
            ]
        );
        for refusal in &claims.refused {
            assert_eq!(refusal.owner, Some(me()), "{refusal:?}");
        }
        let why = |name: &str| {
            claims
                .refused
                .iter()
                .find(|r| r.name == name)
                .unwrap()
                .why
                .clone()
        };
        assert!(why("link.json").contains("symbolic link"));
        assert!(why("fifo.json").contains("FIFO"));
        assert!(why("big.json").contains("more than a record"));
        assert!(why("foreign.json").contains("names an endpoint"));
        assert_eq!(fs::read_dir(&spool.drop).unwrap().count(), 0);
        // The link's target is untouched and nothing was queued.
        assert!(secret.exists());
        assert!(spool.queued().unwrap().is_empty());
    }

    #[test]
    fn records_of_untrusted_owners_are_quarantined() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = spool(tmp.path());
        let r = record("e1", "alice");
        fs::write(spool.drop.join(r.file_name()), r.encode()).unwrap();
        let strict = Trust {
            mail_uid: Some(me() + 1),
            first_valid_uid: 0,
            last_valid_uid: 0,
        };
        let claims = spool.claim_drops(&strict, &|_| None).unwrap();
        if me() == 0 {
            // Root is trusted whatever mail_uid says.
            assert_eq!(claims.claimed.len(), 1);
        } else {
            assert_eq!(claims.refused.len(), 1);
            assert_eq!(claims.refused[0].action, "quarantined");
            assert!(claims.refused[0].why.contains("mail uid"));
        }
    }

    #[test]
    fn temporary_files_are_left_to_their_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = spool(tmp.path());
        fs::write(spool.drop.join(".tmp-123-x"), "partial").unwrap();
        let claims = claim(&spool);
        assert!(claims.claimed.is_empty() && claims.refused.is_empty());
        assert!(spool.drop.join(".tmp-123-x").exists());
    }

    #[test]
    fn persist_queue_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spool = spool(tmp.path());
        spool.settings.max_size = 1;
        let mut ancient = record("old", "alice");
        ancient.created_ms -= 2 * 3600 * 1000;
        spool.persist(&ancient.for_endpoint(URL, false)).unwrap();
        let fresh: Vec<Record> = ["a", "b", "c"]
            .iter()
            .map(|id| record(id, "alice").for_endpoint(URL, false))
            .collect();
        for r in &fresh {
            spool.persist(r).unwrap();
        }
        let queued = spool.queued().unwrap();
        assert_eq!(queued.len(), 4);
        let mode = fs::metadata(&queued[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let busy: HashSet<String> = [fresh[2].file_name()].into();
        let dropped = spool.enforce_limits(&busy).unwrap();
        assert_eq!(
            dropped,
            Dropped {
                too_old: 1,
                over_size: 2
            }
        );
        assert_eq!(spool.queued().unwrap().len(), 1, "the busy record stays");
    }
}
