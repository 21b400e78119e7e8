//! The sender process: where the background sender ([`crate::sender`]) runs, and the
//! handle a Dovecot process holds to it.
//!
//! Why a process and not a thread: lmtp switches its effective uid and groups around
//! every delivery (six `setresuid` and one `setgroups` calls per delivery, counted), and
//! glibc makes those calls process-wide by signalling every other thread and waiting
//! until each one has switched too. With one idle sender thread in lmtp that cost 15 % of
//! the delivery rate and +1.2 ms at p99, measured on deliveries that sent nothing. A
//! child process has its own credentials, so lmtp stays single-threaded and pays nothing.
//!
//! The plugin forks the sender process at its first notification (on Dovecot's thread,
//! while the process is single-threaded). The child leaves everything of Dovecot's
//! behind at once: default signal handlers (SIGTERM, SIGINT, SIGHUP and SIGPIPE
//! ignored), every inherited descriptor closed but its socket, a process group of its
//! own, nice 10 (it yields the CPU to deliveries), `/` as working directory, the name
//! `dovepush-send`, and the real uid and gid of the Dovecot process (lmtp's root, not
//! whichever mail user's delivery started it). It never calls into Dovecot and ends
//! with `_exit`.
//!
//! The two talk over a `SOCK_SEQPACKET` socket pair, one message per frame:
//! - Dovecot → sender: `C` + a context (JSON: endpoint, spool, debug; once per context),
//!   `J` + a job (its context's id and its own fields, NUL-separated), `F` (forget the
//!   contexts), `S` + the flush time in ms (stop);
//! - sender → Dovecot: `L` + a level letter + a log line, written to Dovecot's log by
//!   Dovecot's thread as they arrive (the plugin watches the socket in Dovecot's root
//!   ioloop), and at each hook and at deinit.
//!
//! Handing a job over is one non-blocking `send` (two for the first job of a context);
//! when the socket and the sender's queue (`dovepush_queue_size`) are full, or the
//! sender is gone, the caller spools the job instead. When the Dovecot process exits
//! without saying stop (killed), the sender sees the socket close, gives its in-flight
//! jobs their timeout and spools the rest. An idle sender sleeps: nothing in it polls.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

use dovepush_ffi::LogLevel;

use crate::config::{Endpoint, SpoolSettings, DEFAULT_TIMEOUT};
use crate::job::Job;
use crate::sender::{self, Input, LogLine, LogQueue, Submission};
use crate::spool::Spool;

/// Largest frame either side reads; jobs are far smaller (bodies are cut to a few KiB).
const MAX_FRAME: usize = 256 * 1024;
/// Contexts a Dovecot process defines in its sender before it has it forget them all.
const MAX_CONTEXTS: usize = 256;
/// When the socket is full, how soon the sender tries again to pass its log lines back.
const LOG_RETRY: Duration = Duration::from_millis(50);
/// Beyond the flush time, how long deinit waits for the sender's last lines.
const EXIT_GRACE: Duration = Duration::from_secs(2);
const PROCESS_NAME: &[u8] = b"dovepush-send\0";
/// The sender's nice value: background work that yields the CPU to deliveries when they
/// compete for it (on an idle machine it runs at once all the same).
const SENDER_NICE: libc::c_int = 10;

/// A frame from the Dovecot process to the sender.
#[derive(Debug)]
enum ToSender {
    /// What jobs of context `id` share: the endpoint, the spool, `dovepush_debug`.
    Context {
        id: u32,
        context: Context,
    },
    Job {
        context: u32,
        job: RawJob,
    },
    /// Forget every context (the Dovecot process defines new ones from id 0).
    Forget,
    Stop(Duration),
}

/// The per-endpoint part of a job, sent once per sender process rather than with every
/// job (parsing the URL and the spool settings again per job was a fifth of the
/// sender's CPU time).
#[derive(Debug, Clone)]
struct Context {
    endpoint: Arc<Endpoint>,
    spool: Arc<Spool>,
    debug: bool,
}

impl Context {
    fn of(submission: &Submission) -> Context {
        Context {
            endpoint: submission.job.endpoint.clone(),
            spool: submission.spool.clone(),
            debug: submission.debug,
        }
    }

    /// The same endpoint, spool and debug setting (the same `Arc`s, or equal ones).
    fn serves(&self, submission: &Submission) -> bool {
        self.is(
            &submission.job.endpoint,
            &submission.spool,
            submission.debug,
        )
    }

