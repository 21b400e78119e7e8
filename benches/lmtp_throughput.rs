//! LMTP delivery throughput: no push plugin vs the stock ox driver vs dovepush (one event
//! per request, and batched), each with a receiver that answers at once and one that
//! takes 50 ms. Not a test: it prints a table. Run with `./scripts/bench` (release build
//! of the plugin and the sender service first).
//!
//! Besides throughput and reply latency, per delivery: the CPU time of the lmtp
//! processes and of the sender service, their wake-ups (voluntary context switches) and
//! the HTTP requests the receiver got (with a dovepush receiver each request is one
//! commit at most: a batch is committed in one transaction).
//!
//! Each run: a fresh private Dovecot on a fresh ext4 file system (loop device), N messages over C concurrent LMTP
//! connections to one subscribed user; deliveries/s from the first DATA to the last
//! reply, and the per-delivery reply latency. Medians over R runs.
//! Environment: DOVEPUSH_BENCH_N (2000), DOVEPUSH_BENCH_CONNECTIONS (4),
//! DOVEPUSH_BENCH_RUNS (3); DOVEPUSH_BENCH_VERBOSE=1 prints every run.
//! DOVEPUSH_BENCH_DOVECOT=2.4 runs it all on Dovecot 2.4.1 in the Debian 13 root, with
//! the release build made there (`./scripts/bench lmtp24`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dovepush_testkit::debian13::{self, Debian13};
use dovepush_testkit::dovecot::{built_plugin, Dovecot, Options};
use dovepush_testkit::loopfs::LoopFs;
use dovepush_testkit::messages;
use dovepush_testkit::procfs;
use dovepush_testkit::sink::Sink;

#[derive(Clone, Copy, PartialEq)]
enum Plugin {
    None,
    Ox,
    Dovepush {
        batch: bool,
    },
    /// Dovecot 2.4 only: dovepush with lmtp processes that serve many connections
    /// (`restart_request_count = unlimited`, 2.3's default) instead of 2.4.1's one each.
    DovepushLongLivedLmtp,
}

struct Run {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    notified: usize,
    uid_zero: usize,
    /// Events dovepush had to spool (its log says so) instead of sending at once: left
    /// in the drop spool by lmtp, or kept in its queue by the service.
    spooled: usize,
    /// Machine-wide CPU time (all processes: Dovecot, the load generator, the sink) per
    /// delivery, in µs, and the share of CPU time the machine spent idle or waiting for
    /// the disk during the run.
    cpu_per_delivery_us: f64,
    idle_share: f64,
    /// CPU time of the lmtp processes and of dovepush's sender service per delivery (µs).
    lmtp_us: f64,
    sender_us: f64,
    /// Voluntary context switches (wake-ups after waiting) per delivery.
    lmtp_wakeups: f64,
    sender_wakeups: f64,
    /// HTTP requests the receiver got per delivery.
    requests: f64,
}

/// CPU time (user + system, in clock ticks) and voluntary context switches used so far
/// by the live processes named `comm` (all of them) or with pid `pid`.
fn process_use(comm: &str, pid: Option<u32>) -> (u64, u64) {
    procfs::all()
        .iter()
        .filter(|p| p.comm == comm && pid.is_none_or(|pid| p.pid == pid))
        .map(|p| {
            let switches = procfs::status_field(p.pid, "voluntary_ctxt_switches").unwrap_or(0);
            (p.cpu_ticks(), switches)
        })
        .fold((0, 0), |(t, s), (t2, s2)| (t + t2, s + s2))
}

/// Machine-wide CPU counters from /proc/stat: (busy, idle + iowait), in clock ticks.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, get(3) + get(4))
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

/// A fresh ext4 file system for one run ([`LoopFs`]), which becomes `TMPDIR` (where
/// testkit puts the run's Dovecot, Maildirs and spool).
///
/// Every run then starts from the same file-system state. On the shared disk, runs
/// that followed the deletion of the previous runs' thousands of files paid for it
/// (ext4 scans its bitmaps past recently freed inodes), and lmtp's CPU time per
/// delivery varied from 1.3 to 2.4 ms between runs of the same variant.
struct RunFs {
    /// Unmounted when the run is over.
    _fs: LoopFs,
}

impl RunFs {
    fn new(index: usize) -> RunFs {
        // Inside the Debian 13 root for Dovecot 2.4 (testkit then uses it as TMPDIR).
        let base = dovecot24().map_or_else(std::env::temp_dir, |d| d.root.join("tmp"));
        let fs = LoopFs::new(
            &base,
            &format!("dovepush-bench-{}-{index}", std::process::id()),
            512,
        )
        .expect("a loop-mounted ext4 for the run");
        std::env::set_var("TMPDIR", fs.path());
        RunFs { _fs: fs }
    }
}

impl Drop for RunFs {
    fn drop(&mut self) {
        std::env::remove_var("TMPDIR");
    }
}

