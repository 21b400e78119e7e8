//! Sender cost (not a test): the CPU time the sender process spends per notification.
//!
//! Forks a sender process the way the plugin does in lmtp, hands it N notifications at a
//! steady rate (one frame each, as lmtp does per delivery), lets it send them to a local
//! HTTP sink that answers at once, and prints the sender process's CPU time (user +
//! system, from /proc) per notification, its start-up cost apart.
//!
//! ```text
//! cargo run --release -p dovepush-plugin --example sender_cost [-- N RATE]
//! ```
//! Defaults: 5000 notifications at 500/s. The sink runs in this process; only the sender
//! process is measured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dovepush_plugin::config::{Endpoint, SpoolSettings};
use dovepush_plugin::job::{now_ms, Job};
use dovepush_plugin::process::{Refused, Sender};
use dovepush_plugin::sender::Submission;
use dovepush_plugin::spool::Spool;
use dovepush_testkit::procfs::cpu_time;
use dovepush_testkit::sink::Sink;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: sender_cost [N RATE]"))
        .collect();
    let n = args.first().copied().unwrap_or(5000).max(2);
    let rate = args.get(1).copied().unwrap_or(500).max(1);

    let sink = Sink::start();
    let endpoint = Arc::new(
        Endpoint::parse(
            "sender_cost",
            &sink.url(Some("dovecot:notify-secret")),
            1,
            Duration::from_secs(2),
            false,
        )
        .expect("sink URL"),
    );
    let spool_dir = tempfile::tempdir().expect("spool dir");
    let spool = Arc::new(Spool::new(SpoolSettings {
        dir: spool_dir.path().to_path_buf(),
        max_size: 256 << 20,
        max_age: Duration::from_secs(2 * 86400),
        retry_interval: Duration::from_secs(30),
    }));
    let submission = |i: usize| Submission {
        job: Job {
            event_id: format!("sender-cost-{i:08}"),
            user: "alice@example.com".into(),
            endpoint: endpoint.clone(),
            body: format!(
                concat!(
                    r#"{{"user":"alice@example.com","event":"messageNew","folder":"INBOX","#,
                    r#""imap-uidvalidity":1764000000,"imap-uid":{},"#,
                    r#""from":"=?utf-8?q?J=C3=BCrgen?= <juergen@example.net>","#,
                    r#""subject":"Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?= {}","#,
                    r#""snippet":"Hello Alice, this is message number {}. It has a body of a few lines, of which the snippet shows the start.","#,
                    r#""unseen":{}}}"#
                ),
                i + 1,
                i + 1,
                i + 1,
                i % 50 + 1
            ),
            created_ms: now_ms(),
        },
        spool: spool.clone(),
        debug: false,
    };

    let mut sender = Sender::start(10_000).expect("fork the sender process");
    let pid = sender.pid() as u32;
    let mut logs = Vec::new();
    let submit = |sender: &mut Sender, i: usize| loop {
        match sender.submit(&submission(i)) {
            Ok(()) => return,
            Err(Refused::Full) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("the sender process refused a job: {e}"),
        }
    };

    // The first notification pays for the start (runtime, HTTP client, connection).
    submit(&mut sender, 0);
    let first = sink.wait_for(1, Duration::from_secs(10)).len();
    assert_eq!(first, 1, "the first notification did not arrive");
    let startup = cpu_time(pid);

    let started = Instant::now();
    for i in 1..n {
        let due = started + Duration::from_secs_f64((i - 1) as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        submit(&mut sender, i);
        if i % 256 == 0 {
            logs.extend(sender.take_logs());
        }
    }
    let arrived = sink.wait_for(n, Duration::from_secs(60)).len();
    let elapsed = started.elapsed();
    let steady = cpu_time(pid).saturating_sub(startup);
    logs.extend(sender.shutdown(Duration::from_secs(2)));
    let spooled = logs.iter().filter(|l| l.text.contains("spooled")).count();

    println!(
        "sender process: {n} notifications at {rate}/s to a local sink answering at once ({:.1} s)",
        elapsed.as_secs_f64()
    );
    println!("| start-up CPU ms | CPU µs per notification | arrived | spooled |");
    println!("|---|---|---|---|");
    println!(
        "| {:.1} | {:.0} | {arrived} / {n} | {spooled} |",
        startup.as_secs_f64() * 1e3,
        steady.as_secs_f64() * 1e6 / (n - 1) as f64,
    );
    for line in logs.iter().filter(|l| !l.text.contains("spooled")).take(5) {
        eprintln!("sender log: {}", line.text);
    }
}
