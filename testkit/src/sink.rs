//! An HTTP/1.1 notification sink: records every request, answers with a chosen status
//! after a chosen delay, keeps connections alive. Loopback only.
//!
//! It also speaks the dovepush receiver's batch API (`POST …/notify/batch`): each
//! notification of a batch is recorded as if it had come alone (with its event id as
//! the header), and the answer has one result per notification, all with the chosen
//! status. [`Sink::refuse_batches`] makes it answer batches 404, as the OX middleware
//! would.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received: Instant,
}

impl Request {
    /// A header value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn event_id(&self) -> Option<&str> {
        self.header("x-dovepush-event-id")
    }
}

struct Shared {
    requests: Mutex<Vec<Request>>,
    attempts: AtomicU64,
    batches: AtomicU64,
    refuse_batches: AtomicBool,
    status: AtomicU16,
    delay_ms: AtomicU64,
    stop: AtomicBool,
}

pub struct Sink {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Start on a free port.
    pub fn start() -> Sink {
        Self::start_on(0).expect("starting the sink")
    }

    /// Start on `port` (0 = any).
    pub fn start_on(port: u16) -> io::Result<Sink> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            attempts: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            refuse_batches: AtomicBool::new(false),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(stream) = stream {
                    let shared = accept_shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &shared);
                    });
                }
            }
        });
        Ok(Sink {
            port,
            shared,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ox receiver path on this sink, with `credentials` (`user:pass`) if given.
    pub fn url(&self, credentials: Option<&str>) -> String {
        url_for(self.port, credentials)
    }

    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Release);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Release);
    }

    /// Answer batch requests 404 (no batch API).
    pub fn refuse_batches(&self) {
        self.shared.refuse_batches.store(true, Ordering::Release);
    }

    /// Batch requests answered 200.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Acquire)
    }

    /// Every request received, whatever it was answered.
    pub fn attempts(&self) -> u64 {
        self.shared.attempts.load(Ordering::Acquire)
    }

    /// The requests answered with a 2xx status.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Wait until at least `n` requests arrived (or `timeout`); returns all so far.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n || Instant::now() >= deadline {
                return requests;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The ox receiver URL for a sink on `port`.
pub fn url_for(port: u16, credentials: Option<&str>) -> String {
    match credentials {
        Some(c) => format!("http://{c}@127.0.0.1:{port}/preliminary/http-notify/v1/notify"),
        None => format!("http://127.0.0.1:{port}/preliminary/http-notify/v1/notify"),
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Record a batch's notifications one by one; the answer gives each `item_status`.
fn take_batch(
    shared: &Shared,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    item_status: u16,
    received: Instant,
) -> String {
    let batch: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let items = batch["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    shared.batches.fetch_add(1, Ordering::AcqRel);
    let mut results = Vec::new();
    for item in items {
        let event_id = item["event_id"].as_str().unwrap_or_default().to_string();
        if (200..300).contains(&item_status) {
            let mut headers = headers.to_vec();
            headers.push(("x-dovepush-event-id".into(), event_id.clone()));
            shared.requests.lock().unwrap().push(Request {
                method: "POST".into(),
                path: path.trim_end_matches("/batch").to_string(),
                headers,
                body: item["notification"].to_string().into_bytes(),
                received,
            });
        }
        results.push(serde_json::json!({"event_id": event_id, "status": item_status}));
    }
    serde_json::json!({ "results": results }).to_string()
}

fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let received = Instant::now();
        shared.attempts.fetch_add(1, Ordering::AcqRel);
        let delay = shared.delay_ms.load(Ordering::Acquire);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let mut status = shared.status.load(Ordering::Acquire);
        let mut answer = "{\"success\":true}".to_string();
        if method == "POST" && path.ends_with("/batch") {
            if shared.refuse_batches.load(Ordering::Acquire) {
                status = 404;
            } else {
                answer = take_batch(shared, &path, &headers, &body, status, received);
                status = 200;
            }
        } else if (200..300).contains(&status) {
            shared.requests.lock().unwrap().push(Request {
                method,
                path,
                headers,
                body,
                received,
            });
        }
        write!(
            writer,
            "HTTP/1.1 {status} Sink\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        )?;
        writer.flush()?;
    }
}