    fn is(&self, endpoint: &Arc<Endpoint>, spool: &Arc<Spool>, debug: bool) -> bool {
        self.debug == debug
            && (Arc::ptr_eq(&self.endpoint, endpoint) || *self.endpoint == **endpoint)
            && (Arc::ptr_eq(&self.spool, spool) || self.spool.settings == spool.settings)
    }

    fn submission(&self, job: RawJob) -> Submission {
        Submission {
            job: Job {
                event_id: job.event_id,
                user: job.user,
                endpoint: self.endpoint.clone(),
                body: job.body,
                created_ms: job.created_ms,
            },
            spool: self.spool.clone(),
            debug: self.debug,
        }
    }
}

/// A job's own fields, as a job frame carries them.
#[derive(Debug, PartialEq)]
struct RawJob {
    created_ms: u64,
    event_id: String,
    user: String,
    body: String,
}

fn encode_context(id: u32, context: &Context) -> Vec<u8> {
    let endpoint = &context.endpoint;
    let spool = &context.spool.settings;
    let json = serde_json::json!({
        "id": id,
        "url": endpoint.url,
        "max_retries": endpoint.max_retries,
        "timeout_ms": endpoint.timeout.as_millis() as u64,
        "debug": context.debug,
        "spool_dir": spool.dir.to_string_lossy(),
        "spool_max_size": spool.max_size,
        "spool_max_age_ms": spool.max_age.as_millis() as u64,
        "spool_retry_ms": spool.retry_interval.as_millis() as u64,
    });
    let mut frame = b"C".to_vec();
    frame.extend_from_slice(json.to_string().as_bytes());
    frame
}

/// `J` context NUL created_ms NUL event id NUL user NUL body: none of the fields holds a
/// NUL (a Dovecot user name is a C string; serialized JSON escapes control characters).
fn encode_job(context: u32, job: &Job) -> Vec<u8> {
    let mut frame = Vec::with_capacity(48 + job.event_id.len() + job.user.len() + job.body.len());
    frame.push(b'J');
    for field in [
        context.to_string().as_bytes(),
        b"\0",
        job.created_ms.to_string().as_bytes(),
        b"\0",
        job.event_id.as_bytes(),
        b"\0",
        job.user.as_bytes(),
        b"\0",
        job.body.as_bytes(),
    ] {
        frame.extend_from_slice(field);
    }
    frame
}

fn encode_stop(flush: Duration) -> Vec<u8> {
    format!("S{}", flush.as_millis()).into_bytes()
}

fn decode_to_sender(frame: &[u8]) -> Result<ToSender, String> {
    let (&kind, rest) = frame.split_first().ok_or("empty frame")?;
    let text = std::str::from_utf8(rest).map_err(|_| "frame is not UTF-8")?;
    match kind {
        b'F' if text.is_empty() => Ok(ToSender::Forget),
        b'S' => text
            .parse::<u64>()
            .map(|ms| ToSender::Stop(Duration::from_millis(ms)))
            .map_err(|_| format!("bad stop frame {text:?}")),
        b'J' => {
            let mut fields = text.splitn(5, '\0');
            let mut next = |name: &str| fields.next().ok_or(format!("job field {name} is missing"));
            let context = next("context")?;
            let context = context
                .parse()
                .map_err(|_| format!("bad job context {context:?}"))?;
            let created_ms = next("created_ms")?;
            let created_ms = created_ms
                .parse()
                .map_err(|_| format!("bad job time {created_ms:?}"))?;
            let job = RawJob {
                created_ms,
                event_id: next("event id")?.to_string(),
                user: next("user")?.to_string(),
                body: next("body")?.to_string(),
            };
            Ok(ToSender::Job { context, job })
        }
        b'C' => {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("context is not JSON ({e})"))?;
            let number = |name: &str| {
                v[name]
                    .as_u64()
                    .ok_or_else(|| format!("context field {name} is missing"))
            };
            let endpoint = Endpoint::parse(
                "sender context url",
                v["url"].as_str().ok_or("context url is missing")?,
                number("max_retries")? as u32,
                Duration::from_millis(number("timeout_ms")?),
                false,
            )
            .map_err(|e| e.to_string())?;
            let spool = SpoolSettings {
                dir: PathBuf::from(v["spool_dir"].as_str().ok_or("spool_dir is missing")?),
                max_size: number("spool_max_size")?,
                max_age: Duration::from_millis(number("spool_max_age_ms")?),
                retry_interval: Duration::from_millis(number("spool_retry_ms")?),
            };
            Ok(ToSender::Context {
                id: number("id")? as u32,
                context: Context {
                    endpoint: Arc::new(endpoint),
                    spool: Arc::new(Spool::new(spool)),
                    debug: v["debug"].as_bool().unwrap_or(false),
                },
            })
        }
        other => Err(format!("unknown frame kind {other:#x}")),
    }
}

