//! Prometheus metrics of the controller (prefix `sandgate_controller_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    pub label: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    /// outcome: ok, skipped_partial, failed
    pub ticks: Family<Labels, Counter>,
    pub tick_seconds: Histogram,
    pub releases: Counter,
    /// reason: conflict (re-claimed or changed), error
    pub releases_skipped: Family<Labels, Counter>,
    pub annotation_writes: Counter,
    pub annotation_write_errors: Counter,
    pub annotation_backlog: Gauge,
    pub replicas_polled: Counter,
    /// reason: failed, timeout, not_warm, incomplete
    pub replicas_failed: Family<Labels, Counter>,
    pub sandboxes_tracked: Gauge,
    pub next_release_seconds: Gauge,
    pub leader: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("sandgate_controller");
        let m = Metrics {
            ticks: Family::default(),
            tick_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            releases: Counter::default(),
            releases_skipped: Family::default(),
            annotation_writes: Counter::default(),
            annotation_write_errors: Counter::default(),
            annotation_backlog: Gauge::default(),
            replicas_polled: Counter::default(),
            replicas_failed: Family::default(),
            sandboxes_tracked: Gauge::default(),
            next_release_seconds: Gauge::default(),
            leader: Gauge::default(),
        };
        r.register(
            "ticks",
            "Idle-timeout ticks, by outcome (label: ok, skipped_partial, failed)",
            m.ticks.clone(),
        );
        r.register(
            "tick_duration_seconds",
            "Duration of an idle-timeout tick",
            m.tick_seconds.clone(),
        );
        r.register(
            "releases",
            "Sandboxes released for idleness",
            m.releases.clone(),
        );
        r.register(
            "releases_skipped",
            "Releases not made, by reason (label: conflict, error)",
            m.releases_skipped.clone(),
        );
        r.register(
            "annotation_writes",
            "last-active annotation writes",
            m.annotation_writes.clone(),
        );
        r.register(
            "annotation_write_errors",
            "Failed last-active annotation writes",
            m.annotation_write_errors.clone(),
        );
        r.register(
            "annotation_backlog",
            "last-active writes queued behind the write-rate limit",
            m.annotation_backlog.clone(),
        );
        r.register(
            "replicas_polled",
            "extproc replicas polled",
            m.replicas_polled.clone(),
        );
        r.register(
            "replicas_failed",
            "extproc replicas that failed a poll, by reason (label: failed, timeout, not_warm, incomplete)",
            m.replicas_failed.clone(),
        );
        r.register(
            "sandboxes_tracked",
            "Running sandboxes the last tick looked at",
            m.sandboxes_tracked.clone(),
        );
        r.register(
            "next_release_seconds",
            "Seconds until the next sandbox becomes releasable (-1: none)",
            m.next_release_seconds.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the lease",
            m.leader.clone(),
        );
        // Every series exists from the start, so a rate over it is defined before its first event.
        for label in ["ok", "skipped_partial", "failed"] {
            let _ = m.ticks.get_or_create(&Labels { label });
        }
        for label in ["conflict", "error"] {
            let _ = m.releases_skipped.get_or_create(&Labels { label });
        }
        for label in crate::poller::PollError::LABELS {
            let _ = m.replicas_failed.get_or_create(&Labels { label });
        }
        m
    }

    pub fn tick(&self, outcome: &'static str) {
        self.ticks.get_or_create(&Labels { label: outcome }).inc();
    }
}