/// Dovecot 2.4.1 in the Debian 13 root with dovepush's release build from there, when
/// DOVEPUSH_BENCH_DOVECOT=2.4.
fn dovecot24() -> Option<&'static Debian13> {
    static ROOT: std::sync::OnceLock<Option<Debian13>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        if std::env::var("DOVEPUSH_BENCH_DOVECOT").as_deref() != Ok("2.4") {
            return None;
        }
        let mut d13 = debian13::get()
            .unwrap_or_else(|why| panic!("no Debian 13 root: {why}"))
            .clone();
        let release = d13.plugin.parent().unwrap().with_file_name("release");
        d13.plugin = release.join("libdovepush_plugin.so");
        d13.sender = release.join("dovepush-sender");
        d13.settings_module = release.join("libdovepush_settings.so");
        assert!(
            d13.plugin.exists() && d13.sender.exists(),
            "{} is missing: ./scripts/debian13 build --release",
            d13.plugin.display()
        );
        Some(d13)
    })
    .as_ref()
}

fn one_run(
    index: usize,
    plugin: Plugin,
    delay: Duration,
    subscribed: bool,
    n: usize,
    connections: usize,
    spread: bool,
) -> Run {
    let fs = RunFs::new(index);
    let sink = Sink::start();
    sink.set_delay(delay);
    let mut options = Options {
        users: USERS
            .iter()
            .map(|u| (u.to_string(), "secret".to_string()))
            .collect(),
        ..Options::default()
    };
    let d13 = dovecot24();
    options.debian13 = d13;
    let long_lived = plugin == Plugin::DovepushLongLivedLmtp;
    let plugin = if long_lived {
        options.extra_config = "service lmtp {\n  restart_request_count = unlimited\n}\n".into();
        Plugin::Dovepush { batch: false }
    } else {
        plugin
    };
    match plugin {
        Plugin::None => {}
        Plugin::Ox if d13.is_some() => {
            options.delivery_plugins = "notify push_notification".into();
            options.extra_config = format!(
                "push_notification ox {{\n  ox_url = {}\n}}\n",
                sink.url(None)
            );
        }
        Plugin::Ox => {
            options.delivery_plugins = "notify push_notification".into();
            options.plugin_settings = vec![(
                "push_notification_driver".into(),
                format!("ox:url={}", sink.url(None)),
            )];
        }
        Plugin::Dovepush { batch } => {
            options.delivery_plugins = "notify dovepush".into();
            options.dovepush_module = Some(d13.map_or_else(built_plugin, |d| d.plugin.clone()));
            options.plugin_settings = vec![
                ("dovepush_url".into(), sink.url(None)),
                (
                    "dovepush_batch".into(),
                    if batch { "yes" } else { "no" }.into(),
                ),
            ];
        }
        Plugin::DovepushLongLivedLmtp => unreachable!("turned into Dovepush above"),
    }
    // testkit points dovepush's spool into the run's temp dir.
    let dovecot = Dovecot::start(options).expect("dovecot");
    let sender = match plugin {
        Plugin::Dovepush { .. } => Some(
            dovecot
                .wait_for_sender(Duration::from_secs(20))
                .expect("the sender service runs"),
        ),
        _ => None,
    };
    let sender_before = sender.map(|pid| process_use("dovepush-sender", Some(pid)));
    for user in USERS.iter().filter(|_| subscribed) {
        dovecot
            .set_subscription(user, Some(&format!("user={user}")))
            .unwrap();
    }
    let message = messages::simple(1);
    let latencies = Mutex::new(Vec::with_capacity(n));
    let ticks_before = cpu_ticks();
    let started = Instant::now();
    let clients = std::thread::scope(|scope| {
        (0..connections)
            .map(|c| {
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
                    lmtp
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("a connection"))
            .collect::<Vec<_>>()
    });
    let elapsed = started.elapsed();
    let ticks_after = cpu_ticks();
    // Counted while the connections are open: Dovecot 2.4.1's lmtp processes exit with
    // theirs (restart_request_count = 1), and the dead are not in /proc.
    let (lmtp_ticks, lmtp_switches) = process_use("lmtp", None);
    drop(clients);
    let mut latencies = latencies.into_inner().unwrap();
    latencies.sort();
    let expected = if plugin == Plugin::None || !subscribed {
        0
    } else {
        n
    };
    let requests = sink.wait_for(expected, Duration::from_secs(60));
    let (sender_ticks, sender_switches) = match (sender, sender_before) {
        (Some(pid), Some((ticks, switches))) => {
            let (t, s) = process_use("dovepush-sender", Some(pid));
            (t - ticks, s - switches)
        }
        _ => (0, 0),
    };
    let uid_zero = requests
        .iter()
        .filter(|r| r.json()["imap-uid"].as_u64() == Some(0))
        .count();
    let log = dovecot.log();
    let spooled = log.matches(" left in ").count() + log.matches(" waits in ").count();
    let http_requests = sink.attempts();
    drop(dovecot);
    drop(fs);
    // /proc/stat counts in USER_HZ, which Linux fixes at 100 for user space.
    let ticks_per_second = 100.0;
    let busy = (ticks_after.0 - ticks_before.0) as f64;
    let idle = (ticks_after.1 - ticks_before.1) as f64;
    Run {
        cpu_per_delivery_us: busy / ticks_per_second * 1e6 / n as f64,
        idle_share: idle / (busy + idle).max(1.0),
        lmtp_us: lmtp_ticks as f64 / ticks_per_second * 1e6 / n as f64,
        sender_us: sender_ticks as f64 / ticks_per_second * 1e6 / n as f64,
        lmtp_wakeups: lmtp_switches as f64 / n as f64,
        sender_wakeups: sender_switches as f64 / n as f64,
        requests: http_requests as f64 / n as f64,
        per_second: n as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        notified: requests.len(),
        uid_zero,
        spooled,
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
            Plugin::Dovepush { batch: false },
            fast,
            false,
        ),
        (
            "dovepush, receiver answers at once",
            Plugin::Dovepush { batch: false },
            fast,
            true,
        ),
        (
            "dovepush, receiver takes 50 ms",
            Plugin::Dovepush { batch: false },
            slow,
            true,
        ),
        (
            "dovepush batched, receiver answers at once",
            Plugin::Dovepush { batch: true },
            fast,
            true,
        ),
        (
            "dovepush batched, receiver takes 50 ms",
            Plugin::Dovepush { batch: true },
            slow,
            true,
        ),
    ];
    let mut all = all;
    if dovecot24().is_some() {
        all.push((
            "dovepush, receiver answers at once, lmtp restart_request_count = unlimited",
            Plugin::DovepushLongLivedLmtp,
            fast,
            true,
        ));
    }
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
}

