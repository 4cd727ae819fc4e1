//! Resolves a sandbox ID to its route: the index first, then one Kubernetes API lookup on a miss.
//!
//! Concurrent misses for one ID share a single lookup (moka's `try_get_with`), and its outcome is
//! kept for the negative TTL, so unknown IDs cost one API call per TTL, not one per request. The
//! watch invalidates that cache for every ID it touches, so a pod claimed a moment after a miss
//! routes as soon as the watch (or the next lookup) sees it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::index::{PodRoute, RouteIndex, SandboxKey};
use crate::metrics::Metrics;

/// Why a lookup could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("kubernetes API lookup failed: {0}")]
    Api(String),
    #[error("kubernetes API lookup timed out after {0:?}")]
    Timeout(Duration),
}

/// Finds the pod of one sandbox straight from the API. The production one lists pods by label.
pub trait PodLookup: Send + Sync + 'static {
    fn lookup(&self, id: SandboxKey) -> BoxFuture<'static, Result<Option<PodRoute>, LookupError>>;
}

/// What the resolver knows about an ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Found(PodRoute),
    Absent,
    /// The index had no entry and the API could not be asked: the sandbox may well exist.
    Failed,
}

/// A lookup's outcome, stamped with the index removal epoch it started at.
#[derive(Debug, Clone, Copy)]
struct LookedUp {
    epoch: u64,
    route: Option<PodRoute>,
}

pub struct Resolver {
    index: Arc<RouteIndex>,
    lookups: moka::future::Cache<SandboxKey, LookedUp>,
    source: Arc<dyn PodLookup>,
    timeout: Duration,
    metrics: Metrics,
}

impl Resolver {
    pub fn new(
        index: Arc<RouteIndex>,
        source: Arc<dyn PodLookup>,
        negative_ttl: Duration,
        timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Resolver {
            index,
            lookups: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(negative_ttl)
                .build(),
            source,
            timeout,
            metrics,
        }
    }

    pub fn index(&self) -> &Arc<RouteIndex> {
        &self.index
    }

    pub async fn resolve(&self, id: &str) -> Resolved {
        if let Some(r) = self.index.get(id) {
            self.metrics.cache_hits.inc();
            return Resolved::Found(r);
        }
        self.metrics.cache_misses.inc();
        let Some(key) = SandboxKey::new(id) else {
            return Resolved::Absent;
        };
        // At most twice: a lookup that raced with a removal is discarded and asked again.
        for _ in 0..2 {
            let looked = match self.lookups.try_get_with(key, self.lookup(key)).await {
                Ok(l) => l,
                Err(_) => return Resolved::Failed,
            };
            let Some(route) = looked.route else {
                return Resolved::Absent;
            };
            if self.index.insert_looked_up(key, route, looked.epoch) {
                return Resolved::Found(route);
            }
            self.lookups.invalidate(&key).await;
            if let Some(r) = self.index.get(id) {
                return Resolved::Found(r);
            }
        }
        Resolved::Failed
    }

    fn lookup(
        &self,
        key: SandboxKey,
    ) -> impl std::future::Future<Output = Result<LookedUp, LookupError>> + Send + 'static {
        let epoch = self.index.epoch();
        let fut = self.source.lookup(key);
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        async move {
            let res = tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or(Err(LookupError::Timeout(timeout)));
            match &res {
                Ok(Some(_)) => metrics.lookups_found.inc(),
                Ok(None) => metrics.lookups_absent.inc(),
                Err(e) => {
                    tracing::warn!(sandbox_id = key.as_str(), error = %e, "route lookup failed");
                    metrics.lookups_failed.inc()
                }
            };
            res.map(|route| LookedUp { epoch, route })
        }
    }

    /// Called by the watch for every ID it changes, so no cached lookup outlives a watch event.
    pub async fn forget_lookup(&self, key: &SandboxKey) {
        self.lookups.invalidate(key).await;
    }
}

#[cfg(test)]
mod tests;
