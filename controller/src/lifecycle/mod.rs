//! Pool and claim reconcilers (kube-runtime controllers). Only the leader acts. The decisions
//! are pure (`pool::plan_pool`, `claim::plan_claim`, `backoff`, `patches`); the executors here
//! carry them out:
//!
//! - [`pools`]: keep `replicas` warm pods, replace released and failed pods, roll old ones; a
//!   finalizer keeps a deleted pool until its claimed sandboxes are released.
//! - [`claims`]: bind one idle, Ready pod with a JSON patch whose `test` pins `phase=idle`, so two
//!   claims never get the same pod; a claim that loses the race tries the next pod. Deleting a
//!   claim releases its sandbox.
//! - [`bound`]: a bound claim's life: its timeout, its pod's death or release, its TTL.
//! - [`waiters`]: claims waiting for a pod, woken by the pod watch in creation order.

mod bound;
mod claims;
mod pools;
mod waiters;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sandgate_shared::Contract;

use crate::backoff::FailureBackoff;
use crate::crd::{SandboxClaim, SandboxPool};
use crate::pool::{Expectations, CLAIM_ANNOTATION};

pub use waiters::Waiter;

const POOL_FINALIZER: &str = "sandgate.dev/pool";
const CLAIM_FINALIZER: &str = "sandgate.dev/claim";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("pool {0} still has claimed sandboxes; waiting for their release")]
    ClaimedRemain(String),
    #[error("invalid {field} {value:?}")]
    Invalid { field: &'static str, value: String },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolPhase {
    pub pool: String,
    pub phase: String,
}

#[derive(Clone)]
pub struct LifecycleMetrics {
    pub claim_seconds: Histogram,
    pub replenish_seconds: Histogram,
    pub pool_pods: Family<PoolPhase, Gauge>,
    pub claims_waiting: Gauge,
    /// Pool pod creates by outcome: `created`, `refused` (a quota 403, an admission webhook).
    pub pod_creates: Family<crate::metrics::Labels, prometheus_client::metrics::counter::Counter>,
}

impl LifecycleMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("sandgate_controller");
        let m = LifecycleMetrics {
            claim_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            replenish_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            pool_pods: Family::default(),
            claims_waiting: Gauge::default(),
            pod_creates: Family::default(),
        };
        r.register(
            "claim_duration_seconds",
            "From claim creation to Bound",
            m.claim_seconds.clone(),
        );
        r.register(
            "replenish_duration_seconds",
            "From pool pod creation to idle and Ready",
            m.replenish_seconds.clone(),
        );
        r.register("pool_pods", "Pool pods by phase", m.pool_pods.clone());
        r.register(
            "claims_waiting",
            "Claims waiting for an idle pod",
            m.claims_waiting.clone(),
        );
        r.register(
            "pod_creates",
            "Pool pod creates by outcome (label=created|refused)",
            m.pod_creates.clone(),
        );
        for label in ["created", "refused"] {
            let _ = m
                .pod_creates
                .get_or_create(&crate::metrics::Labels { label });
        }
        m
    }
}

pub struct Ctx {
    pub client: kube::Client,
    pub contract: Contract,
    /// Pods carrying the pool label.
    pub pods: Store<Pod>,
    pub expectations: Expectations,
    /// Pools, from the reflector that drives the pool controller.
    pub pool_store: Store<SandboxPool>,
    /// Idle pods NotReady longer than this are replaced.
    pub not_ready_grace: Duration,
    /// Claims this process bound, by claim UID → pod name and when (until the pod cache shows
    /// the bind).
    pub bound: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// Claims waiting for an idle pod, by claim UID; a pool pod's change wakes its pool's.
    pub waiting: Mutex<HashMap<String, Waiter>>,
    /// Per pool: its failure backoff.
    pub failures: Mutex<HashMap<String, FailureBackoff>>,
    /// Per pool: when its status was last written.
    pub status_written: Mutex<HashMap<String, std::time::Instant>>,
    /// Per pool: the backoff after refused creates.
    pub create_backoff: Mutex<HashMap<String, crate::backoff::RetryBackoff>>,
    pub domain: Option<String>,
    pub is_leader: Arc<AtomicBool>,
    pub metrics: LifecycleMetrics,
    pub recorder: kube::runtime::events::Recorder,
    /// Drops a released sandbox's route from every extproc replica.
    pub evictor: Arc<crate::poller::Evictor>,
}

/// Publishes a Normal event on `obj`; failures are logged, never fatal.
async fn event<K: Resource<DynamicType = ()>>(ctx: &Ctx, obj: &K, reason: &str, note: String) {
    publish(
        ctx,
        obj,
        kube::runtime::events::EventType::Normal,
        reason,
        note,
    )
    .await
}

