//! Telemetry: the metrics registry rendered at `GET /metrics` (Prometheus text format
//! 0.0.4, by `prometheus-client`) and the tracing subscriber set-up for the binary.
//!
//! Metrics are owned by one [`Metrics`] value that is created by `run` and passed down (no
//! globals). Labels come only from small fixed sets (transport kind, outcome class) or
//! bounded ones ([`PushOutcomes`]: configured app ids and the providers' reason words,
//! capped at [`MAX_OUTCOME_SERIES`]); user names and device tokens are never labels.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dovepush_protocol::notification::EventKind;
use dovepush_push::DeviceKind;
use prometheus_client::encoding::LabelValueEncoder;
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the ingest latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Why a push did not count as sent (bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

impl EncodeLabelValue for FailureClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// A transport kind as a label value (`apns`, `fcm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Kind(DeviceKind);

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.0.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabels {
    transport: Kind,
}

/// An event kind as a label value (`messageNew`, `messageRead`, `messageExpunge`,
/// `messageAppend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Event(EventKind);

impl EncodeLabelValue for Event {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.0.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    event: Event,
}

/// A watched credential: its app (empty for the receiver's own) and kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CredentialLabels {
    app: String,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailedLabels {
    transport: Kind,
    reason: FailureClass,
}

/// One `dovepush_push_outcomes_total` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    app: String,
    transport: Kind,
    outcome: &'static str,
    reason: String,
}

/// Most distinct `dovepush_push_outcomes_total` series; further reasons count as `other`.
pub const MAX_OUTCOME_SERIES: usize = 512;

/// What the push providers answered, by app, transport, outcome class and the provider's
/// reason (`Unregistered`, `BadDeviceToken`, `UNAVAILABLE`, `timeout`, `ok`, …). Recorded by
/// the transports (see [`crate::transport::push`]), rendered with the other metrics.
#[derive(Debug, Default)]
pub struct PushOutcomes {
    series: Family<OutcomeLabels, Counter>,
    /// Series created so far (the cap's count).
    created: AtomicUsize,
}

impl PushOutcomes {
    /// Counts one answer. `app` and `reason` are reduced to `[A-Za-z0-9_.-]` (≤ 64 chars).
    pub fn record(&self, app: &str, transport: DeviceKind, outcome: &'static str, reason: &str) {
        let mut labels = OutcomeLabels {
            app: label_value(app),
            transport: Kind(transport),
            outcome,
            reason: label_value(reason),
        };
        if self.series.get(&labels).is_none()
            && self.created.fetch_add(1, Ordering::Relaxed) >= MAX_OUTCOME_SERIES
        {
            self.created.fetch_sub(1, Ordering::Relaxed);
            labels.reason = "other".to_owned();
        }
        self.series.get_or_create(&labels).inc();
    }

    /// The count of one series.
    pub fn count(
        &self,
        app: &str,
        transport: DeviceKind,
        outcome: &'static str,
        reason: &str,
    ) -> u64 {
        let labels = OutcomeLabels {
            app: app.to_owned(),
            transport: Kind(transport),
            outcome,
            reason: reason.to_owned(),
        };
        self.series.get(&labels).map_or(0, |c| c.get())
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

/// All counters and gauges of one receiver, in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ingested: Counter,
    pub duplicates: Counter,
    pub dropped_no_device: Counter,
    pub stale_badges: Counter,
    pub rejected: Counter,
    pub batches: Counter,
    pub login_throttled: Counter,
    pub connections_limited: Counter,
    pub queued: Counter,
    pub coalesced: Counter,
    pub devices_removed_idle: Counter,
    sent: Family<TransportLabels, Counter>,
    /// The `sent` family's series (one per kind), so that counting a push takes no lock.
    sent_by_kind: [Counter; DeviceKind::ALL.len()],
    /// Of the sent pushes, the badge-only updates (by transport).
    badge_sent: Family<TransportLabels, Counter>,
    /// Ingested notifications by event kind (one series per kind, held directly).
    ingested_by_event: Family<EventLabels, Counter>,
    ingested_by_event_kind: [Counter; EventKind::ALL.len()],
    failed: Family<FailedLabels, Counter>,
    outbox_depth: Gauge,
    ingest_latency: Histogram,
    credential_expiry: Family<CredentialLabels, Gauge>,
    credential_rejected: Family<CredentialLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_push_outcomes(Arc::default())
    }

