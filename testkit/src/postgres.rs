//! A private, real PostgreSQL for tests and benchmarks, as [`crate::dovecot`] is a private
//! Dovecot: `initdb` into a temp dir, the server on a free loopback port (no Unix socket
//! outside the temp dir), password authentication (SCRAM) for one superuser, stopped on
//! drop. Never a system cluster.
//!
//! PostgreSQL refuses to run as root: as root, the data dir is given to the system user
//! `postgres` (which the Debian package creates; created here if missing) and the server
//! runs as that user. As anyone else it runs as that user.
//!
//! The server is started under a small `sh` guard that reads its standard input, a pipe
//! from this process: when this process ends for any reason (a failed test, `exit`, a
//! kill), the pipe closes and the guard stops the server (fast shutdown) and removes the
//! data dir. So a shared instance held in a `static` does not outlive the test binary.

use std::fs;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The superuser of the private cluster.
pub const USER: &str = "dovepush";
/// Its password (test-only).
pub const PASSWORD: &str = "dovepush-test-password";

/// How to set up the private PostgreSQL.
#[derive(Debug, Clone)]
pub struct Options {
    /// `fsync` of the server. Off by default: tests check what the receiver commits, not
    /// the disk (and share it with other builds). Benchmarks turn it on.
    pub fsync: bool,
    /// `max_connections`.
    pub max_connections: u32,
    /// Extra `-c name=value` server settings.
    pub settings: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: false,
            max_connections: 300,
            settings: Vec::new(),
        }
    }
}

/// The private PostgreSQL of this test binary, started at the first call (its tests each
/// take a database of their own: [`Postgres::fresh_database`]). It stops when the binary
/// ends (see the module's note on the guard).
pub fn shared() -> &'static Postgres {
    static SHARED: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| Postgres::start().expect("a private PostgreSQL for the tests"))
}

/// A running private PostgreSQL.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    options: Options,
    bin: PathBuf,
    /// The uid and gid the server runs as (`None`: ours).
    owner: Option<(u32, u32)>,
    guard: Option<(Child, ChildStdin)>,
}

/// The directory with `initdb` and `postgres`: `$DOVEPUSH_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DOVEPUSH_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            io::Error::other(format!(
                "/usr/lib/postgresql: {e} (install the Debian package postgresql, or set \
                 DOVEPUSH_PG_BIN to the directory holding initdb and postgres)"
            ))
        })?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::other("no /usr/lib/postgresql/*/bin/initdb: install the package postgresql")
    })
}

impl Postgres {
    /// `initdb` and start with the default options.
    pub fn start() -> io::Result<Postgres> {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> io::Result<Postgres> {
        let bin = bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let owner = if root {
            Some(crate::dovecot::system_user("postgres")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("dovepush-pg-").tempdir()?;
        fs::create_dir(dir.path().join("data"))?;
        fs::create_dir(dir.path().join("socket"))?;
        fs::write(dir.path().join("pwfile"), format!("{PASSWORD}\n"))?;
        if let Some((uid, gid)) = owner {
            for p in ["", "data", "socket", "pwfile"] {
                std::os::unix::fs::chown(dir.path().join(p), Some(uid), Some(gid))?;
            }
        }
        fs::set_permissions(
            dir.path().join("data"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", USER, "--auth=scram-sha-256", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"])
            .arg(format!("--pwfile={}", dir.path().join("pwfile").display()))
            .current_dir(dir.path())
            .stdin(Stdio::null());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut pg = Postgres {
            dir,
            port: 0,
            options,
            bin,
            owner,
            guard: None,
        };
        // The port was free a moment ago; another process may take it first.
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port();
            match pg.launch() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("postgres did not start")))
    }

    fn launch(&mut self) -> io::Result<()> {
        let data = self.dir.path().join("data");
        let log = self.log_path();
        let mut args: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!("port={}", self.port),
            "-c".into(),
            format!(
                "unix_socket_directories={}",
                self.dir.path().join("socket").display()
            ),
            "-c".into(),
            format!("fsync={}", if self.options.fsync { "on" } else { "off" }),
            "-c".into(),
            format!("max_connections={}", self.options.max_connections),
        ];
        for (k, v) in &self.options.settings {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        // The guard: runs the server and waits on its input. A line `stop` (from
        // [`Postgres::stop`]) stops the server (SIGINT = fast shutdown) and keeps the data
        // for a restart; end of input without it (this process died) also removes the
        // temp dir, which nobody else would.
        let script = r#"dir="$1"; log="$2"; shift 2; "$@" >>"$log" 2>&1 & pid=$!
            trap 'kill -INT $pid 2>/dev/null' TERM
            while read -r line; do [ "$line" = stop ] && break; done
            kill -INT $pid 2>/dev/null; wait $pid
            [ "$line" = stop ] || rm -rf "$dir""#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("pg-guard")
            .arg(self.dir.path())
            .arg(&log)
            .arg(self.bin.join("postgres"))
            .args(&args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in the test's process group: a Ctrl-C reaches the guard only through
            // the pipe.
            .process_group(0);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        self.guard = Some((child, stdin));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready() {
                return Ok(());
            }
            if let Some((child, _)) = self.guard.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.guard = None;
                    return Err(io::Error::other(format!(
                        "postgres exited ({status}) on port {}:\n{}",
                        self.port,
                        self.log()
                    )));
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(io::Error::other(format!(
                    "postgres not ready on port {} within 30 s:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server accepts connections.
    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The temp dir (data dir, log, password file).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A file holding [`PASSWORD`] (readable by anyone: tests only).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("pwfile")
    }

    /// `postgresql://USER@127.0.0.1:PORT/<database>` (the password is not in it).
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL with `psql` as the superuser in `database`; returns its output
    /// (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates an empty database named `name` (letters, digits, `_`).
    pub fn create_database(&self, name: &str) -> io::Result<()> {
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "database name {name:?}"
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .map(|_| ())
    }

    /// Creates a database no one else uses (`<prefix>_<pid>_<n>`); returns its name.
    pub fn fresh_database(&self, prefix: &str) -> io::Result<String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}_{}_{n}", std::process::id());
        self.create_database(&name)?;
        Ok(name)
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits for it.
    pub fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.guard.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same port and data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                // The port may still be in TIME_WAIT use for a moment.
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Whether the server runs (as far as the guard knows).
    pub fn running(&self) -> bool {
        self.guard.is_some()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let _ = writeln!(
                io::stderr(),
                "--- postgres log ---\n{}--- end ---",
                self.log()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_stops() {
        let mut pg = Postgres::start().expect("private postgres");
        pg.create_database("t1").unwrap();
        assert_eq!(pg.psql("t1", "SELECT 40 + 2").unwrap(), "42");
        assert_eq!(pg.psql("t1", "SHOW fsync").unwrap(), "off");
        pg.restart().unwrap();
        assert_eq!(pg.psql("t1", "SELECT 1").unwrap(), "1");
        let port = pg.port;
        drop(pg);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