fn encode_log(line: &LogLine) -> Vec<u8> {
    let level = match line.level {
        LogLevel::Debug => b'd',
        LogLevel::Info => b'i',
        LogLevel::Warning => b'w',
        LogLevel::Error => b'e',
    };
    let mut frame = vec![b'L', level];
    frame.extend_from_slice(line.text.as_bytes());
    frame
}

fn decode_log(frame: &[u8]) -> Option<LogLine> {
    let (kind, level, text) = match frame {
        [kind, level, text @ ..] => (*kind, *level, text),
        _ => return None,
    };
    if kind != b'L' {
        return None;
    }
    let level = match level {
        b'd' => LogLevel::Debug,
        b'i' => LogLevel::Info,
        b'w' => LogLevel::Warning,
        _ => LogLevel::Error,
    };
    Some(LogLine {
        level,
        text: String::from_utf8_lossy(text).into_owned(),
    })
}

/// Why [`Sender::submit`] gave a job back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The sender's queue is full.
    Full,
    /// The sender process is gone (it is restarted at the next job).
    Gone(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full => f.write_str("the send queue is full"),
            Refused::Gone(why) => write!(f, "the sender process is gone ({why})"),
        }
    }
}

// --- thin wrappers over the socket calls both sides use -------------------------------

fn send_frame(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `frame` is a valid buffer for its length; `fd` is an open socket.
        let n = unsafe {
            libc::send(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// One frame into `buf`: `Ok(None)` at end of stream, `Err(WouldBlock)` when none waits.
fn recv_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is a valid writable buffer for its length; `fd` is an open socket.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n > 0 {
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other(format!("a frame of {n} bytes was cut")));
            }
            return Ok(Some(n));
        }
        if n == 0 {
            return Ok(None);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Wait up to `timeout` for `events` on `fd`.
fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Duration) {
    let mut pollfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd; an EINTR return is just an early wake-up.
    unsafe {
        libc::poll(&mut pollfd, 1, ms);
    }
}

// --- the Dovecot side -------------------------------------------------------------------

/// Dovecot's handle to its sender process.
pub struct Sender {
    socket: OwnedFd,
    pid: libc::pid_t,
    gone: bool,
    buf: Vec<u8>,
    /// The contexts the sender process knows, by id (their index).
    contexts: Vec<Context>,
}

impl Sender {
    /// Fork the sender process. Call on Dovecot's thread.
    pub fn start(queue_size: usize) -> io::Result<Sender> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair succeeded, so both descriptors are open and ours alone.
        let (mine, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the plugin never starts threads in the Dovecot process, so the child is a
        // copy of a single-threaded process; it runs only `child_main`, which never returns.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => child_main(theirs.as_raw_fd(), queue_size),
            pid => Ok(Sender {
                socket: mine,
                pid,
                gone: false,
                buf: vec![0; MAX_FRAME],
                contexts: Vec::new(),
            }),
        }
    }

    /// The sender process's pid (for diagnostics and measurements).
    /// The socket the sender passes its log lines back on (to watch for them).
    pub fn log_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Whether the sender process has been seen gone; the caller starts a new one.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// Hand a job over without waiting; `Err` means the caller must spool it.
    pub fn submit(&mut self, submission: &Submission) -> Result<(), Refused> {
        if self.gone {
            return Err(Refused::Gone("it exited earlier".into()));
        }
        let context = match self.contexts.iter().position(|c| c.serves(submission)) {
            Some(id) => id,
            None => self.add_context(Context::of(submission))?,
        };
        self.send(&encode_job(context as u32, &submission.job))
    }

    /// Name an endpoint and its spool without a job: the sender replays the records for
    /// it that the spool holds (a new process does this at its first delivery when its
    /// spool is not empty, whoever the delivery is for).
    pub fn announce(
        &mut self,
        endpoint: &Arc<Endpoint>,
        spool: &Arc<Spool>,
        debug: bool,
    ) -> Result<(), Refused> {
        if self.gone {
            return Err(Refused::Gone("it exited earlier".into()));
        }
        if !self.contexts.iter().any(|c| c.is(endpoint, spool, debug)) {
            self.add_context(Context {
                endpoint: endpoint.clone(),
                spool: spool.clone(),
                debug,
            })?;
        }
        Ok(())
    }

    fn add_context(&mut self, context: Context) -> Result<usize, Refused> {
        // Per-user receiver URLs could make these many: start over now and then.
        if self.contexts.len() >= MAX_CONTEXTS {
            self.send(b"F")?;
            self.contexts.clear();
        }
        let id = self.contexts.len();
        self.send(&encode_context(id as u32, &context))?;
        self.contexts.push(context);
        Ok(id)
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), Refused> {
        match send_frame(self.socket.as_raw_fd(), frame) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Refused::Full),
            Err(e) => {
                self.gone = true;
                Err(Refused::Gone(e.to_string()))
            }
        }
    }

    /// The log lines the sender passed back so far.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        let mut lines = Vec::new();
        let fd = self.socket.as_raw_fd();
        while !self.gone {
            match recv_frame(fd, &mut self.buf) {
                Ok(Some(n)) => lines.extend(decode_log(&self.buf[..n])),
                Ok(None) => self.gone = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.gone = true,
            }
        }
        lines
    }

    /// Tell the sender to stop with `flush` for its in-flight jobs (it spools the rest),
    /// and wait for it a little longer than that. Returns its last log lines.
    pub fn shutdown(mut self, flush: Duration) -> Vec<LogLine> {
        let deadline = Instant::now() + flush + EXIT_GRACE;
        let fd = self.socket.as_raw_fd();
        let mut lines = Vec::new();
        let stop = encode_stop(flush);
        while !self.gone {
            match send_frame(fd, &stop) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // Closing the socket stops it too, after its queue.
                        break;
                    }
                    lines.extend(self.take_logs());
                    poll_fd(fd, libc::POLLOUT, left.min(Duration::from_millis(50)));
                }
                Err(_) => self.gone = true,
            }
        }
        while !self.gone {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            poll_fd(fd, libc::POLLIN, left);
            lines.extend(self.take_logs());
        }
        self.reap(Duration::from_millis(200));
        lines
    }

    /// Collect the exited child, waiting up to `wait` for it to exit.
    fn reap(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let mut status = 0;
            // SAFETY: waits only for our own child, without blocking.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc != 0 || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // The socket closes after this: a sender still running flushes and exits on its
        // own. Collect it if it is already gone.
        self.reap(Duration::ZERO);
    }
}

