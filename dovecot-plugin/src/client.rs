//! The plugin's side of the sender service: hand a record over without ever waiting.
//!
//! The service listens on `<base_dir>/dovepush` (its `unix_listener`). The plugin
//! connects at its first event (non-blocking) and writes one record per line
//! ([`dovepush_protocol::record`]); it keeps each record until the service acknowledges
//! it, reading acknowledgements without waiting whenever it hands over the next record
//! and at exit. When the socket cannot take a record at once (full, unreachable, the
//! service gone), the record goes to the drop spool instead, and so do the records the
//! service had not acknowledged when its connection broke. The service drops repeats
//! (same event, same endpoint), so a record that reaches it twice is sent once.
//!
//! Nothing here blocks, forks, starts a thread or touches the network.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovepush_protocol::record::{AckReader, Record};

/// The service's socket name under `base_dir`: the `unix_listener` of `service dovepush`.
pub const SOCKET_NAME: &str = "dovepush";
/// The drop directory under `dovepush_spool_dir`.
pub const DROP_DIR: &str = "drop";
/// After a failed connect, how long records go straight to the drop spool.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Where a record went.
#[derive(Debug)]
pub enum Handed {
    /// Written to the service's socket.
    Socket,
    /// Written to the drop spool (`why`: what kept it from the socket).
    Dropped { path: PathBuf, why: String },
    /// Neither worked: the event is lost.
    Lost { why: String },
}

/// A record written and not yet acknowledged.
struct Pending {
    seq: u64,
    record: Record,
    drop_dir: Arc<PathBuf>,
}

struct Connection {
    stream: UnixStream,
    /// The last record number written.
    written: u64,
    pending: VecDeque<Pending>,
    acks: AckReader,
}

/// The plugin's handle to the service (one per process).
pub struct ServiceClient {
    conn: Option<Connection>,
    /// No connect attempts before this (the service was unreachable).
    reconnect_at: Option<Instant>,
    /// Records at most awaiting acknowledgement before new ones go to the drop spool.
    max_pending: usize,
    buf: Vec<u8>,
}

/// Why records went to the drop spool, and where each one went.
pub type Spilled = Vec<Handed>;

impl ServiceClient {
    pub fn new(max_pending: usize) -> ServiceClient {
        ServiceClient {
            conn: None,
            reconnect_at: None,
            max_pending: max_pending.max(1),
            buf: Vec::with_capacity(1024),
        }
    }

    /// `dovepush_queue_size`: records at most awaiting acknowledgement.
    pub fn set_max_pending(&mut self, max_pending: usize) {
        self.max_pending = max_pending.max(1);
    }

