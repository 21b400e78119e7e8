//! Telemetry: the metrics registry rendered at `GET /metrics` (Prometheus text format) and
//! the tracing subscriber set-up for the binary.
//!
//! Metrics are plain atomics owned by one [`Metrics`] value that is created by `run` and
//! passed down (no globals). Labels come only from small fixed sets (transport kind,
//! outcome class) or bounded ones ([`PushOutcomes`]: configured app ids and the providers'
//! reason words, capped at [`MAX_OUTCOME_SERIES`]); user names and device tokens are never
//! labels.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::transport::TransportKind;

/// Upper bounds (seconds) of the ingest latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Why a push did not count as sent (bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureClass {
    DeleteDevice,
    Retry,
    CredentialsRejected,
    Drop,
    Deadline,
    NoTransport,
    Timeout,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::DeleteDevice => "delete_device",
            FailureClass::Retry => "retry",
            FailureClass::CredentialsRejected => "credentials_rejected",
            FailureClass::Drop => "drop",
            FailureClass::Deadline => "deadline",
            FailureClass::NoTransport => "no_transport",
            FailureClass::Timeout => "timeout",
        }
    }
}

/// Most distinct `dovepush_push_outcomes_total` series; further reasons count as `other`.
pub const MAX_OUTCOME_SERIES: usize = 512;

/// One `dovepush_push_outcomes_total` series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct OutcomeSeries {
    app: String,
    transport: TransportKind,
    outcome: &'static str,
    reason: String,
}

/// What the push providers answered, by app, transport, outcome class and the provider's
/// reason (`Unregistered`, `BadDeviceToken`, `UNAVAILABLE`, `timeout`, `ok`, …). Recorded by
/// the transports (see [`crate::transport::push`]), rendered with the other metrics.
#[derive(Debug, Default)]
pub struct PushOutcomes {
    counts: Mutex<BTreeMap<OutcomeSeries, u64>>,
}

impl PushOutcomes {
    /// Counts one answer. `app` and `reason` are reduced to `[A-Za-z0-9_.-]` (≤ 64 chars).
    pub fn record(&self, app: &str, transport: TransportKind, outcome: &'static str, reason: &str) {
        let mut series = OutcomeSeries {
            app: label_value(app),
            transport,
            outcome,
            reason: label_value(reason),
        };
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_OUTCOME_SERIES && !m.contains_key(&series) {
            series.reason = "other".to_owned();
        }
        *m.entry(series).or_default() += 1;
    }

    /// The count of one series.
    pub fn count(&self, app: &str, transport: TransportKind, outcome: &str, reason: &str) -> u64 {
        let m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(s, _)| {
                s.app == app
                    && s.transport == transport
                    && s.outcome == outcome
                    && s.reason == reason
            })
            .map(|(_, v)| *v)
            .sum()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP dovepush_push_outcomes_total Push provider answers by app, transport, outcome class and provider reason.\n# TYPE dovepush_push_outcomes_total counter"
        );
        let m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (s, v) in m.iter() {
            let _ = writeln!(
                out,
                "dovepush_push_outcomes_total{{app=\"{}\",transport=\"{}\",outcome=\"{}\",reason=\"{}\"}} {v}",
                s.app,
                s.transport.as_str(),
                s.outcome,
                s.reason
            );
        }
    }
}

/// A label value safe to print unescaped: `[A-Za-z0-9_.-]`, at most 64 chars, never empty.
fn label_value(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

/// All counters and gauges of one receiver.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ingested: AtomicU64,
    pub duplicates: AtomicU64,
    pub dropped_no_device: AtomicU64,
    pub rejected: AtomicU64,
    pub queued: AtomicU64,
    pub coalesced: AtomicU64,
    sent: [AtomicU64; 2],
    failed: Mutex<BTreeMap<(TransportKind, FailureClass), u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    push_outcomes: Arc<PushOutcomes>,
}

