//! The Kubernetes edge: pod watches that feed the index, and the lookup used on index misses.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{future::BoxFuture, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use sandgate_shared::Contract;

use crate::activity::ActivityTable;
use crate::index::{route_from_pod, PodRoute, RouteState, SandboxKey};
use crate::metrics::Metrics;
use crate::resolver::{LookupError, PodLookup, Resolver};

/// Which namespaces to watch: each is a scope of the index.
pub fn scoped_apis(client: &Client, namespaces: &[String]) -> Vec<(u16, Api<Pod>)> {
    if namespaces.is_empty() {
        return vec![(0, Api::all(client.clone()))];
    }
    namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| (i as u16, Api::namespaced(client.clone(), ns)))
        .collect()
}

/// Tracks which watches have finished their first list.
pub struct SyncState {
    scopes: Vec<AtomicBool>,
}

impl SyncState {
    pub fn new(n: usize) -> Self {
        SyncState {
            scopes: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }
    fn mark(&self, scope: u16) {
        self.scopes[usize::from(scope)].store(true, Ordering::SeqCst);
    }
    pub fn is_synced(&self) -> bool {
        self.scopes.iter().all(|s| s.load(Ordering::SeqCst))
    }
}

/// Runs one pod watch forever, applying its events to the index.
pub async fn run_watch(
    api: Api<Pod>,
    scope: u16,
    contract: Arc<Contract>,
    resolver: Arc<Resolver>,
    activity: Arc<ActivityTable>,
    sync: Arc<SyncState>,
    metrics: Metrics,
) {
    let config = watcher::Config::default().labels(&contract.label_sandbox_id);
    let mut events = watcher(api, config).default_backoff().boxed();
    let index = resolver.index().clone();
    let mut relisted: Option<HashSet<SandboxKey>> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                metrics.watch_errors.inc();
                tracing::warn!(scope, error = %e, "pod watch error; retrying with backoff");
                continue;
            }
        };
        metrics.watch_events.inc();
        match event {
            Event::Init => relisted = Some(HashSet::new()),
            Event::InitApply(pod) | Event::Apply(pod) => {
                if let Some((key, route)) = route_from_pod(&pod, &contract, scope) {
                    index.apply(key, route);
                    resolver.forget_lookup(&key).await;
                    if route.state == RouteState::Gone {
                        activity.remove(key.as_str());
                    } else if let Some(at) = last_active(&pod, &contract) {
                        activity.seed(key, at);
                    }
                    if let Some(seen) = relisted.as_mut() {
                        seen.insert(key);
                    }
                }
            }
            Event::Delete(pod) => {
                if let Some((key, route)) = route_from_pod(&pod, &contract, scope) {
                    index.delete(&key, route.pod);
                    resolver.forget_lookup(&key).await;
                    activity.remove(key.as_str());
                }
            }
            Event::InitDone => {
                let seen = relisted.take().unwrap_or_default();
                index.reset(scope, &seen);
                sync.mark(scope);
                tracing::info!(scope, sandboxes = seen.len(), "pod watch synced");
            }
        }
        metrics.indexed_sandboxes.set(index.len() as i64);
    }
}

/// Index-miss lookup: lists pods by the sandbox-id label in every watched scope.
pub struct KubeLookup {
    pub apis: Vec<(u16, Api<Pod>)>,
    pub contract: Arc<Contract>,
}

impl PodLookup for KubeLookup {
    fn lookup(&self, id: SandboxKey) -> BoxFuture<'static, Result<Option<PodRoute>, LookupError>> {
        let apis = self.apis.clone();
        let contract = self.contract.clone();
        Box::pin(async move {
            let params = ListParams::default().labels(&format!(
                "{}={}",
                contract.label_sandbox_id,
                id.as_str()
            ));
            let mut best: Option<PodRoute> = None;
            for (scope, api) in apis {
                let pods = api
                    .list(&params)
                    .await
                    .map_err(|e| LookupError::Api(e.to_string()))?;
                for pod in &pods.items {
                    if let Some((_, r)) = route_from_pod(pod, &contract, scope) {
                        if best.is_none_or(|b| !b.is_routable() && r.is_routable()) {
                            best = Some(r);
                        }
                    }
                }
            }
            Ok(best)
        })
    }
}

/// The pod's `last-active` annotation as a wall-clock time.
fn last_active(pod: &Pod, contract: &Contract) -> Option<std::time::SystemTime> {
    let raw = pod
        .metadata
        .annotations
        .as_ref()?
        .get(&contract.ann_last_active)?;
    match raw.parse::<jiff::Timestamp>() {
        Ok(ts) => Some(std::time::SystemTime::from(ts)),
        Err(e) => {
            tracing::warn!(annotation = %contract.ann_last_active, value = %raw, error = %e, "unparseable last-active annotation ignored");
            None
        }
    }
}

/// Every Kubernetes API call this binary makes, as (API group, resource, verb). The RBAC test checks
/// deploy/rbac.yaml grants exactly these.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("", "pods", "list"),  // the watch's list and the index-miss lookup
    ("", "pods", "watch"), // the route index
];