type Variant = (&'static str, Plugin, Duration, bool);

fn table(variants: &[Variant], n: usize, connections: usize, runs: usize, spread: bool) {
    let mailboxes = if spread {
        format!("one user per connection ({connections} Maildirs)")
    } else {
        "all to one user (one Maildir)".to_string()
    };
    let dovecot = dovecot24().map_or("2.3 (the system's)".to_string(), |d| d.version.clone());
    println!(
        "\nLMTP throughput on Dovecot {dovecot}: {n} messages, {connections} connections, {mailboxes}, fresh Maildir on a fresh ext4 per run, median of {runs} runs"
    );
    // Interleave the variants run by run so machine noise spreads over all of them, and
    // rotate their order each round so that no variant always runs first or last.
    let mut results: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..runs {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let (_, plugin, delay, subscribed) = &variants[i];
            let run = one_run(
                round * variants.len() + k,
                *plugin,
                *delay,
                *subscribed,
                n,
                connections,
                spread,
            );
            if std::env::var_os("DOVEPUSH_BENCH_VERBOSE").is_some() {
                eprintln!(
                    "round {round} {}: {:.0}/s, p99 {:.2} ms, CPU {:.0} µs/delivery (lmtp {:.0}, sender {:.0}), wake-ups lmtp {:.2} sender {:.2}, requests {:.2}, spooled {}",
                    variants[i].0,
                    run.per_second,
                    run.p99.as_secs_f64() * 1000.0,
                    run.cpu_per_delivery_us,
                    run.lmtp_us,
                    run.sender_us,
                    run.lmtp_wakeups,
                    run.sender_wakeups,
                    run.requests,
                    run.spooled
                );
            }
            results[i].push(run);
        }
    }
    println!();
    println!("| variant | deliveries/s | × no plugin | LMTP p50 ms | LMTP p99 ms | p99 added ms | notified (min) | imap-uid 0 (max) | spooled (max) | CPU µs/delivery | idle | lmtp µs | sender µs | lmtp wake-ups | sender wake-ups | requests |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let base = &results[0];
    for ((name, _, _, _), runs) in variants.iter().zip(&results) {
        let of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        // Ratio and added p99 are medians of per-round comparisons: each run against
        // the baseline run of the same round, which cancels the machine's slow drifts.
        let paired = |f: &dyn Fn(&Run, &Run) -> f64| {
            median(runs.iter().zip(base).map(|(r, b)| f(r, b)).collect())
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:+.2} | {} | {} | {} | {:.0} | {:.0} % | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            of(&|r| r.per_second),
            paired(&|r, b| r.per_second / b.per_second),
            of(&|r| ms(r.p50)),
            of(&|r| ms(r.p99)),
            paired(&|r, b| ms(r.p99) - ms(b.p99)),
            runs.iter().map(|r| r.notified).min().unwrap_or(0),
            runs.iter().map(|r| r.uid_zero).max().unwrap_or(0),
            runs.iter().map(|r| r.spooled).max().unwrap_or(0),
            of(&|r| r.cpu_per_delivery_us),
            of(&|r| r.idle_share * 100.0),
            of(&|r| r.lmtp_us),
            of(&|r| r.sender_us),
            of(&|r| r.lmtp_wakeups),
            of(&|r| r.sender_wakeups),
            of(&|r| r.requests),
        );
    }
}
