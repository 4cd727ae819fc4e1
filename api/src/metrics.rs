//! The API's metrics (prefix `sandgate_api_`), served on `--admin-addr`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    code: u16,
}

#[derive(Clone)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    /// From a create request to its answer, for sandboxes that were created.
    pub create_seconds: Histogram,
    /// API keys loaded from Secrets.
    pub keys: Gauge,
}

impl ApiMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("sandgate_api");
        let m = ApiMetrics {
            requests: Family::default(),
            create_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            keys: Gauge::default(),
        };
        r.register(
            "requests",
            "Requests by route and status code",
            m.requests.clone(),
        );
        r.register(
            "create_duration_seconds",
            "From a create request to its 201",
            m.create_seconds.clone(),
        );
        r.register("api_keys", "API keys loaded from Secrets", m.keys.clone());
        m
    }

    pub fn request(&self, route: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, code })
            .inc();
    }
}
