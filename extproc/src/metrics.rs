//! Prometheus metrics of the data plane.
//!
//! Hot-path metrics are plain atomics: one `fetch_add` per request and no lock (prometheus-client's
//! own `Histogram` takes a mutex per observation, so the decision histogram is [`AtomicHistogram`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// How a request-headers message ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    routed,
    not_found,
    terminated,
    not_ready,
    bad_request,
    lookup_failed,
    too_many_streams,
    forbidden,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every metric the extproc exports. Cheap to clone: all fields are `Arc`s inside.
#[derive(Clone)]
pub struct Metrics {
    routed: Counter,
    not_found: Counter,
    terminated: Counter,
    not_ready: Counter,
    bad_request: Counter,
    lookup_failed: Counter,
    too_many_streams: Counter,
    forbidden: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub lookups_found: Counter,
    pub lookups_absent: Counter,
    pub lookups_failed: Counter,
    pub decision_seconds: AtomicHistogram,
    pub indexed_sandboxes: Gauge,
    pub index_synced: Gauge,
    pub watch_events: Counter,
    pub watch_errors: Counter,
    pub access_log_entries: Counter,
    pub tracked_sandboxes: Gauge,
    pub open_streams: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under `sandgate_extproc_`.
    pub fn new(registry: &mut Registry) -> Self {
        let reg = registry.sub_registry_with_prefix("sandgate_extproc");
        let requests = Family::<OutcomeLabels, Counter>::default();
        reg.register(
            "requests",
            "Request-headers decisions, by outcome",
            requests.clone(),
        );
        let cache = Family::<ResultLabels, Counter>::default();
        reg.register(
            "route_cache",
            "Route index reads, by result (hit, miss)",
            cache.clone(),
        );
        let lookups = Family::<ResultLabels, Counter>::default();
        reg.register(
            "api_lookups",
            "Kubernetes API lookups made on index misses, by result (found, absent, error)",
            lookups.clone(),
        );
        let decision_seconds = AtomicHistogram::new(&DECISION_BUCKETS);
        reg.register(
            "decision_duration_seconds",
            "Time from receiving request headers to sending the reply",
            decision_seconds.clone(),
        );
        let indexed_sandboxes = Gauge::default();
        reg.register(
            "indexed_sandboxes",
            "Sandboxes in the route index",
            indexed_sandboxes.clone(),
        );
        let index_synced = Gauge::default();
        reg.register(
            "index_synced",
            "1 once every pod watch has completed its first list",
            index_synced.clone(),
        );
        let watch_events = Counter::default();
        reg.register(
            "watch_events",
            "Pod watch events applied to the index",
            watch_events.clone(),
        );
        let watch_errors = Counter::default();
        reg.register(
            "watch_errors",
            "Pod watch errors (the watch retries with backoff)",
            watch_errors.clone(),
        );
        let access_log_entries = Counter::default();
        reg.register(
            "access_log_entries",
            "Envoy access log entries applied to the activity table",
            access_log_entries.clone(),
        );
        let tracked_sandboxes = Gauge::default();
        reg.register(
            "tracked_sandboxes",
            "Sandboxes in the activity table",
            tracked_sandboxes.clone(),
        );
        let open_streams = Gauge::default();
        reg.register(
            "open_streams",
            "Long-lived streams (WebSockets, SSE, long polls) this replica counts open, each one activity of its sandbox",
            open_streams.clone(),
        );
        let outcome = |o| {
            requests
                .get_or_create(&OutcomeLabels { outcome: o })
                .clone()
        };
        let result = |f: &Family<ResultLabels, Counter>, r| {
            f.get_or_create(&ResultLabels { result: r }).clone()
        };
        Metrics {
            routed: outcome(Outcome::routed),
            not_found: outcome(Outcome::not_found),
            terminated: outcome(Outcome::terminated),
            not_ready: outcome(Outcome::not_ready),
            bad_request: outcome(Outcome::bad_request),
            lookup_failed: outcome(Outcome::lookup_failed),
            too_many_streams: outcome(Outcome::too_many_streams),
            forbidden: outcome(Outcome::forbidden),
            cache_hits: result(&cache, "hit"),
            cache_misses: result(&cache, "miss"),
            lookups_found: result(&lookups, "found"),
            lookups_absent: result(&lookups, "absent"),
            lookups_failed: result(&lookups, "error"),
            decision_seconds,
            indexed_sandboxes,
            index_synced,
            watch_events,
            watch_errors,
            access_log_entries,
            tracked_sandboxes,
            open_streams,
        }
    }

    pub fn outcome(&self, o: Outcome) -> &Counter {
        match o {
            Outcome::routed => &self.routed,
            Outcome::not_found => &self.not_found,
            Outcome::terminated => &self.terminated,
            Outcome::not_ready => &self.not_ready,
            Outcome::bad_request => &self.bad_request,
            Outcome::lookup_failed => &self.lookup_failed,
            Outcome::too_many_streams => &self.too_many_streams,
            Outcome::forbidden => &self.forbidden,
        }
    }
}