    /// Records written and not acknowledged yet.
    pub fn pending(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.pending.len())
    }

    /// Hand `record` to the service at `socket`, or to `drop_dir`. Also returns what
    /// happened to earlier records a broken connection left unacknowledged.
    pub fn submit(
        &mut self,
        socket: &Path,
        drop_dir: &Arc<PathBuf>,
        record: Record,
    ) -> (Handed, Spilled) {
        let mut spilled = self.read_acks();
        if self.conn.is_none() {
            if let Err(why) = self.connect(socket) {
                return (spill(drop_dir, &record, why), spilled);
            }
        }
        let conn = self.conn.as_mut().expect("connected");
        if conn.pending.len() >= self.max_pending {
            let why = format!(
                "{} events wait for the sender service (dovepush_queue_size)",
                conn.pending.len()
            );
            return (spill(drop_dir, &record, why), spilled);
        }
        self.buf.clear();
        self.buf.extend_from_slice(record.encode().as_bytes());
        self.buf.push(b'\n');
        match conn.stream.write(&self.buf) {
            Ok(n) if n == self.buf.len() => {
                conn.written += 1;
                let seq = conn.written;
                conn.pending.push_back(Pending {
                    seq,
                    record,
                    drop_dir: drop_dir.clone(),
                });
                (Handed::Socket, spilled)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let why = "the sender service's socket is full".to_string();
                (spill(drop_dir, &record, why), spilled)
            }
            Ok(_) => {
                // A torn line: the service discards it with the connection.
                spilled.extend(self.lose_connection("a record was only partly written"));
                (
                    spill(drop_dir, &record, "a record was only partly written".into()),
                    spilled,
                )
            }
            Err(e) => {
                let why = format!("the sender service's connection broke ({e})");
                spilled.extend(self.lose_connection(&why));
                (spill(drop_dir, &record, why), spilled)
            }
        }
    }

    /// Take the acknowledgements that arrived (never waits). A closed or broken
    /// connection spills its unacknowledged records to the drop spool.
    pub fn read_acks(&mut self) -> Spilled {
        let Some(conn) = self.conn.as_mut() else {
            return Vec::new();
        };
        let mut bytes = [0u8; 4096];
        loop {
            match conn.stream.read(&mut bytes) {
                Ok(0) => return self.lose_connection("the sender service closed the connection"),
                Ok(n) => match conn.acks.feed(&bytes[..n]) {
                    Ok(seqs) => {
                        for seq in seqs {
                            // Acknowledgements may come out of order (retries, endpoints).
                            if let Some(i) = conn.pending.iter().position(|p| p.seq == seq) {
                                conn.pending.remove(i);
                            }
                        }
                    }
                    Err(e) => {
                        let why = format!("the sender service said something unexpected ({e})");
                        return self.lose_connection(&why);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Vec::new(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = format!("the sender service's connection broke ({e})");
                    return self.lose_connection(&why);
                }
            }
        }
    }

    /// At exit: take the last acknowledgements; a broken connection's records go to the
    /// drop spool. A live connection keeps its records: the service reads them after this
    /// process is gone.
    pub fn finish(&mut self) -> Spilled {
        self.read_acks()
    }

    fn connect(&mut self, socket: &Path) -> Result<(), String> {
        let now = Instant::now();
        if self.reconnect_at.is_some_and(|at| now < at) {
            return Err("the sender service was unreachable a moment ago".into());
        }
        match connect_nonblocking(socket) {
            Ok(stream) => {
                self.reconnect_at = None;
                self.conn = Some(Connection {
                    stream,
                    written: 0,
                    pending: VecDeque::new(),
                    acks: AckReader::default(),
                });
                Ok(())
            }
            Err(e) => {
                self.reconnect_at = Some(now + RECONNECT_AFTER);
                Err(match e.kind() {
                    io::ErrorKind::NotFound => format!(
                        "the sender service's socket {} does not exist (is service dovepush in the Dovecot config?)",
                        socket.display()
                    ),
                    io::ErrorKind::PermissionDenied => format!(
                        "no permission to connect to {} (unix_listener dovepush's mode, user and group must let the mail user in)",
                        socket.display()
                    ),
                    _ => format!("cannot connect to {}: {e}", socket.display()),
                })
            }
        }
    }

    fn lose_connection(&mut self, why: &str) -> Spilled {
        let Some(conn) = self.conn.take() else {
            return Vec::new();
        };
        conn.pending
            .into_iter()
            .map(|p| spill(&p.drop_dir, &p.record, why.to_string()))
            .collect()
    }
}

fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

fn spill(drop_dir: &Path, record: &Record, why: String) -> Handed {
    match write_drop(drop_dir, record) {
        Ok(path) => Handed::Dropped { path, why },
        Err(e) => Handed::Lost {
            why: format!(
                "{why}, and the drop spool {} failed: {e}",
                drop_dir.display()
            ),
        },
    }
}

/// Write `record` into the drop directory: a new temporary dot-file (never following a
/// link, never reusing a name), mode 0640 (the directory's setgid group is the
/// service's), synced, then renamed to the record's name. The directory is the
/// service's: it is never created here.
pub fn write_drop(drop_dir: &Path, record: &Record) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = record.file_name();
    let tmp = drop_dir.join(format!(
        ".tmp-{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        e.kind(),
                        "it does not exist (the sender service creates it when it starts)",
                    )
                } else {
                    e
                }
            })?;
        // Group-readable whatever the process's umask: the service reads it by group.
        file.set_permissions(fs::Permissions::from_mode(0o640))?;
        file.write_all(record.encode().as_bytes())?;
        file.sync_data()?;
        let path = drop_dir.join(&name);
        fs::rename(&tmp, &path)?;
        Ok(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use dovepush_protocol::notification::{EventKind, Notification};
    use dovepush_protocol::record::encode_ack;
    use std::os::unix::net::UnixListener;

    fn record(id: &str) -> Record {
        Record::new(
            id.into(),
            "alice".into(),
            "alice".into(),
            1_700_000_000_000,
            Notification {
                user: "alice".into(),
                event: EventKind::MessageNew,
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: 3,
                from: None,
                subject: None,
                snippet: None,
                unseen: None,
                time_ms: None,
            },
        )
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        socket: PathBuf,
        drop: Arc<PathBuf>,
    }

    fn setup() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let drop = tmp.path().join("drop");
        fs::create_dir(&drop).unwrap();
        Setup {
            socket: tmp.path().join("dovepush"),
            drop: Arc::new(drop),
            _tmp: tmp,
        }
    }

    fn dropped(drop: &Path) -> Vec<Record> {
        let mut names: Vec<PathBuf> = fs::read_dir(drop)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| Record::decode(&fs::read(p).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn records_go_to_the_socket_and_leave_once_acknowledged() {
        let s = setup();
        let listener = UnixListener::bind(&s.socket).unwrap();
        let mut client = ServiceClient::new(100);
        let (handed, spilled) = client.submit(&s.socket, &s.drop, record("a1"));
        assert!(matches!(handed, Handed::Socket) && spilled.is_empty());
        client.submit(&s.socket, &s.drop, record("a2"));
        let (mut service, _) = listener.accept().unwrap();
        let mut text = String::new();
        let mut byte = [0u8; 1];
        while text.matches('\n').count() < 2 {
            service.read_exact(&mut byte).unwrap();
            text.push(byte[0] as char);
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(Record::decode(lines[1].as_bytes()).unwrap(), record("a2"));
        assert_eq!(client.pending(), 2);
        let mut acks = Vec::new();
        encode_ack(2, &mut acks);
        service.write_all(&acks).unwrap();
        assert!(client.read_acks().is_empty());
        assert_eq!(client.pending(), 1, "record 1 still waits");
        // The service goes away: what it did not acknowledge goes to the drop spool.
        drop(service);
        drop(listener);
        let spilled = client.finish();
        assert_eq!(spilled.len(), 1);
        assert_eq!(dropped(&s.drop), [record("a1")]);
        // No temporary file is left, and the file is group-readable.
        let mode = fs::metadata(s.drop.join(record("a1").file_name()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn without_a_service_records_go_to_the_drop_spool() {
        let s = setup();
        let mut client = ServiceClient::new(100);
        let (handed, _) = client.submit(&s.socket, &s.drop, record("b1"));
        match handed {
            Handed::Dropped { why, .. } => assert!(why.contains("does not exist"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(dropped(&s.drop), [record("b1")]);
    }

    #[test]
    fn a_full_queue_or_missing_drop_dir() {
        let s = setup();
        let _listener = UnixListener::bind(&s.socket).unwrap();
        let mut client = ServiceClient::new(1);
        client.submit(&s.socket, &s.drop, record("c1"));
        let (handed, _) = client.submit(&s.socket, &s.drop, record("c2"));
        assert!(
            matches!(&handed, Handed::Dropped { why, .. } if why.contains("dovepush_queue_size")),
            "{handed:?}"
        );
        let nowhere = Arc::new(s.drop.join("missing"));
        let mut lonely = ServiceClient::new(1);
        let (handed, _) = lonely.submit(&s.socket.with_file_name("none"), &nowhere, record("c3"));
        assert!(
            matches!(&handed, Handed::Lost { why } if why.contains("sender service creates it")),
            "{handed:?}"
        );
    }

    #[test]
    fn a_socket_that_cannot_take_more_spills_to_the_drop_spool() {
        let s = setup();
        let _listener = UnixListener::bind(&s.socket).unwrap();
        let mut client = ServiceClient::new(1_000_000);
        let mut spilled = 0;
        for i in 0..20_000 {
            let (handed, _) = client.submit(&s.socket, &s.drop, record(&format!("d{i}")));
            if let Handed::Dropped { why, .. } = handed {
                assert!(why.contains("full"), "{why}");
                spilled += 1;
                break;
            }
        }
        assert_eq!(spilled, 1, "the socket buffer filled and nothing blocked");
    }
}
