//! The on-disk spool: events that could not be sent wait here, one file each.
//!
//! Files are written atomically (a dot-named temporary file, fsync, rename) and named
//! `<created ms>-<event id>.json`, so a listing sorted by name is oldest first. The
//! directory is created sticky and world-writable (like /tmp) because lmtp switches its
//! effective uid to each mail user around deliveries and `dovecot-lda` runs as the mail
//! user: whichever uid the sender runs as must be able to add files. Each file is mode
//! 0600 (it holds the endpoint's credentials); a file another uid wrote and this process
//! cannot read is left for a process that can. Anyone can add files here: the sender
//! replays only records whose endpoint URL (credentials included) is one its own
//! configuration gave it jobs for. The Debian package creates the default directory.
//!
//! The spool is bounded by total size and by age; [`Spool::enforce_limits`] drops the
//! oldest files beyond either bound and reports how many.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::SpoolSettings;
use crate::job::{now_ms, Job};

#[derive(Debug, Clone)]
pub struct Spool {
    pub settings: SpoolSettings,
}

/// What [`Spool::enforce_limits`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub too_old: usize,
    pub over_size: usize,
}

impl Spool {
    pub fn new(settings: SpoolSettings) -> Spool {
        Spool { settings }
    }

    pub fn dir(&self) -> &Path {
        &self.settings.dir
    }

    fn ensure_dir(&self) -> io::Result<()> {
        let dir = self.dir();
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
    }

    /// Write `job` to the spool.
    pub fn store(&self, job: &Job) -> io::Result<PathBuf> {
        self.ensure_dir()?;
        let safe_id: String = job
            .event_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(64)
            .collect();
        let name = format!("{:013}-{}.json", job.created_ms, safe_id);
        let tmp = self
            .dir()
            .join(format!(".tmp-{}-{}", std::process::id(), name));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(job.to_record().as_bytes())?;
            file.sync_all()?;
            let path = self.dir().join(&name);
            fs::rename(&tmp, &path)?;
            Ok(path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Spool files, oldest first. A missing directory is an empty spool.
    pub fn entries(&self) -> io::Result<Vec<PathBuf>> {
        let read = match fs::read_dir(self.dir()) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut files: Vec<PathBuf> = read
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(".json"))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Whether the spool holds at least one record (stops at the first one found; a
    /// missing or unreadable directory holds none).
    pub fn holds_records(&self) -> bool {
        fs::read_dir(self.dir()).is_ok_and(|mut read| {
            read.any(|entry| {
                entry.is_ok_and(|entry| {
                    entry
                        .file_name()
                        .to_str()
                        .is_some_and(|n| !n.starts_with('.') && n.ends_with(".json"))
                })
            })
        })
    }

    pub fn load(path: &Path) -> Result<Job, String> {
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        Job::from_record(&text)
    }

    pub fn remove(path: &Path) {
        let _ = fs::remove_file(path);
    }

    fn created_ms(path: &Path) -> Option<u64> {
        path.file_name()?.to_str()?.split('-').next()?.parse().ok()
    }

    /// Drop files older than `max_age`, then the oldest until the total fits `max_size`.
    pub fn enforce_limits(&self) -> io::Result<Dropped> {
        let mut dropped = Dropped::default();
        let now = now_ms();
        let max_age_ms = self.settings.max_age.as_millis() as u64;
        let mut kept = Vec::new();
        for path in self.entries()? {
            let old = Self::created_ms(&path).is_some_and(|t| now.saturating_sub(t) > max_age_ms);
            if old && fs::remove_file(&path).is_ok() {
                dropped.too_old += 1;
                continue;
            }
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::test_job;
    use std::time::Duration;

    fn spool(dir: &Path, max_size: u64) -> Spool {
        Spool::new(SpoolSettings {
            dir: dir.join("spool"),
            max_size,
            max_age: Duration::from_secs(3600),
            retry_interval: Duration::from_secs(30),
        })
    }

    #[test]
    fn store_list_load_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = spool(tmp.path(), 1 << 20);
        assert!(spool.entries().unwrap().is_empty(), "missing dir is empty");
        let mut first = test_job("aaa", "http://127.0.0.1:9/");
        first.created_ms -= 10;
        spool.store(&first).unwrap();
        spool
            .store(&test_job("bbb", "http://127.0.0.1:9/"))
            .unwrap();
        let mode = fs::metadata(spool.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777);
        let entries = spool.entries().unwrap();
        assert_eq!(entries.len(), 2);
        let file_mode = fs::metadata(&entries[0]).unwrap().permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);
        assert_eq!(Spool::load(&entries[0]).unwrap().event_id, "aaa");
        Spool::remove(&entries[0]);
        assert_eq!(spool.entries().unwrap().len(), 1);
    }

    #[test]
    fn limits_drop_oldest_and_too_old() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = spool(tmp.path(), 1);
        let mut ancient = test_job("old", "http://127.0.0.1:9/");
        ancient.created_ms -= 2 * 3600 * 1000;
        spool.store(&ancient).unwrap();
        for id in ["a", "b", "c"] {
            spool.store(&test_job(id, "http://127.0.0.1:9/")).unwrap();
        }
        let dropped = spool.enforce_limits().unwrap();
        assert_eq!(dropped.too_old, 1);
        assert_eq!(dropped.over_size, 3);
        assert!(spool.entries().unwrap().is_empty());
    }
}