/// Metrics of the fast path (hot routes held in Envoy), under `sandgate_extproc_fast_path_`.
#[derive(Clone)]
pub struct FastPathMetrics {
    pub routes: Gauge,
    pub evicted: Counter,
    pub streams: Gauge,
    pub valid_streams: Gauge,
    pub unobserved_streams: Gauge,
    pub pushes: Counter,
    pub pushed_upserts: Counter,
    pub pushed_removals: Counter,
    pub rejected: Counter,
    pub ack_seconds: AtomicHistogram,
    pub activity_polls_ok: Counter,
    pub activity_polls_failed: Counter,
    pub activity_touches: Counter,
    pub evictions_confirmed: Counter,
    pub evictions_unconfirmed: Counter,
}

impl FastPathMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let reg = registry.sub_registry_with_prefix("sandgate_extproc_fast_path");
        let gauge = |reg: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            reg.register(name, help, g.clone());
            g
        };
        let counter = |reg: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            reg.register(name, help, c.clone());
            c
        };
        let routes = gauge(
            reg,
            "routes",
            "Hot sandbox hosts in the table Envoy is sent",
        );
        let streams = gauge(reg, "streams", "Envoy ADS streams connected");
        let valid_streams = gauge(
            reg,
            "valid_streams",
            "ADS streams whose Envoy is told its hot routes are valid (0 means every request goes through ext_proc)",
        );
        let unobserved_streams = gauge(
            reg,
            "unobserved_streams",
            "ADS streams whose Envoy's counters are not being read: they get no hot routes (every request of theirs goes through ext_proc)",
        );
        let evicted = counter(
            reg,
            "evicted",
            "Hot hosts dropped to stay within --fast-path-max-routes",
        );
        let pushes = counter(reg, "pushes", "Hot-route updates sent to Envoy");
        let pushes_by = Family::<ResultLabels, Counter>::default();
        reg.register(
            "pushed_routes",
            "Hot routes sent to Envoy, by change (upsert, removal)",
            pushes_by.clone(),
        );
        let rejected = counter(
            reg,
            "rejected",
            "Hot-route updates Envoy rejected (each closes its stream for a full resync)",
        );
        let ack_seconds = AtomicHistogram::new(&ACK_BUCKETS);
        reg.register(
            "ack_duration_seconds",
            "Time from sending a hot-route update to Envoy acknowledging it",
            ack_seconds.clone(),
        );
        let polls = Family::<ResultLabels, Counter>::default();
        reg.register(
            "activity_polls",
            "Readings of Envoy's per-host counters, by result (ok, error)",
            polls.clone(),
        );
        let activity_touches = counter(
            reg,
            "activity_touches",
            "Sandboxes marked active from Envoy's per-host counters",
        );
        let evictions = Family::<ResultLabels, Counter>::default();
        reg.register(
            "evictions",
            "Control-API evictions (releases, deleted claims), by whether every Envoy confirmed dropping the sandbox's hot routes in time (confirmed, unconfirmed)",
            evictions.clone(),
        );
        let result = |f: &Family<ResultLabels, Counter>, r| {
            f.get_or_create(&ResultLabels { result: r }).clone()
        };
        FastPathMetrics {
            routes,
            evicted,
            streams,
            valid_streams,
            unobserved_streams,
            pushes,
            pushed_upserts: result(&pushes_by, "upsert"),
            pushed_removals: result(&pushes_by, "removal"),
            rejected,
            ack_seconds,
            activity_polls_ok: result(&polls, "ok"),
            activity_polls_failed: result(&polls, "error"),
            activity_touches,
            evictions_confirmed: result(&evictions, "confirmed"),
            evictions_unconfirmed: result(&evictions, "unconfirmed"),
        }
    }
}

/// Upper bounds in seconds of an xDS acknowledgement: 1 ms to 10 s.
pub const ACK_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0];

/// Upper bounds in seconds: 5 µs to 1 s.
pub const DECISION_BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.05, 0.25, 1.0,
];

/// A fixed-bucket histogram updated with atomics only.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
pub struct HistogramInner {
    bounds: &'static [f64],
    /// One counter per bound plus the +Inf bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram(Arc::new(HistogramInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: std::time::Duration) {
        let h = &self.0;
        let secs = d.as_secs_f64();
        let i = h.bounds.partition_point(|&b| b < secs);
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        h.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(h.counts.len());
        for (i, c) in h.counts.iter().enumerate() {
            let bound = h.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, c.load(Ordering::Relaxed)));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_and_encodes() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.decision_seconds.observe(Duration::from_micros(3));
        m.decision_seconds.observe(Duration::from_micros(30));
        m.decision_seconds.observe(Duration::from_secs(5));
        m.outcome(Outcome::routed).inc();
        assert_eq!(m.decision_seconds.count(), 3);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("sandgate_extproc_decision_duration_seconds_bucket{le=\"0.000005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("sandgate_extproc_decision_duration_seconds_bucket{le=\"0.00005\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("sandgate_extproc_decision_duration_seconds_count 3"),
            "{out}"
        );
        assert!(out.contains("le=\"+Inf\"} 3"), "{out}");
        assert!(
            out.contains("sandgate_extproc_requests_total{outcome=\"routed\"} 1"),
            "{out}"
        );
    }
}
