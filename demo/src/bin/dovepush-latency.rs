//! End-to-end latency benchmark (not a test): real Dovecot, the dovepush plugin, the
//! receiver and a mock APNs. Deliveries at a fixed rate over LMTP; for each, the time from the end of
//! LMTP DATA to the push request arriving at the mock APNs. Prints a table.
//!
//! Environment: DOVEPUSH_LATENCY_RATE (deliveries/s, 200), DOVEPUSH_LATENCY_SECONDS
//! (30), DOVEPUSH_LATENCY_USERS (100; each with one device, deliveries round-robin;
//! events for a device whose push is still pending fold into it, so pushes ≤ deliveries).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dovepush_demo::Stack;
use dovepush_testkit::messages;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rate = env("DOVEPUSH_LATENCY_RATE", 200);
    let seconds = env("DOVEPUSH_LATENCY_SECONDS", 30);
    let user_count = env("DOVEPUSH_LATENCY_USERS", 100) as usize;
    let connections = 4u64;
    let users: Vec<(String, String)> = (0..user_count)
        .map(|i| (format!("user{i:03}"), format!("secret{i}")))
        .collect();
    // The receiver's default (no coalescing window), stated for clarity.
    let stack = Stack::start(&users, "[outbox]\ncoalesce_milliseconds = 0\n").await?;
    for (i, (user, password)) in users.iter().enumerate() {
        let token = format!("{:064x}", 0xd0e0_0000u64 + i as u64);
        let (status, body) = stack.register_device(user, password, &token)?;
        if !(200..300).contains(&status) {
            return Err(format!("registering {user}: HTTP {status} {body}").into());
        }
    }
    let total = rate * seconds;
    let per_connection = total / connections;
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let sent: Mutex<HashMap<u64, Instant>> = Mutex::new(HashMap::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..connections {
            let (stack, sent, users) = (&stack, &sent, &users);
            scope.spawn(move || {
                let mut lmtp = stack.dovecot.lmtp().expect("lmtp");
                let begin = Instant::now();
                for i in 0..per_connection {
                    let due = begin + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let n = c * 1_000_000 + i;
                    let user = &users[(n as usize + c as usize) % users.len()].0;
                    let rcpt = format!("{user}@example.com");
                    let (end_of_data, _) = lmtp
                        .deliver_timed(&[rcpt.as_str()], &messages::simple(n as usize))
                        .expect("deliver");
                    sent.lock().unwrap().insert(n, end_of_data);
                }
            });
        }
    });
    let sending = started.elapsed();
    let expected = (per_connection * connections) as usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (stack.apns.request_count() as usize) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = sent.into_inner().unwrap();
    let mut latencies = Vec::with_capacity(expected);
    for request in stack.apns.requests() {
        let body = request.json();
        let alert = body["aps"]["alert"]["body"].as_str().unwrap_or_default();
        let Some(n) = alert.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        if let Some(end_of_data) = sent.get(&n) {
            latencies.push(request.received.saturating_duration_since(*end_of_data));
        }
    }
    latencies.sort();
    println!(
        "End-to-end latency, LMTP end of DATA → request at the mock APNs: {} deliveries at {rate}/s for {seconds} s ({:.0}/s achieved), {user_count} users with one device each, 4 LMTP connections",
        expected,
        expected as f64 / sending.as_secs_f64()
    );
    println!();
    println!("| pushes (rest coalesced) | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} / {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        latencies.len(),
        expected,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    Ok(())
}
