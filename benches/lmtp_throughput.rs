//! LMTP delivery throughput: no push plugin vs the stock ox driver vs dovepush, each
//! with a receiver that answers at once and one that takes 50 ms. Not a test: it prints
//! a table. Run with `./scripts/bench` (release build of the plugin first).
//!
//! Each run: a fresh private Dovecot (fresh Maildir), N messages over C concurrent LMTP
//! connections to one subscribed user; deliveries/s from the first DATA to the last
//! reply, and the per-delivery reply latency. Medians over R runs.
//! Environment: DOVEPUSH_BENCH_N (2000), DOVEPUSH_BENCH_CONNECTIONS (4),
//! DOVEPUSH_BENCH_RUNS (3).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dovepush_testkit::dovecot::{built_plugin, Dovecot, Options};
use dovepush_testkit::messages;
use dovepush_testkit::sink::Sink;

#[derive(Clone, Copy, PartialEq)]
enum Plugin {
    None,
    Ox,
    Dovepush,
}

struct Run {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    notified: usize,
    uid_zero: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

/// Directories of finished runs, removed when the benchmark ends (see
/// `Dovecot::stop_keeping_files`).
static KEPT: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

fn one_run(
    plugin: Plugin,
    delay: Duration,
    subscribed: bool,
    n: usize,
    connections: usize,
    spread: bool,
) -> Run {
    let sink = Sink::start();
    sink.set_delay(delay);
    let mut options = Options {
        users: USERS
            .iter()
            .map(|u| (u.to_string(), "secret".to_string()))
            .collect(),
        ..Options::default()
    };
    match plugin {
        Plugin::None => {}
        Plugin::Ox => {
            options.delivery_plugins = "notify push_notification".into();
            options.plugin_settings = vec![(
                "push_notification_driver".into(),
                format!("ox:url={}", sink.url(None)),
            )];
        }
        Plugin::Dovepush => {
            options.delivery_plugins = "notify dovepush".into();
            options.dovepush_module = Some(built_plugin());
            options.plugin_settings = vec![("dovepush_url".into(), sink.url(None))];
        }
    }
    // testkit points dovepush's spool into the run's temp dir.
    let dovecot = Dovecot::start(options).expect("dovecot");
    for user in USERS.iter().filter(|_| subscribed) {
        dovecot
            .set_subscription(user, Some(&format!("user={user}")))
            .unwrap();
    }
    let message = messages::simple(1);
    let latencies = Mutex::new(Vec::with_capacity(n));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..connections {
            let share = n / connections + usize::from(c < n % connections);
            let (dovecot, message, latencies) = (&dovecot, &message, &latencies);
            scope.spawn(move || {
                let mut lmtp = dovecot.lmtp().expect("lmtp");
                let mut mine = Vec::with_capacity(share);
                let rcpt = format!(
                    "{}@example.com",
                    if spread {
                        USERS[c % USERS.len()]
                    } else {
                        USERS[0]
                    }
                );
                for _ in 0..share {
                    mine.push(lmtp.deliver(&[rcpt.as_str()], message).expect("deliver"));
                }
                latencies.lock().unwrap().extend(mine);
            });
        }
    });
    let elapsed = started.elapsed();
    let mut latencies = latencies.into_inner().unwrap();
    latencies.sort();
    let expected = if plugin == Plugin::None || !subscribed {
        0
    } else {
        n
    };
    let requests = sink.wait_for(expected, Duration::from_secs(60));
    let uid_zero = requests
        .iter()
        .filter(|r| r.json()["imap-uid"].as_u64() == Some(0))
        .count();
    KEPT.lock().unwrap().push(dovecot.stop_keeping_files());
    Run {
        per_second: n as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        notified: requests.len(),
        uid_zero,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let n = env_usize("DOVEPUSH_BENCH_N", 2000);
    let connections = env_usize("DOVEPUSH_BENCH_CONNECTIONS", 4);
    let runs = env_usize("DOVEPUSH_BENCH_RUNS", 3);
    let fast = Duration::ZERO;
    let slow = Duration::from_millis(50);
    let all: Vec<Variant> = vec![
        ("no push plugin", Plugin::None, fast, false),
        (
            "stock ox driver, user not subscribed",
            Plugin::Ox,
            fast,
            false,
        ),
        (
            "stock ox driver, receiver answers at once",
            Plugin::Ox,
            fast,
            true,
        ),
        (
            "stock ox driver, receiver takes 50 ms",
            Plugin::Ox,
            slow,
            true,
        ),
        (
            "dovepush, user not subscribed",
            Plugin::Dovepush,
            fast,
            false,
        ),
        (
            "dovepush, receiver answers at once",
            Plugin::Dovepush,
            fast,
            true,
        ),
        (
            "dovepush, receiver takes 50 ms",
            Plugin::Dovepush,
            slow,
            true,
        ),
    ];
    // DOVEPUSH_BENCH_ONLY=5,6 runs only those rows (row 0, the baseline, always runs).
    let only: Option<Vec<usize>> = std::env::var("DOVEPUSH_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let variants: Vec<Variant> = all
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || only.as_ref().is_none_or(|o| o.contains(i)))
        .map(|(_, v)| v)
        .collect();
    // DOVEPUSH_BENCH_SPREAD=one|spread|both (default both).
    let spreads: Vec<bool> = match std::env::var("DOVEPUSH_BENCH_SPREAD").as_deref() {
        Ok("one") => vec![false],
        Ok("spread") => vec![true],
        _ => vec![false, true],
    };
    for spread in spreads {
        table(&variants, n, connections, runs, spread);
    }
    for dir in KEPT.lock().unwrap().drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

type Variant = (&'static str, Plugin, Duration, bool);

fn table(variants: &[Variant], n: usize, connections: usize, runs: usize, spread: bool) {
    let mailboxes = if spread {
        format!("one user per connection ({connections} Maildirs)")
    } else {
        "all to one user (one Maildir)".to_string()
    };
    println!(
        "\nLMTP throughput: {n} messages, {connections} connections, {mailboxes}, fresh Maildir per run, median of {runs} runs"
    );
    let mut rows = Vec::new();
    // Interleave the variants run by run so machine noise spreads over all of them, and
    // rotate their order each round so that no variant always runs first or last.
    let mut results: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..runs {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let (_, plugin, delay, subscribed) = &variants[i];
            results[i].push(one_run(
                *plugin,
                *delay,
                *subscribed,
                n,
                connections,
                spread,
            ));
        }
    }
    for ((name, _, _, _), runs) in variants.iter().zip(&results) {
        let rate = median(runs.iter().map(|r| r.per_second).collect());
        let p50 = median(runs.iter().map(|r| r.p50.as_secs_f64() * 1000.0).collect());
        let p99 = median(runs.iter().map(|r| r.p99.as_secs_f64() * 1000.0).collect());
        let notified = runs.iter().map(|r| r.notified).min().unwrap_or(0);
        let uid_zero = runs.iter().map(|r| r.uid_zero).max().unwrap_or(0);
        rows.push((name, rate, p50, p99, notified, uid_zero));
    }
    let base = rows[0].1;
    let base_p99 = rows[0].3;
    println!();
    println!("| variant | deliveries/s | × no plugin | LMTP p50 ms | LMTP p99 ms | p99 added ms | notified (min) | imap-uid 0 (max) |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, rate, p50, p99, notified, uid_zero) in &rows {
        println!(
            "| {name} | {rate:.0} | {:.2} | {p50:.2} | {p99:.2} | {:+.2} | {notified} | {uid_zero} |",
            rate / base,
            p99 - base_p99
        );
    }
}