    /// Metrics that also render `outcomes` (the transports' provider-outcome counters).
    pub fn with_push_outcomes(outcomes: Arc<PushOutcomes>) -> Self {
        let m = Metrics {
            registry: Registry::default(),
            ingested: Counter::default(),
            duplicates: Counter::default(),
            dropped_no_device: Counter::default(),
            stale_badges: Counter::default(),
            rejected: Counter::default(),
            batches: Counter::default(),
            login_throttled: Counter::default(),
            connections_limited: Counter::default(),
            queued: Counter::default(),
            coalesced: Counter::default(),
            devices_removed_idle: Counter::default(),
            sent: Family::default(),
            sent_by_kind: Default::default(),
            badge_sent: Family::default(),
            ingested_by_event: Family::default(),
            ingested_by_event_kind: Default::default(),
            failed: Family::default(),
            outbox_depth: Gauge::default(),
            ingest_latency: Histogram::new(LATENCY_BUCKETS),
            credential_expiry: Family::default(),
            credential_rejected: Family::default(),
        };
        // Every kind shows, sent or not; each series is also held directly.
        let sent_by_kind = DeviceKind::ALL.map(|k| {
            m.sent
                .get_or_create_owned(&TransportLabels { transport: Kind(k) })
        });
        for k in DeviceKind::ALL {
            let _ = m
                .badge_sent
                .get_or_create_owned(&TransportLabels { transport: Kind(k) });
        }
        let ingested_by_event_kind = EventKind::ALL.map(|e| {
            m.ingested_by_event
                .get_or_create_owned(&EventLabels { event: Event(e) })
        });
        let mut registry = Registry::default();
        let counters = [
            (
                "dovepush_ingested",
                "Notifications accepted and committed",
                &m.ingested,
            ),
            (
                "dovepush_ingest_duplicates",
                "Notifications whose event id was already committed",
                &m.duplicates,
            ),
            (
                "dovepush_ingest_dropped_no_device",
                "Notifications for users without a device following the folder",
                &m.dropped_no_device,
            ),
            (
                "dovepush_ingest_stale_badges",
                "Badge updates older than one already taken for the user's folder (crossed on the way, or replayed late): committed, not pushed",
                &m.stale_badges,
            ),
            (
                "dovepush_ingest_rejected",
                "Notifications refused (bad auth, malformed or oversized body)",
                &m.rejected,
            ),
            (
                "dovepush_ingest_batches",
                "Batch requests taken (their notifications count one by one above)",
                &m.batches,
            ),
            (
                "dovepush_login_throttled",
                "Requests refused (429) after failed logins from their address or for their user",
                &m.login_throttled,
            ),
            (
                "dovepush_connections_limited",
                "Times [server] max_connections was reached",
                &m.connections_limited,
            ),
            ("dovepush_outbox_queued", "Outbox items created", &m.queued),
            (
                "dovepush_outbox_coalesced",
                "Events folded into an already pending outbox item",
                &m.coalesced,
            ),
            (
                "dovepush_devices_removed_idle",
                "Devices removed because they had not registered for [devices] max_idle_days",
                &m.devices_removed_idle,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "dovepush_push_sent",
            "Pushes the provider accepted",
            m.sent.clone(),
        );
        registry.register(
            "dovepush_ingested_events",
            "Notifications accepted and committed, by event kind (messageRead, messageExpunge and messageAppend: badge updates)",
            m.ingested_by_event.clone(),
        );
        registry.register(
            "dovepush_push_badge_sent",
            "Of the pushes the provider accepted, the silent badge updates",
            m.badge_sent.clone(),
        );
        registry.register(
            "dovepush_push_failed",
            "Push attempts that did not deliver, by outcome class",
            m.failed.clone(),
        );
        registry.register(
            "dovepush_push_outcomes",
            "Push provider answers by app, transport, outcome class and provider reason",
            outcomes.series.clone(),
        );
        registry.register(
            "dovepush_outbox_depth",
            "Outbox items waiting or in flight",
            m.outbox_depth.clone(),
        );
        registry.register(
            "dovepush_credential_expiry_timestamp_seconds",
            "When a watched certificate expires (notAfter, seconds since the epoch)",
            m.credential_expiry.clone(),
        );
        registry.register(
            "dovepush_credential_rejected",
            "1 while a push provider rejects the app's credentials (until a push succeeds)",
            m.credential_rejected.clone(),
        );
        registry.register(
            "dovepush_ingest_latency_seconds",
            "Ingest request latency, durable commit included",
            m.ingest_latency.clone(),
        );
        Metrics {
            registry,
            sent_by_kind,
            ingested_by_event_kind,
            ..m
        }
    }

    /// Counts an ingested notification by its event kind (`ingested` counts them all).
    pub fn ingested_event(&self, kind: EventKind) {
        let index = EventKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.ingested_by_event_kind[index].inc();
    }

    /// Counts a sent badge-only update (`sent` counts it too).
    pub fn badge_sent(&self, kind: DeviceKind) {
        self.badge_sent
            .get_or_create(&TransportLabels {
                transport: Kind(kind),
            })
            .inc();
    }

    pub fn sent(&self, kind: DeviceKind) {
        let index = DeviceKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.sent_by_kind[index].inc();
    }

    pub fn failed(&self, kind: DeviceKind, class: FailureClass) {
        let labels = FailedLabels {
            transport: Kind(kind),
            reason: class,
        };
        self.failed.get_or_create(&labels).inc();
    }

    /// Sets a watched certificate's `notAfter`.
    pub fn set_credential_expiry(&self, app: &str, kind: &'static str, not_after: i64) {
        let labels = CredentialLabels {
            app: app.to_owned(),
            kind,
        };
        self.credential_expiry.get_or_create(&labels).set(not_after);
    }

    /// Sets whether a provider currently rejects a credential.
    pub fn set_credential_rejected(&self, app: &str, kind: &'static str, rejected: bool) {
        let labels = CredentialLabels {
            app: app.to_owned(),
            kind,
        };
        self.credential_rejected
            .get_or_create(&labels)
            .set(i64::from(rejected));
    }

    /// Records one ingest request's latency (durable commit included).
    pub fn observe_ingest(&self, d: Duration) {
        self.ingest_latency.observe(d.as_secs_f64());
    }

    /// Prometheus text exposition ([`CONTENT_TYPE`]); `queue_depth` is read from the store.
    pub fn render(&self, queue_depth: u64) -> String {
        self.outbox_depth
            .set(i64::try_from(queue_depth).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
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
        m.ingested.inc_by(3);
        m.sent(DeviceKind::Fcm);
        m.sent(DeviceKind::WebPush);
        m.sent(DeviceKind::WebPush);
        m.failed(DeviceKind::Apns, FailureClass::Retry);
        m.failed(DeviceKind::Apns, FailureClass::Retry);
        m.failed(DeviceKind::WebPush, FailureClass::DeleteDevice);
        m.ingested_event(EventKind::MessageRead);
        m.badge_sent(DeviceKind::Apns);
        m.observe_ingest(Duration::from_micros(700));
        m.observe_ingest(Duration::from_secs(5));
        let text = m.render(7);
        assert!(text.contains("dovepush_ingested_total 3\n"));
        assert!(text.contains("dovepush_push_sent_total{transport=\"fcm\"} 1\n"));
        assert!(text.contains("dovepush_push_sent_total{transport=\"apns\"} 0\n"));
        assert!(text.contains("dovepush_push_sent_total{transport=\"webpush\"} 2\n"));
        assert!(text.contains(
            "dovepush_push_failed_total{transport=\"webpush\",reason=\"delete_device\"} 1\n"
        ));
        assert!(
            text.contains("dovepush_push_failed_total{transport=\"apns\",reason=\"retry\"} 2\n")
        );
        assert!(text.contains("dovepush_outbox_depth 7\n"));
        assert!(text.contains("dovepush_ingested_events_total{event=\"messageRead\"} 1\n"));
        assert!(text.contains("dovepush_ingested_events_total{event=\"messageExpunge\"} 0\n"));
        assert!(text.contains("dovepush_push_badge_sent_total{transport=\"apns\"} 1\n"));
        assert!(text.contains("dovepush_push_badge_sent_total{transport=\"webpush\"} 0\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("dovepush_ingest_latency_seconds_count 2\n"));
    }

    #[test]
    fn provider_outcomes_are_labelled_and_bounded() {
        let outcomes = Arc::new(PushOutcomes::default());
        let m = Metrics::with_push_outcomes(outcomes.clone());
        outcomes.record("mail", DeviceKind::Apns, "delete_device", "Unregistered");
        outcomes.record("mail", DeviceKind::Apns, "delete_device", "Unregistered");
        outcomes.record("mail", DeviceKind::Fcm, "retry", "bad\"label}");
        let text = m.render(0);
        assert!(text.contains(
            "dovepush_push_outcomes_total{app=\"mail\",transport=\"apns\",outcome=\"delete_device\",reason=\"Unregistered\"} 2\n"
        ), "{text}");
        assert!(text.contains("reason=\"bad_label_\"} 1\n"), "{text}");
        assert_eq!(
            outcomes.count("mail", DeviceKind::Apns, "delete_device", "Unregistered"),
            2
        );
        for i in 0..2 * MAX_OUTCOME_SERIES {
            outcomes.record("mail", DeviceKind::Fcm, "drop", &format!("r{i}"));
        }
        let series = m
            .render(0)
            .lines()
            .filter(|l| l.starts_with("dovepush_push_outcomes_total{"))
            .count();
        assert!(series <= MAX_OUTCOME_SERIES + 1);
        assert!(outcomes.count("mail", DeviceKind::Fcm, "drop", "other") > 0);
    }
}