fn kind_index(k: TransportKind) -> usize {
    match k {
        TransportKind::Apns => 0,
        TransportKind::Fcm => 1,
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Metrics that also render `outcomes` (the transports' provider-outcome counters).
    pub fn with_push_outcomes(outcomes: Arc<PushOutcomes>) -> Self {
        Self {
            push_outcomes: outcomes,
            ..Self::default()
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sent(&self, kind: TransportKind) {
        self.sent[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent_count(&self, kind: TransportKind) -> u64 {
        self.sent[kind_index(kind)].load(Ordering::Relaxed)
    }

    pub fn failed(&self, kind: TransportKind, class: FailureClass) {
        let mut m = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((kind, class)).or_default() += 1;
    }

    pub fn failed_count(&self, kind: TransportKind, class: FailureClass) -> u64 {
        let m = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(kind, class)).copied().unwrap_or(0)
    }

    /// Records one ingest request's latency (durable commit included).
    pub fn observe_ingest(&self, d: Duration) {
        // One counter per bucket (not cumulative); `render` accumulates.
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition; `queue_depth` is read from the store.
    pub fn render(&self, queue_depth: u64) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "dovepush_ingested_total",
            "Notifications accepted and committed.",
            load(&self.ingested),
        );
        counter(
            "dovepush_ingest_duplicates_total",
            "Notifications whose event id was already committed.",
            load(&self.duplicates),
        );
        counter(
            "dovepush_ingest_dropped_no_device_total",
            "Notifications for users without a device following the folder.",
            load(&self.dropped_no_device),
        );
        counter(
            "dovepush_ingest_rejected_total",
            "Notifications refused (bad auth, malformed or oversized body).",
            load(&self.rejected),
        );
        counter(
            "dovepush_outbox_queued_total",
            "Outbox items created.",
            load(&self.queued),
        );
        counter(
            "dovepush_outbox_coalesced_total",
            "Events folded into an already pending outbox item.",
            load(&self.coalesced),
        );
        let _ = writeln!(
            out,
            "# HELP dovepush_push_sent_total Pushes the provider accepted.\n# TYPE dovepush_push_sent_total counter"
        );
        for k in TransportKind::ALL {
            let _ = writeln!(
                out,
                "dovepush_push_sent_total{{transport=\"{}\"}} {}",
                k.as_str(),
                self.sent_count(k)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dovepush_push_failed_total Push attempts that did not deliver, by outcome class.\n# TYPE dovepush_push_failed_total counter"
        );
        {
            let m = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            for ((k, class), v) in m.iter() {
                let _ = writeln!(
                    out,
                    "dovepush_push_failed_total{{transport=\"{}\",reason=\"{}\"}} {v}",
                    k.as_str(),
                    class.as_str()
                );
            }
        }
        self.push_outcomes.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP dovepush_outbox_depth Outbox items waiting or in flight.\n# TYPE dovepush_outbox_depth gauge\ndovepush_outbox_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP dovepush_ingest_latency_seconds Ingest request latency, durable commit included.\n# TYPE dovepush_ingest_latency_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += load(&self.latency_buckets[i]);
            let _ = writeln!(
                out,
                "dovepush_ingest_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(
            out,
            "dovepush_ingest_latency_seconds_bucket{{le=\"+Inf\"}} {count}\ndovepush_ingest_latency_seconds_sum {}\ndovepush_ingest_latency_seconds_count {count}",
            load(&self.latency_sum_micros) as f64 / 1e6
        );
        out
    }
}

/// Installs the tracing subscriber for the binary: `RUST_LOG` (default `info`), to stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_labels_and_histogram() {
        let m = Metrics::new();
        Metrics::add(&m.ingested, 3);
        m.sent(TransportKind::Fcm);
        m.failed(TransportKind::Apns, FailureClass::Retry);
        m.failed(TransportKind::Apns, FailureClass::Retry);
        m.observe_ingest(Duration::from_micros(700));
        m.observe_ingest(Duration::from_secs(5));
        let text = m.render(7);
        assert!(text.contains("dovepush_ingested_total 3\n"));
        assert!(text.contains("dovepush_push_sent_total{transport=\"fcm\"} 1\n"));
        assert!(text.contains("dovepush_push_sent_total{transport=\"apns\"} 0\n"));
        assert!(
            text.contains("dovepush_push_failed_total{transport=\"apns\",reason=\"retry\"} 2\n")
        );
        assert!(text.contains("dovepush_outbox_depth 7\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_count 2\n"));
    }

    #[test]
    fn provider_outcomes_are_labelled_and_bounded() {
        let outcomes = Arc::new(PushOutcomes::default());
        let m = Metrics::with_push_outcomes(outcomes.clone());
        outcomes.record("mail", TransportKind::Apns, "delete_device", "Unregistered");
        outcomes.record("mail", TransportKind::Apns, "delete_device", "Unregistered");
        outcomes.record("mail", TransportKind::Fcm, "retry", "bad\"label}");
        let text = m.render(0);
        assert!(text.contains(
            "dovepush_push_outcomes_total{app=\"mail\",transport=\"apns\",outcome=\"delete_device\",reason=\"Unregistered\"} 2\n"
        ), "{text}");
        assert!(text.contains("reason=\"bad_label_\"} 1\n"), "{text}");
        assert_eq!(
            outcomes.count("mail", TransportKind::Apns, "delete_device", "Unregistered"),
            2
        );
        for i in 0..2 * MAX_OUTCOME_SERIES {
            outcomes.record("mail", TransportKind::Fcm, "drop", &format!("r{i}"));
        }
        assert!(outcomes.counts.lock().unwrap().len() <= MAX_OUTCOME_SERIES + 1);
        assert!(outcomes.count("mail", TransportKind::Fcm, "drop", "other") > 0);
    }
}