/// Publishes a Warning event on `obj`; failures are logged, never fatal.
async fn event_warning<K: Resource<DynamicType = ()>>(
    ctx: &Ctx,
    obj: &K,
    reason: &str,
    note: String,
) {
    publish(
        ctx,
        obj,
        kube::runtime::events::EventType::Warning,
        reason,
        note,
    )
    .await
}

async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Ctx,
    obj: &K,
    type_: kube::runtime::events::EventType,
    reason: &str,
    note: String,
) {
    let ev = kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::debug!(error = %e, reason, "cannot publish event");
    }
}

fn pool_pods(ctx: &Ctx, ns: &str, pool: &str) -> Vec<Arc<Pod>> {
    ctx.pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(&ctx.contract.label_pool).map(String::as_str) == Some(pool)
        })
        .collect()
}

fn not_leader(ctx: &Ctx) -> Option<Action> {
    (!ctx.is_leader.load(Ordering::SeqCst)).then(|| Action::requeue(Duration::from_secs(2)))
}

/// A JSON patch built by `patches`.
fn json_patch(ops: serde_json::Value) -> Result<json_patch::Patch, Error> {
    serde_json::from_value(ops).map_err(|e| Error::Finalizer(e.to_string()))
}

/// Runs `apply` or `cleanup` under kube-runtime's finalizer helper for `obj`'s namespace.
async fn with_finalizer<K, A, C, FA, FC>(
    obj: Arc<K>,
    name: &str,
    ctx: Arc<Ctx>,
    apply: A,
    cleanup: C,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
    A: Fn(Arc<K>, Arc<Ctx>) -> FA,
    C: Fn(Arc<K>, Arc<Ctx>) -> FC,
    FA: std::future::Future<Output = Result<Action, Error>>,
    FC: std::future::Future<Output = Result<Action, Error>>,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer(&api, name, obj, |ev| async {
        match ev {
            Finalizer::Apply(o) => apply(o, ctx.clone()).await,
            Finalizer::Cleanup(o) => cleanup(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// `[a-z0-9]`, `n` characters from the thread's CSPRNG.
pub fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A new sandbox ID: DNS-label safe, starts with a letter, 100 bits of randomness.
pub fn new_sandbox_id() -> String {
    format!("sbx-{}", random_id(20))
}

fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    match err {
        Error::ClaimedRemain(_) => Action::requeue(Duration::from_secs(2)),
        e => {
            tracing::warn!(error = %e, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(1))
        }
    }
}

/// Logs what a controller stream yields that is not a plain success: watch failures (the
/// reconciler's own errors are logged by `error_policy`).
fn log_outcome<K, R, Q>(
    r: Result<K, kube::runtime::controller::Error<R, Q>>,
) -> futures::future::Ready<()>
where
    R: std::error::Error,
    Q: std::error::Error,
{
    use kube::runtime::controller::Error as E;
    match r {
        Err(E::QueueError(e)) => tracing::warn!(error = %e, "watch failed; retrying with backoff"),
        Err(E::RunnerError(e)) => tracing::warn!(error = %e, "controller runner error"),
        _ => {}
    }
    futures::future::ready(())
}

/// Runs both controllers forever. `pool_pods` and `claim_pods` carry every pool pod change, each
/// sent only after `ctx.pods` holds it.
pub async fn run(
    ctx: Arc<Ctx>,
    (pools, pool_store): (
        impl Stream<Item = Result<SandboxPool, watcher::Error>> + Send + 'static,
        Store<SandboxPool>,
    ),
    claims: Api<SandboxClaim>,
    pool_pods: impl Stream<Item = Pod> + Send + 'static,
    claim_pods: impl Stream<Item = Pod> + Send + 'static,
) {
    let pool_label = ctx.contract.label_pool.clone();
    let to_pool = {
        let l = pool_label.clone();
        move |p: Pod| {
            p.labels().get(&l).map(|pool| {
                ObjectRef::<SandboxPool>::new(pool).within(&p.namespace().unwrap_or_default())
            })
        }
    };
    // A pod wakes the claim that bound it, and the claims waiting on its pool.
    let to_claim = {
        let ctx = ctx.clone();
        move |p: Pod| {
            let own = p.annotations().get(CLAIM_ANNOTATION).and_then(|r| {
                let (ns, name) = r.split_once('/')?;
                Some(ObjectRef::<SandboxClaim>::new(name).within(ns))
            });
            let mut refs = waiters::to_wake(&ctx, &p);
            refs.extend(own);
            refs
        }
    };
    let pools_ctl = Controller::for_stream(pools, pool_store)
        .watches_stream(pool_pods.map(Ok), to_pool)
        .run(pools::reconcile, error_policy, ctx.clone())
        .for_each(log_outcome);
    let claims_ctl = Controller::new(claims, watcher::Config::default())
        .watches_stream(claim_pods.map(Ok), to_claim)
        .run(claims::reconcile, error_policy, ctx)
        .for_each(log_outcome);
    tokio::join!(pools_ctl, claims_ctl);
}