// --- the sender process side ------------------------------------------------------------

/// The child's whole life: leave Dovecot's state behind, serve, `_exit`. Nothing may
/// unwind out of here: the frames above are Dovecot's, in a process that is not lmtp.
fn child_main(socket: RawFd, queue_size: usize) -> ! {
    let served = std::panic::catch_unwind(|| {
        // SAFETY: this is the fresh single-threaded child, before anything else ran.
        let socket = unsafe { leave_dovecot(socket) };
        serve(socket, queue_size);
    });
    // SAFETY: ends the child without running the Dovecot process's exit handlers.
    unsafe { libc::_exit(if served.is_ok() { 0 } else { 70 }) }
}

/// Reset what the child inherited from Dovecot. Returns the socket, moved to fd 3.
///
/// # Safety
/// Only in the freshly forked, single-threaded child, before anything else runs.
unsafe fn leave_dovecot(socket: RawFd) -> OwnedFd {
    // SAFETY (whole block): plain process-state syscalls on our own process and
    // descriptors; the caller guarantees we are the fresh single-threaded child.
    unsafe {
        // Dovecot's handlers write to Dovecot's signal pipe, which is about to close.
        for signal in 1..libc::SIGRTMIN() {
            libc::signal(signal, libc::SIG_DFL);
        }
        // Stop and kill signals meant for Dovecot must not lose queued jobs: the sender
        // exits when the Dovecot process's end of the socket closes.
        for signal in [libc::SIGPIPE, libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(signal, libc::SIG_IGN);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        // Descriptors: the socket at 3, /dev/null at 0-2 (an MTA may wait for the end of
        // dovecot-lda's output), every other one closed (Dovecot's connections, index
        // files, log pipe, epoll).
        const SOCKET_FD: RawFd = 3;
        if socket != SOCKET_FD {
            libc::dup2(socket, SOCKET_FD);
        }
        libc::syscall(libc::SYS_close_range, SOCKET_FD + 1, libc::c_uint::MAX, 0);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > SOCKET_FD {
                libc::close(null);
            }
        }
        let flags = libc::fcntl(SOCKET_FD, libc::F_GETFL);
        libc::fcntl(SOCKET_FD, libc::F_SETFL, flags | libc::O_NONBLOCK);

        // A process group of its own (signals to Dovecot's group are not for it), but the
        // same session: the scheduler groups processes by session (autogroup), and in
        // Dovecot's group the nice value below ranks it after the deliveries.
        libc::setpgid(0, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, SENDER_NICE);
        // Do not pin whatever directory lmtp was in (a mail home, a file system).
        libc::chdir(c"/".as_ptr());
        libc::prctl(libc::PR_SET_NAME, PROCESS_NAME.as_ptr());

        // lmtp switched to some mail user for the delivery that started us: take back
        // the process's real identity, so the sender is the same whoever came first.
        let (uid, gid) = (libc::getuid(), libc::getgid());
        if libc::geteuid() != uid || libc::getegid() != gid {
            if uid == 0 {
                libc::setgroups(0, std::ptr::null());
            }
            libc::setresgid(gid, gid, gid);
            libc::setresuid(uid, uid, uid);
        }
        OwnedFd::from_raw_fd(SOCKET_FD)
    }
}

fn serve(socket: OwnedFd, queue_size: usize) {
    let logs = LogQueue::default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            logs.push(LogLevel::Error, format!("sender process: no runtime: {e}"));
            pass_logs(socket.as_raw_fd(), &logs);
            return;
        }
    };
    let raw = socket.as_raw_fd();
    let worked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            // Readable only: frames go out with non-blocking sends, and a writable
            // interest would wake the sender each time Dovecot reads its log lines.
            // SAFETY: an OwnedFd's descriptor stays open and the same until it is dropped.
            let socket =
                match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
                    Ok(socket) => Arc::new(socket),
                    Err(e) => {
                        logs.push(LogLevel::Error, format!("sender process: {e}"));
                        return;
                    }
                };
            let (jobs_tx, jobs_rx) = mpsc::channel(queue_size.max(1));
            let (stop_tx, stop_rx) = oneshot::channel();
            tokio::spawn(read_frames(socket.clone(), jobs_tx, stop_tx, logs.clone()));
            let writer_logs = logs.clone();
            tokio::spawn(async move {
                loop {
                    writer_logs.added().await;
                    // A full socket (Dovecot busy): try again a little later.
                    while !pass_logs(raw, &writer_logs) {
                        tokio::time::sleep(LOG_RETRY).await;
                    }
                }
            });
            if let Err(e) = sender::run(jobs_rx, stop_rx, logs.clone()).await {
                logs.push(LogLevel::Error, format!("sender process: {e}"));
            }
        })
    }));
    if let Err(payload) = worked {
        let text = dovepush_ffi::guard::take_last_panic()
            .unwrap_or_else(|| dovepush_ffi::guard::payload_text(&*payload));
        logs.push(
            LogLevel::Error,
            format!("sender process failed: {text}; its queued events are lost"),
        );
    }
    pass_logs(raw, &logs);
}

/// Send the queued log lines back. Returns false when the socket was full: the rest
/// waits for the next round.
fn pass_logs(fd: RawFd, logs: &LogQueue) -> bool {
    let lines = logs.take();
    for (i, line) in lines.iter().enumerate() {
        match send_frame(fd, &encode_log(line)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                logs.put_back(lines[i..].to_vec());
                return false;
            }
            // The Dovecot process is gone: nobody to tell.
            Err(_) => return true,
        }
    }
    true
}

/// Read frames until stop or the end of the socket, then tell the worker to stop.
async fn read_frames(
    socket: Arc<AsyncFd<OwnedFd>>,
    jobs: mpsc::Sender<Input>,
    stop: oneshot::Sender<Duration>,
    logs: LogQueue,
) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut contexts: HashMap<u32, Context> = HashMap::new();
    // Without a stop frame (the Dovecot process was killed), in-flight jobs get the
    // longest timeout seen.
    let mut flush = DEFAULT_TIMEOUT;
    let flush = loop {
        let Ok(mut guard) = socket.readable().await else {
            break flush;
        };
        let read = match guard.try_io(|fd| recv_frame(fd.as_raw_fd(), &mut buf)) {
            Ok(read) => read,
            Err(_would_block) => continue,
        };
        drop(guard);
        match read {
            Ok(Some(n)) => match decode_to_sender(&buf[..n]) {
                Ok(ToSender::Context { id, context }) => {
                    flush = flush.max(context.endpoint.timeout);
                    let known = Input::Endpoint {
                        endpoint: context.endpoint.clone(),
                        spool: context.spool.clone(),
                    };
                    contexts.insert(id, context);
                    if jobs.send(known).await.is_err() {
                        break flush;
                    }
                }
                Ok(ToSender::Forget) => contexts.clear(),
                Ok(ToSender::Job { context, job }) => {
                    let Some(context) = contexts.get(&context) else {
                        logs.push(
                            LogLevel::Error,
                            format!(
                                "sender process: event {} names unknown context {context}; dropped",
                                job.event_id
                            ),
                        );
                        continue;
                    };
                    if jobs
                        .send(Input::Job(context.submission(job)))
                        .await
                        .is_err()
                    {
                        break flush;
                    }
                }
                Ok(ToSender::Stop(given)) => break given,
                Err(e) => logs.push(LogLevel::Error, format!("sender process: {e}")),
            },
            Ok(None) => break flush,
            Err(e) => {
                logs.push(LogLevel::Error, format!("sender process: {e}"));
                break flush;
            }
        }
    };
    let _ = stop.send(flush);
    // Keep `jobs` open: the worker takes what is queued when it sees the stop.
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::test_job;

    fn submission() -> Submission {
        Submission {
            job: test_job("ev-1", "http://u:p@127.0.0.1:9/notify"),
            spool: Arc::new(Spool::new(SpoolSettings {
                dir: PathBuf::from("/tmp/spool"),
                max_size: 1234,
                max_age: Duration::from_secs(60),
                retry_interval: Duration::from_millis(1500),
            })),
            debug: true,
        }
    }

    #[test]
    fn context_and_job_frames_round_trip() {
        let sent = submission();
        let ToSender::Context { id, context } =
            decode_to_sender(&encode_context(7, &Context::of(&sent))).unwrap()
        else {
            panic!("not a context");
        };
        assert_eq!(id, 7);
        assert_eq!(
            *context.endpoint, *sent.job.endpoint,
            "credentials included"
        );
        assert_eq!(context.spool.settings, sent.spool.settings);
        assert!(context.debug);
        assert!(context.serves(&sent), "an equal endpoint and spool");

        let ToSender::Job { context: n, job } =
            decode_to_sender(&encode_job(7, &sent.job)).unwrap()
        else {
            panic!("not a job");
        };
        assert_eq!(n, 7);
        let got = context.submission(job);
        assert_eq!(got.job.event_id, sent.job.event_id);
        assert_eq!(got.job.user, sent.job.user);
        assert_eq!(got.job.body, sent.job.body);
        assert_eq!(got.job.created_ms, sent.job.created_ms);
        assert!(matches!(decode_to_sender(b"F"), Ok(ToSender::Forget)));
    }

    #[test]
    fn a_context_serves_only_the_same_endpoint_spool_and_debug() {
        let sent = submission();
        let context = Context::of(&sent);
        let mut other = submission();
        other.debug = false;
        assert!(!context.serves(&other));
        let mut other = submission();
        other.job = test_job("ev-2", "http://u:other@127.0.0.1:9/notify");
        assert!(
            !context.serves(&other),
            "another password is another endpoint"
        );
        let mut other = submission();
        other.job = test_job("ev-3", "http://u:p@127.0.0.1:9/notify");
        assert!(context.serves(&other), "another event, same endpoint");
    }

    #[test]
    fn stop_and_log_frames_round_trip() {
        let ToSender::Stop(flush) =
            decode_to_sender(&encode_stop(Duration::from_millis(2500))).unwrap()
        else {
            panic!("not a stop");
        };
        assert_eq!(flush, Duration::from_millis(2500));
        let line = LogLine {
            level: LogLevel::Warning,
            text: "user alice: spooled".into(),
        };
        assert_eq!(decode_log(&encode_log(&line)), Some(line));
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(decode_to_sender(b"").is_err());
        assert!(decode_to_sender(b"Sx").is_err());
        assert!(decode_to_sender(b"J{}").is_err());
        assert!(
            decode_to_sender(b"Jx\x000\x00id\x00u\x00{}").is_err(),
            "bad context id"
        );
        assert!(
            decode_to_sender(b"J1\x000\x00id").is_err(),
            "fields missing"
        );
        assert!(decode_to_sender(b"C{}").is_err());
        assert!(decode_to_sender(b"Q").is_err());
        assert_eq!(decode_log(b"J{}"), None);
    }

    /// Times the process `pid` has gone to sleep so far.
    fn sleeps(pid: libc::pid_t) -> u64 {
        dovepush_testkit::procfs::status_field(pid as u32, "voluntary_ctxt_switches").unwrap()
    }

    #[test]
    fn an_idle_sender_process_does_not_wake_up() {
        let sender = Sender::start(16).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let before = sleeps(sender.pid());
        std::thread::sleep(Duration::from_secs(1));
        let woke = sleeps(sender.pid()) - before;
        // (It used to poll its log queue every 50 ms: 20 wake-ups a second, in every
        // lmtp process's sender.)
        assert!(woke <= 3, "{woke} wake-ups in a second of idleness");
        sender.shutdown(Duration::from_millis(100));
    }

    #[test]
    fn a_sender_replays_what_others_spooled_once_per_retry_interval() {
        let sink = dovepush_testkit::sink::Sink::start();
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_in(spool_dir.path(), Duration::from_millis(400));
        let submission = |id: &str| Submission {
            job: test_job(id, &sink.url(Some("u:p"))),
            spool: spool.clone(),
            debug: false,
        };
        let mut sender = Sender::start(16).unwrap();
        sender.submit(&submission("ev-sent")).unwrap();
        assert_eq!(sink.wait_for(1, Duration::from_secs(5)).len(), 1);
        // Anyone may add files to the spool: a record for a URL this sender was never
        // configured for (here: other credentials) is not sent.
        let forged = spool
            .store(&test_job("ev-forged", &sink.url(Some("someone:else"))))
            .unwrap();
        // The Dovecot process spools a job itself (its sender's queue was full), with
        // nothing else going on in the sender.
        spool
            .store(&submission("ev-spooled-by-dovecot").job)
            .unwrap();
        let got = sink.wait_for(2, Duration::from_secs(5));
        assert!(
            got.iter()
                .any(|r| r.event_id() == Some("ev-spooled-by-dovecot")),
            "not replayed: {:?}",
            got.iter().map(|r| r.event_id()).collect::<Vec<_>>()
        );
        let lines = sender.shutdown(Duration::from_millis(200));
        assert!(
            sink.requests()
                .iter()
                .all(|r| r.event_id() != Some("ev-forged")),
            "a record for an endpoint not configured was sent"
        );
        assert!(forged.exists(), "it stays until the spool's age limit");
        assert!(
            lines.iter().any(|l| l
                .text
                .contains("endpoints this process is not configured for")),
            "log: {lines:?}"
        );
    }

    /// A spool in `dir` with room enough, records kept a minute.
    fn spool_in(dir: &std::path::Path, retry_interval: Duration) -> Arc<Spool> {
        Arc::new(Spool::new(SpoolSettings {
            dir: dir.to_path_buf(),
            max_size: 1 << 20,
            max_age: Duration::from_secs(60),
            retry_interval,
        }))
    }

    /// The event ids of the records in a spool directory.
    fn spooled_ids(dir: &std::path::Path) -> Vec<String> {
        spool_in(dir, Duration::from_secs(1))
            .entries()
            .unwrap()
            .iter()
            .map(|p| Spool::load(p).unwrap().event_id)
            .collect()
    }

    #[test]
    fn retryable_answers_are_retried_then_spooled_and_replayed_with_their_event_id() {
        for status in [500u16, 503, 429, 408] {
            let sink = dovepush_testkit::sink::Sink::start();
            sink.set_status(status);
            let spool_dir = tempfile::tempdir().unwrap();
            let spool = spool_in(spool_dir.path(), Duration::from_millis(300));
            let id = format!("ev-{status}");
            let mut sender = Sender::start(16).unwrap();
            sender
                .submit(&Submission {
                    job: test_job(&id, &sink.url(Some("u:p"))),
                    spool: spool.clone(),
                    debug: false,
                })
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while spooled_ids(spool_dir.path()).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                spooled_ids(spool_dir.path()),
                std::slice::from_ref(&id),
                "{status}"
            );
            // max_retries = 1: the first attempt and one retry.
            assert_eq!(sink.attempts(), 2, "{status}");
            // The receiver recovers: the periodic replay sends it, with the same id.
            sink.set_status(200);
            let got = sink.wait_for(1, Duration::from_secs(5));
            assert_eq!(got.len(), 1, "{status}: not replayed");
            assert_eq!(got[0].event_id(), Some(id.as_str()), "{status}");
            let deadline = Instant::now() + Duration::from_secs(2);
            while !spooled_ids(spool_dir.path()).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(spooled_ids(spool_dir.path()).is_empty(), "{status}");
            sender.shutdown(Duration::from_millis(200));
        }
    }

    #[test]
    fn a_final_answer_is_not_retried_nor_spooled_and_is_logged_with_the_user() {
        let sink = dovepush_testkit::sink::Sink::start();
        sink.set_status(404);
        let spool_dir = tempfile::tempdir().unwrap();
        let mut sub = submission();
        sub.job = test_job("ev-404", &sink.url(Some("u:p")));
        sub.spool = Arc::new(Spool::new(SpoolSettings {
            dir: spool_dir.path().to_path_buf(),
            ..sub.spool.settings.clone()
        }));
        let mut sender = Sender::start(16).unwrap();
        sender.submit(&sub).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.attempts() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let lines = sender.shutdown(Duration::from_millis(500));
        assert_eq!(sink.attempts(), 1);
        assert!(spooled_ids(spool_dir.path()).is_empty());
        assert!(
            lines
                .iter()
                .any(|l| l.text.contains("alice") && l.text.contains("404")),
            "log: {lines:?}"
        );
    }

    #[test]
    fn spool_limits_drop_the_oldest_and_log_the_count() {
        let sink = dovepush_testkit::sink::Sink::start();
        let spool_dir = tempfile::tempdir().unwrap();
        let url = sink.url(Some("u:p"));
        let one = test_job("ev-old-0", &url).to_record().len() as u64;
        let spool = Arc::new(Spool::new(SpoolSettings {
            dir: spool_dir.path().to_path_buf(),
            // Room for two records of this size.
            max_size: 2 * one + one / 2,
            max_age: Duration::from_secs(60),
            retry_interval: Duration::from_secs(30),
        }));
        for i in 0..4 {
            let mut job = test_job(&format!("ev-old-{i}"), &url);
            job.created_ms += i;
            spool.store(&job).unwrap();
        }
        // A new process's first job makes it replay the spool, within its limits.
        let mut sender = Sender::start(16).unwrap();
        sender
            .submit(&Submission {
                job: test_job("ev-new", &url),
                spool: spool.clone(),
                debug: false,
            })
            .unwrap();
        let got = sink.wait_for(3, Duration::from_secs(5));
        let lines = sender.shutdown(Duration::from_millis(200));
        let mut ids: Vec<&str> = got.iter().filter_map(|r| r.event_id()).collect();
        ids.sort();
        assert_eq!(
            ids,
            ["ev-new", "ev-old-2", "ev-old-3"],
            "the newest two are kept"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.text.contains("dropped 0 events older than")
                    && l.text.contains("and 2 beyond the size limit")),
            "log: {lines:?}"
        );
    }

    #[test]
    fn an_announced_endpoint_gets_its_spooled_records_without_a_job() {
        let sink = dovepush_testkit::sink::Sink::start();
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_in(spool_dir.path(), Duration::from_secs(30));
        let left = test_job("ev-left-by-an-earlier-process", &sink.url(Some("u:p")));
        spool.store(&left).unwrap();
        assert!(spool.holds_records());
        let mut sender = Sender::start(16).unwrap();
        sender.announce(&left.endpoint, &spool, false).unwrap();
        sender.announce(&left.endpoint, &spool, false).unwrap();
        assert_eq!(sender.contexts.len(), 1, "named once");
        let got = sink.wait_for(1, Duration::from_secs(5));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event_id(), Some("ev-left-by-an-earlier-process"));
        sender.shutdown(Duration::from_millis(200));
        assert!(!spool.holds_records());
    }

    #[test]
    fn a_sender_process_sends_and_stops() {
        let spool_dir = tempfile::tempdir().unwrap();
        let mut sub = submission();
        sub.spool = Arc::new(Spool::new(SpoolSettings {
            dir: spool_dir.path().to_path_buf(),
            ..sub.spool.settings.clone()
        }));
        // Nothing listens on port 9 (discard): the job fails and is spooled at stop.
        let mut sender = Sender::start(16).unwrap();
        sender.submit(&sub).unwrap();
        let mut second = sub.clone();
        second.job = test_job("ev-2", "http://u:p@127.0.0.1:9/notify");
        sender.submit(&second).unwrap();
        assert_eq!(sender.contexts.len(), 1, "one endpoint, one context");
        let lines = sender.shutdown(Duration::from_millis(300));
        let spooled = std::fs::read_dir(spool_dir.path()).unwrap().count();
        assert_eq!(spooled, 2, "log: {lines:?}");
        assert!(
            lines.iter().any(|l| l.text.contains("spooled")),
            "log: {lines:?}"
        );
    }
}
