//! Pool and claim reconcilers (kube-runtime controllers). Only the leader acts.
//!
//! - Pools: keep `replicas` warm pods (see `pool::plan_pool`), replace released and failed pods,
//!   rotate old idle ones; a finalizer keeps a deleted pool until its claimed sandboxes are released.
//! - Claims: bind one idle, Ready pod with a JSON patch whose `test` pins `phase=idle`, so two
//!   claims never get the same pod; a claim that loses the race tries the next pod. Deleting a claim
//!   releases its sandbox; a sandbox released for idleness marks its claim Released.

use std::collections::{HashMap, HashSet};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
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
use sandgate_shared::{Contract, Phase};
use serde_json::json;

use crate::crd::{ClaimPhase, SandboxClaim, SandboxClaimStatus, SandboxPool};
use crate::idle::{format_time, parse_idle_timeout};
use crate::pool::{plan_pool, Expectations, PodView};

const POOL_FINALIZER: &str = "sandgate.dev/pool";
const CLAIM_FINALIZER: &str = "sandgate.dev/claim";
/// Pod annotation naming the claim that bound it (`<namespace>/<name>`).
use crate::pool::CLAIM_ANNOTATION as ANN_CLAIM;
/// Pod annotation holding the UID of the claim that bound it: a claim finds its pod by it.
const ANN_CLAIM_UID: &str = "sandgate.dev/claim-uid";

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
}

impl LifecycleMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("sandgate_controller");
        let m = LifecycleMetrics {
            claim_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            replenish_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            pool_pods: Family::default(),
            claims_waiting: Gauge::default(),
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
        m
    }
}

/// A claim waiting for a pod of its pool.
#[derive(Debug, Clone)]
pub struct Waiter {
    /// `<namespace>/<pool>`.
    pub pool: String,
    /// Served in this order: creation time, then name.
    pub order: (i64, String),
    pub claim: ObjectRef<SandboxClaim>,
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
    /// Claims this process bound, by claim UID → pod name (until the status shows it).
    pub bound: Mutex<HashMap<String, String>>,
    /// Claims waiting for an idle pod, by claim UID; a pool pod's change wakes its pool's.
    pub waiting: Mutex<HashMap<String, Waiter>>,
    /// Per pool: consecutive failed pods (each counted once, by name), when the last was seen.
    pub failures: Mutex<HashMap<String, (HashSet<String>, Instant)>>,
    pub domain: Option<String>,
    pub is_leader: Arc<AtomicBool>,
    pub metrics: LifecycleMetrics,
    pub recorder: kube::runtime::events::Recorder,
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

pub async fn reconcile_pool(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if let Some(a) = not_leader(&ctx) {
        return Ok(a);
    }
    with_finalizer(pool, POOL_FINALIZER, ctx, apply_pool, cleanup_pool).await
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

async fn apply_pool(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (pool, ctx) = (&*pool, &*ctx);
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    if let Err(why) = crate::validate::check_pool(&pool.spec) {
        return refuse_pool(ctx, pool, why).await;
    }
    let max_age = match &pool.spec.max_pod_age {
        Some(s) => {
            Some(
                sandgate_shared::duration::parse_duration(s).map_err(|_| Error::Invalid {
                    field: "spec.maxPodAge",
                    value: s.clone(),
                })?,
            )
        }
        None => None,
    };
    let pods = pool_pods(ctx, &ns, &name);
    let hash = crate::pool::template_hash(&pool.spec.template);
    let views: Vec<PodView> = pods
        .iter()
        .map(|p| PodView {
            outdated: p
                .annotations()
                .get(crate::pool::TEMPLATE_HASH_ANNOTATION)
                .is_some_and(|h| h != &hash),
            ..PodView::of(p, &ctx.contract)
        })
        .collect();
    let seen: HashSet<&str> = views.iter().map(|v| v.name.as_str()).collect();
    let key = format!("{ns}/{name}");
    let expected = ctx.expectations.pending(&key, &seen);
    let rules = crate::pool::PoolRules {
        replicas: pool.spec.replicas,
        max_age,
        not_ready_grace: ctx.not_ready_grace,
    };
    let mut plan = plan_pool(&rules, &views, expected, SystemTime::now());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);

    for n in &plan.mark_idle {
        // Guarded: the cache may still show `starting` for a pod that is already idle or claimed.
        let phase = format!(
            "/metadata/labels/{}",
            crate::idle::json_pointer(&ctx.contract.label_phase)
        );
        let ops = json!([
            {"op": "test", "path": phase, "value": Phase::Starting.as_str()},
            {"op": "replace", "path": phase, "value": Phase::Idle.as_str()},
        ]);
        let patch: json_patch::Patch =
            serde_json::from_value(ops).map_err(|e| Error::Finalizer(e.to_string()))?;
        match pods_api
            .patch(n, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => tracing::debug!(pool = %key, pod = %n, "pod ready: starting -> idle"),
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => continue,
            Err(e) => return Err(e.into()),
        }
        if let Some(v) = views.iter().find(|v| &v.name == n) {
            ctx.metrics.replenish_seconds.observe(
                SystemTime::now()
                    .duration_since(v.created)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
        }
    }
    // Failed pods are replaced with exponential backoff.
    let failed_names: Vec<&str> = views
        .iter()
        .filter(|v| v.failed || v.phase == Some(Phase::Failed))
        .map(|v| v.name.as_str())
        .collect();
    let failed = failed_names.len() as u32;
    let backoff = {
        let mut f = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = f
            .entry(key.clone())
            .or_insert_with(|| (HashSet::new(), Instant::now()));
        let new = failed_names
            .iter()
            .filter(|n| entry.0.insert(n.to_string()))
            .count();
        if new > 0 {
            entry.1 = Instant::now();
        } else if failed == 0 && !plan.mark_idle.is_empty() {
            entry.0.clear();
        }
        let n = entry.0.len() as u32;
        let wait = Duration::from_secs(1) * 2u32.saturating_pow(n.saturating_sub(1)).min(60);
        (n > 1 && entry.1.elapsed() < wait).then(|| wait - entry.1.elapsed())
    };
    if failed > 0 {
        event(
            ctx,
            pool,
            "PodFailed",
            format!("{failed} failed pod(s) replaced"),
        )
        .await;
    }
    for n in &plan.delete {
        // Only the pod as the cache saw it: one claimed (or otherwise changed) since is a 409 and stays.
        let seen_rv = pods
            .iter()
            .find(|p| p.metadata.name.as_ref() == Some(n))
            .and_then(|p| p.metadata.resource_version.clone());
        let dp = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: seen_rv,
                uid: None,
            }),
            ..Default::default()
        };
        match pods_api.delete(n, &dp).await {
            Ok(_) => tracing::debug!(pool = %key, pod = %n, "pod deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                tracing::debug!(pool = %key, pod = %n, code = e.code, "pod delete skipped")
            }
            Err(e) => return Err(e.into()),
        }
    }
    if backoff.is_some() {
        plan.create = 0;
    }
    let create_error = create_pods(ctx, pool, &key, plan.create).await;
    // Every phase, so one that no longer has pods reads 0 rather than its last count.
    for phase in [
        Phase::Idle,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Failed,
    ] {
        let n = plan
            .status
            .replicas
            .get(phase.as_str())
            .copied()
            .unwrap_or(0);
        ctx.metrics
            .pool_pods
            .get_or_create(&PoolPhase {
                pool: key.clone(),
                phase: phase.as_str().to_string(),
            })
            .set(i64::from(n));
    }
    tracing::debug!(pool = %key, cached = views.len(), expected, create = plan.create, delete = plan.delete.len(), mark_idle = plan.mark_idle.len(), backoff = ?backoff, "pool reconciled");
    let rotate_in = plan.rotate_in;
    let mut status = plan.status;
    status.observed_generation = pool.metadata.generation.unwrap_or(0);
    let previous = pool
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let problem = create_error
        .clone()
        .map(|e| ("PodCreateFailed".to_string(), e))
        .or_else(|| {
            pods.iter()
                .filter(|p| PodView::of(p, &ctx.contract).phase == Some(Phase::Starting))
                .find_map(|p| crate::pool::pod_problem(p))
        });
    let ready = crate::pool::diagnosed(
        crate::pool::ready_condition(
            &status,
            pool.spec.replicas,
            backoff.is_some(),
            previous,
            pool.metadata.generation,
            jiff::Timestamp::now(),
        ),
        problem,
    );
    if ready.status != "True"
        && previous.is_none_or(|p| p.reason != ready.reason)
        && ready.reason != "Replenishing"
        && ready.reason != "Full"
    {
        event_warning(ctx, pool, &ready.reason, ready.message.clone()).await;
    }
    status.conditions = vec![ready];
    let mut patch = json!({ "status": status });
    // A merge patch keeps keys it does not name: phases that no longer have pods are removed.
    for gone in pool
        .status
        .iter()
        .flat_map(|s| s.replicas.keys())
        .filter(|k| !status.replicas.contains_key(*k))
    {
        patch["status"]["replicas"][gone] = serde_json::Value::Null;
    }
    // Written only when it says something new (a burst makes many passes that change nothing).
    if pool.status.as_ref() != Some(&status) {
        let api: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    // Looked at again by the next failure backoff, the next rotation, after a failed or
    // unfinished create, or 30 s at the latest.
    let creating = if create_error.is_some() {
        Some(Duration::from_secs(5))
    } else if plan.create > MAX_CREATES_PER_PASS {
        Some(Duration::from_millis(100))
    } else {
        None
    };
    let again = [backoff, rotate_in, creating]
        .into_iter()
        .flatten()
        .fold(Duration::from_secs(30), Duration::min);
    Ok(Action::requeue(again.max(Duration::from_millis(100))))
}

/// The most pods one pool pass creates: refills are rate-shaped, so a claim burst is not starved
/// by them, and a scale-up writes its status every pass.
const MAX_CREATES_PER_PASS: usize = 64;

/// Creates up to `n` (at most [`MAX_CREATES_PER_PASS`]) pool pods in growing batches (1, 2, 4, …,
/// each batch's creates concurrent), as ReplicaSets do, stopping at the first refusal (a quota
/// 403, say). Returns the refusal, for the pool's status.
async fn create_pods(ctx: &Ctx, pool: &SandboxPool, key: &str, n: usize) -> Option<String> {
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut left = n.min(MAX_CREATES_PER_PASS);
    let mut batch = 1;
    while left > 0 {
        let size = batch.min(left);
        let creates = (0..size).map(|_| {
            let pod = pool_pod(pool, &ctx.contract, &name);
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            ctx.expectations.expect(key, &pod_name);
            let api = pods_api.clone();
            async move { (pod_name, api.create(&PostParams::default(), &pod).await) }
        });
        let mut refused = None;
        for (pod_name, r) in futures::future::join_all(creates).await {
            match r {
                Ok(_) => tracing::debug!(pool = %key, pod = %pod_name, "pod created"),
                Err(e) => {
                    tracing::warn!(pool = %key, error = %e, "pod create refused");
                    refused = Some(match e {
                        kube::Error::Api(s) => s.message,
                        other => other.to_string(),
                    });
                }
            }
        }
        if refused.is_some() {
            return refused;
        }
        left -= size;
        batch *= 2;
    }
    None
}

/// A pool whose spec cannot work: `Ready` False with reason `InvalidSpec`, nothing created; looked
/// at again when the spec changes.
async fn refuse_pool(ctx: &Ctx, pool: &SandboxPool, why: String) -> Result<Action, Error> {
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let previous = pool.status.clone().unwrap_or_default();
    let already = previous.conditions.iter().any(|c| {
        c.type_ == "Ready"
            && c.reason == crate::validate::INVALID_SPEC
            && c.message == why
            && c.observed_generation == pool.metadata.generation
    });
    if !already {
        tracing::warn!(pool = %format!("{ns}/{name}"), %why, "pool spec refused");
        let cond = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: crate::validate::INVALID_SPEC.into(),
            message: why.clone(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::now(),
            ),
            observed_generation: pool.metadata.generation,
        };
        let patch = json!({"status": {
            "observedGeneration": pool.metadata.generation.unwrap_or(0),
            "conditions": [cond],
        }});
        let api: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        event_warning(ctx, pool, crate::validate::INVALID_SPEC, why).await;
    }
    Ok(Action::await_change())
}

/// A new warm pod from the pool's template, with the contract's labels.
fn pool_pod(pool: &SandboxPool, c: &Contract, name: &str) -> Pod {
    let t = pool.spec.template.clone();
    let mut meta = t.metadata.unwrap_or_default();
    meta.name = Some(format!("{name}-{}", random_id(8)));
    meta.namespace = pool.namespace();
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(c.label_pool.clone(), name.to_string());
    labels.insert(c.label_phase.clone(), Phase::Starting.as_str().into());
    labels.remove(&c.label_sandbox_id);
    let ann = meta.annotations.get_or_insert_with(Default::default);
    ann.insert(
        crate::pool::TEMPLATE_HASH_ANNOTATION.into(),
        crate::pool::template_hash(&pool.spec.template),
    );
    if let Some(port) = pool.spec.port {
        ann.insert(c.ann_port.clone(), port.to_string());
    }
    Pod {
        metadata: meta,
        spec: t.spec,
        status: None,
    }
}

async fn cleanup_pool(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (pool, ctx) = (&*pool, &*ctx);
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut claimed = 0;
    for p in pool_pods(ctx, &ns, &name) {
        if PodView::of(&p, &ctx.contract).phase == Some(Phase::Running) {
            claimed += 1;
        } else if p.metadata.deletion_timestamp.is_none() {
            // Only as the cache saw it: a pod claimed meanwhile is a 409 and stays.
            let dp = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    resource_version: p.metadata.resource_version.clone(),
                    uid: None,
                }),
                ..Default::default()
            };
            let _ = pods_api.delete(&p.name_any(), &dp).await;
        }
    }
    if claimed > 0 {
        return Err(Error::ClaimedRemain(format!("{ns}/{name}")));
    }
    Ok(Action::await_change())
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

pub async fn reconcile_claim(claim: Arc<SandboxClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if let Some(a) = not_leader(&ctx) {
        return Ok(a);
    }
    with_finalizer(claim, CLAIM_FINALIZER, ctx, apply_claim, cleanup_claim).await
}

async fn set_status(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
) -> Result<(), Error> {
    let api: Api<SandboxClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    api.patch_status(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": status})),
    )
    .await?;
    Ok(())
}

/// Marks a claim Pending with a `Bound=False` condition naming why (written once per reason).
async fn set_pending(
    ctx: &Ctx,
    claim: &SandboxClaim,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let current = claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| (c.reason.as_str(), c.message.as_str()));
    if current == Some((reason, message.as_str())) {
        return Ok(());
    }
    let cond = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: "Bound".into(),
        status: "False".into(),
        reason: reason.into(),
        message,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ),
        observed_generation: claim.metadata.generation,
    };
    let status = SandboxClaimStatus {
        phase: ClaimPhase::Pending,
        conditions: vec![cond],
        ..Default::default()
    };
    set_status(ctx, claim, &status).await
}

/// A claim that can never bind as written: Failed, with a `Bound=False` condition of reason
/// `InvalidSpec` naming the field, and a Warning event. Not retried.
async fn refuse_claim(ctx: &Ctx, claim: &SandboxClaim, why: String) -> Result<Action, Error> {
    tracing::warn!(claim = %claim.name_any(), %why, "claim spec refused");
    forget_waiter(ctx, &claim.uid().unwrap_or_default());
    let cond = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: "Bound".into(),
        status: "False".into(),
        reason: crate::validate::INVALID_SPEC.into(),
        message: why.clone(),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ),
        observed_generation: claim.metadata.generation,
    };
    let status = SandboxClaimStatus {
        phase: ClaimPhase::Failed,
        conditions: vec![cond],
        ..Default::default()
    };
    set_status(ctx, claim, &status).await?;
    event_warning(ctx, claim, crate::validate::INVALID_SPEC, why).await;
    Ok(Action::await_change())
}

fn forget_waiter(ctx: &Ctx, uid: &str) {
    let mut waiting = ctx.waiting.lock().unwrap_or_else(|e| e.into_inner());
    waiting.remove(uid);
    ctx.metrics.claims_waiting.set(waiting.len() as i64);
}

/// Records `claim` as waiting for its pool; returns its place among the pool's waiters (0 first).
fn wait_in_line(ctx: &Ctx, claim: &SandboxClaim) -> usize {
    let ns = claim.namespace().unwrap_or_default();
    let pool = format!("{ns}/{}", claim.spec.pool_name);
    let order = (
        claim
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
        claim.name_any(),
    );
    let mut waiting = ctx.waiting.lock().unwrap_or_else(|e| e.into_inner());
    waiting.insert(
        claim.uid().unwrap_or_default(),
        Waiter {
            pool: pool.clone(),
            order: order.clone(),
            claim: ObjectRef::from_obj(claim),
        },
    );
    ctx.metrics.claims_waiting.set(waiting.len() as i64);
    waiting
        .values()
        .filter(|w| w.pool == pool && w.order < order)
        .count()
}

/// The waiting claims a pool pod's change should wake: as many of its pool's oldest waiters as
/// the pool has idle, Ready pods (waking every waiter on every pod change would be quadratic).
fn waiters_of(ctx: &Ctx, pod: &Pod) -> Vec<ObjectRef<SandboxClaim>> {
    let Some(pool) = pod.labels().get(&ctx.contract.label_pool) else {
        return Vec::new();
    };
    let ns = pod.namespace().unwrap_or_default();
    let key = format!("{ns}/{pool}");
    let mut waiters: Vec<Waiter> = {
        let waiting = ctx.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting
            .values()
            .filter(|w| w.pool == key)
            .cloned()
            .collect()
    };
    if waiters.is_empty() {
        return Vec::new();
    }
    let idle = pool_pods(ctx, &ns, pool)
        .iter()
        .filter(|p| {
            let v = PodView::of(p, &ctx.contract);
            v.phase == Some(Phase::Idle) && v.ready && !v.deleting && !v.failed
        })
        .count();
    waiters.sort_by(|a, b| a.order.cmp(&b.order));
    waiters.into_iter().take(idle).map(|w| w.claim).collect()
}

/// The claim's bound pod, if it is still running the claim's sandbox.
fn live_pod(ctx: &Ctx, ns: &str, status: &SandboxClaimStatus) -> Option<Arc<Pod>> {
    let name = status.pod_name.as_deref()?;
    let pod = ctx.pods.get(&ObjectRef::new(name).within(ns))?;
    let labels = pod.labels();
    (labels.get(&ctx.contract.label_phase).map(String::as_str) == Some("running")
        && labels.get(&ctx.contract.label_sandbox_id) == status.sandbox_id.as_ref())
    .then_some(pod)
}

/// A Released or Failed claim: deleted `ttlSecondsAfterFinished` (the claim's, else its pool's
/// `claimTtlSecondsAfterFinished`) after its sandbox stopped; kept forever without one.
async fn finished(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
    let ttl = claim.spec.ttl_seconds_after_finished.or_else(|| {
        ctx.pool_store
            .get(&ObjectRef::new(&claim.spec.pool_name).within(&ns))
            .and_then(|p| p.spec.claim_ttl_seconds_after_finished)
    });
    let Some(ttl) = ttl else {
        return Ok(Action::await_change());
    };
    let stopped = status
        .stop
        .as_ref()
        .map(|s| s.stopped_at.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let due = stopped + jiff::SignedDuration::from_secs(ttl.max(0));
    let now = jiff::Timestamp::now();
    if now < due {
        let left = Duration::try_from(due.duration_since(now)).unwrap_or_default();
        return Ok(Action::requeue(left + Duration::from_millis(50)));
    }
    let api: Api<SandboxClaim> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .delete(&claim.name_any(), &DeleteParams::default())
        .await
    {
        Ok(_) => {
            tracing::info!(claim = %claim.name_any(), ttl, "finished claim deleted after its TTL")
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// A stop record stamped now.
fn stop_record(reason: &str, message: Option<String>) -> crate::crd::StopRecord {
    crate::crd::StopRecord {
        reason: reason.into(),
        stopped_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        message,
        exit_code: None,
        images: Vec::new(),
        last_active: None,
    }
}

/// How a dead pod ended, from its status: the first terminated container (its reason, exit
/// code and finish time) or the pod's own reason (Evicted), and the images it ran.
pub fn death_record(pod: &Pod) -> crate::crd::StopRecord {
    let status = pod.status.clone().unwrap_or_default();
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.clone());
    let reason = status
        .reason
        .clone()
        .or_else(|| terminated.as_ref().and_then(|t| t.reason.clone()))
        .unwrap_or_else(|| "PodFailed".into());
    let stopped_at = terminated
        .as_ref()
        .and_then(|t| t.finished_at.clone())
        .unwrap_or(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ));
    let mut images: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.image.clone())
        .collect();
    images.dedup();
    crate::crd::StopRecord {
        reason,
        stopped_at,
        message: status
            .message
            .clone()
            .or_else(|| terminated.as_ref().and_then(|t| t.message.clone())),
        exit_code: terminated.map(|t| t.exit_code),
        images,
        last_active: None,
    }
}

/// How the claim's pod was released, from its `stop-reason`, `stopped-at` and `last-active`
/// annotations (`PodGone` if it is gone).
async fn release_record(
    ctx: &Ctx,
    ns: &str,
    status: &SandboxClaimStatus,
) -> crate::crd::StopRecord {
    let mut record = stop_record("PodGone", None);
    let Some(name) = status.pod_name.as_deref() else {
        return record;
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let Ok(Some(pod)) = api.get_opt(name).await else {
        return record;
    };
    let ann = pod.annotations();
    if let Some(r) = ann.get(&ctx.contract.ann_stop_reason) {
        record.reason = r.clone();
    }
    if let Some(at) = ann
        .get(&ctx.contract.ann_stopped_at)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    {
        record.stopped_at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at);
    }
    record.last_active = ann.get(&ctx.contract.ann_last_active).cloned();
    record
}

/// A bound claim's absolute lifetime (`spec.timeout`): keeps `status.expiresAt` current, releases
/// the sandbox at expiry (stop reason `Timeout`), and comes back when it is due.
async fn bound_claim_lifetime(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
    if let Some(pod) = live_pod(ctx, &ns, status) {
        if matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Failed" | "Succeeded")
        ) {
            return sandbox_died(ctx, claim, status, &pod).await;
        }
    }
    sync_idle_timeout(ctx, claim, status).await?;
    let Some(expires) = claim.expires_at() else {
        if status.expires_at.is_some() {
            let cleared = SandboxClaimStatus {
                expires_at: None,
                ..status.clone()
            };
            set_status(ctx, claim, &cleared).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    let now = jiff::Timestamp::now();
    if now >= expires {
        return expire(ctx, claim, status).await;
    }
    let at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(expires);
    if status.expires_at.as_ref() != Some(&at) {
        let current = SandboxClaimStatus {
            expires_at: Some(at),
            ..status.clone()
        };
        set_status(ctx, claim, &current).await?;
    }
    let left = Duration::try_from(expires.duration_since(now)).unwrap_or_default();
    Ok(Action::requeue(
        left.min(Duration::from_secs(60)) + Duration::from_millis(20),
    ))
}

/// The claimed pod died (OOMKilled, an exit code, evicted): the claim turns Failed with the
/// record of how, written before the pod is released (the pool deletes it after).
async fn sandbox_died(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
    pod: &Pod,
) -> Result<Action, Error> {
    let record = death_record(pod);
    let id = status.sandbox_id.clone().unwrap_or_default();
    let note = format!(
        "sandbox {id} died: {}{}",
        record.reason,
        record
            .exit_code
            .map(|c| format!(" (exit code {c})"))
            .unwrap_or_default()
    );
    let failed = SandboxClaimStatus {
        phase: ClaimPhase::Failed,
        stop: Some(record),
        ..status.clone()
    };
    set_status(ctx, claim, &failed).await?;
    tracing::warn!(claim = %claim.name_any(), pod = %pod.name_any(), %note, "claimed pod died");
    event_warning(ctx, claim, "SandboxFailed", note).await;
    release_pod(
        ctx,
        &claim.namespace().unwrap_or_default(),
        &pod.name_any(),
        &id,
        "PodFailed",
    )
    .await?;
    Ok(Action::await_change())
}

/// A bound claim's `spec.idleTimeout` changed: the pod's `idle-timeout` annotation follows.
async fn sync_idle_timeout(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
) -> Result<(), Error> {
    let Some(want) = claim.spec.idle_timeout.as_deref() else {
        return Ok(());
    };
    let ns = claim.namespace().unwrap_or_default();
    let Some(pod) = live_pod(ctx, &ns, status) else {
        return Ok(());
    };
    if pod
        .annotations()
        .get(&ctx.contract.ann_idle_timeout)
        .map(String::as_str)
        == Some(want)
    {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {ctx.contract.ann_idle_timeout.clone(): want}}});
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    tracing::info!(claim = %claim.name_any(), pod = %pod.name_any(), idle_timeout = want, "idle timeout changed");
    Ok(())
}

/// Releases an expired claim's sandbox (guarded: only if the pod still runs this sandbox) and
/// marks the claim Released with stop reason `Timeout`.
async fn expire(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
    let id = status.sandbox_id.clone().unwrap_or_default();
    if let Some(pod) = status.pod_name.as_deref() {
        release_pod(ctx, &ns, pod, &id, "Timeout").await?;
    }
    let released = SandboxClaimStatus {
        phase: ClaimPhase::Released,
        stop: Some(stop_record(
            "Timeout",
            Some(format!(
                "spec.timeout {} reached",
                claim.spec.timeout.as_deref().unwrap_or_default()
            )),
        )),
        ..status.clone()
    };
    set_status(ctx, claim, &released).await?;
    tracing::info!(claim = %claim.name_any(), sandbox_id = %id, "claim timeout: sandbox released");
    event(
        ctx,
        claim,
        "Timeout",
        format!("sandbox {id} released: its timeout passed"),
    )
    .await;
    Ok(Action::await_change())
}

/// Flips a claimed pod to `stopping` with a stop reason, only if it still runs `id` (a pod
/// re-claimed or already released since is left alone).
async fn release_pod(ctx: &Ctx, ns: &str, pod: &str, id: &str, reason: &str) -> Result<(), Error> {
    let c = &ctx.contract;
    let label = |k: &str| format!("/metadata/labels/{}", crate::idle::json_pointer(k));
    let ann = |k: &str| format!("/metadata/annotations/{}", crate::idle::json_pointer(k));
    let ops = json!([
        {"op": "test", "path": label(&c.label_phase), "value": "running"},
        {"op": "test", "path": label(&c.label_sandbox_id), "value": id},
        {"op": "replace", "path": label(&c.label_phase), "value": "stopping"},
        {"op": "add", "path": ann(&c.ann_stop_reason), "value": reason},
        {"op": "add", "path": ann(&c.ann_stopped_at), "value": format_time(SystemTime::now())},
    ]);
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| Error::Finalizer(e.to_string()))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .patch(pod, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => {
            tracing::info!(pod, sandbox_id = %id, reason, "sandbox released");
            Ok(())
        }
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The pod cache may lag behind a bind: before calling a claim released, ask the API.
async fn still_bound_in_api(
    ctx: &Ctx,
    ns: &str,
    status: &SandboxClaimStatus,
) -> Result<bool, Error> {
    let Some(name) = status.pod_name.as_deref() else {
        return Ok(false);
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let Some(pod) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let labels = pod.labels();
    Ok(
        labels.get(&ctx.contract.label_phase).map(String::as_str) == Some("running")
            && labels.get(&ctx.contract.label_sandbox_id) == status.sandbox_id.as_ref(),
    )
}

async fn apply_claim(claim: Arc<SandboxClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (claim, ctx) = (&*claim, &*ctx);
    let ns = claim.namespace().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    let status = claim.status.clone().unwrap_or_default();
    match status.phase {
        ClaimPhase::Released | ClaimPhase::Failed => return finished(ctx, claim, &status).await,
        ClaimPhase::Bound => {
            ctx.bound
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
            if live_pod(ctx, &ns, &status).is_some()
                || still_bound_in_api(ctx, &ns, &status).await?
            {
                return bound_claim_lifetime(ctx, claim, &status).await;
            }
            // Released for idleness (or the pod is gone): the claim is over.
            let note = format!(
                "sandbox {} released",
                status.sandbox_id.as_deref().unwrap_or_default()
            );
            let record = release_record(ctx, &ns, &status).await;
            let released = SandboxClaimStatus {
                phase: ClaimPhase::Released,
                stop: Some(record),
                ..status
            };
            set_status(ctx, claim, &released).await?;
            event(ctx, claim, "Released", note).await;
            return Ok(Action::await_change());
        }
        ClaimPhase::Pending => {}
    }
    let remembered = ctx
        .bound
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&uid)
        .cloned();
    if remembered.is_some() {
        // Bound by this process already; the status write is what is missing.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if let Err(why) = crate::validate::check_claim(&claim.spec, &ctx.contract) {
        return refuse_claim(ctx, claim, why).await;
    }
    if let Some(action) = adopt(ctx, claim).await? {
        return Ok(action);
    }
    let place = wait_in_line(ctx, claim);
    let Some(pool) = ctx
        .pool_store
        .get(&ObjectRef::new(&claim.spec.pool_name).within(&ns))
    else {
        let msg = format!("SandboxPool {} does not exist", claim.spec.pool_name);
        set_pending(ctx, claim, "PoolNotFound", msg).await?;
        // A pool appearing does not trigger claims: look again now and then.
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let timeout = claim
        .spec
        .idle_timeout
        .clone()
        .or(pool.spec.default_idle_timeout.clone());
    if let Some(t) = &timeout {
        if parse_idle_timeout(t).is_err() {
            let msg = format!(
                "SandboxPool {} has an invalid spec.defaultIdleTimeout {t:?}",
                claim.spec.pool_name
            );
            set_pending(ctx, claim, "PoolInvalidSpec", msg).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    }
    let mut candidates: Vec<Arc<Pod>> = pool_pods(ctx, &ns, &claim.spec.pool_name)
        .into_iter()
        .filter(|p| {
            let v = PodView::of(p, &ctx.contract);
            v.phase == Some(Phase::Idle) && v.ready && !v.deleting && !v.failed
        })
        .collect();
    // Waiters are served in creation order: the first n take the n idle pods.
    if place >= candidates.len() {
        return wait_for_refill(ctx, claim).await;
    }
    // Spread concurrent claims over different pods.
    for i in (1..candidates.len()).rev() {
        candidates.swap(i, rand::random_range(0..=i));
    }
    for pod in candidates {
        let id = new_sandbox_id();
        match bind(ctx, claim, &pod, &id, timeout.as_deref()).await {
            Ok(()) => {
                ctx.bound
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(uid.clone(), pod.name_any());
                forget_waiter(ctx, &uid);
                let bound = bound_status(ctx, claim, &pod.name_any(), &id);
                set_status(ctx, claim, &bound).await?;
                let note = format!(
                    "bound pod {} as sandbox {}",
                    pod.name_any(),
                    bound.sandbox_id.as_deref().unwrap_or_default()
                );
                event(ctx, claim, "Bound", note).await;
                if let Some(created) = claim.meta().creation_timestamp.as_ref() {
                    let waited = SystemTime::now()
                        .duration_since(SystemTime::from(created.0))
                        .unwrap_or_default();
                    ctx.metrics.claim_seconds.observe(waited.as_secs_f64());
                }
                return Ok(claim.expires_at().map_or(
                    Action::requeue(Duration::from_secs(60)),
                    |e| {
                        let left = Duration::try_from(e.duration_since(jiff::Timestamp::now()))
                            .unwrap_or_default();
                        Action::requeue(left.min(Duration::from_secs(60)))
                    },
                ));
            }
            Err(Error::Kube(kube::Error::Api(e))) if crate::validate::is_invalid_object(&e) => {
                // The API server refuses what the claim asks the pod to carry.
                return refuse_claim(ctx, claim, e.message.clone()).await;
            }
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 || e.code == 422 => continue,
            Err(e) => return Err(e),
        }
    }
    wait_for_refill(ctx, claim).await
}

/// No idle pod for this claim yet: Pending with `NoIdlePod`, woken by the pod watch when its pool
/// changes (the requeue is only a safety net).
async fn wait_for_refill(ctx: &Ctx, claim: &SandboxClaim) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
    // Why the pool does not refill, if it knows (an image that cannot be pulled, a quota).
    let why = ctx
        .pool_store
        .get(&ObjectRef::new(&claim.spec.pool_name).within(&ns))
        .and_then(|p| {
            p.status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status != "True")
                .filter(|c| !matches!(c.reason.as_str(), "Replenishing" | "Full"))
                .map(|c| format!(": {}: {}", c.reason, c.message))
        })
        .unwrap_or_default();
    let msg = format!(
        "pool {} has no idle, Ready pod; waiting for it to refill{why}",
        claim.spec.pool_name
    );
    set_pending(ctx, claim, "NoIdlePod", msg).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// A claim whose status was lost (a crash between the bind and the status write, or a status
/// patched away) finds the pod it bound by the claim UID on it, and takes it again rather than a
/// second one. `None` when it holds no pod.
async fn adopt(ctx: &Ctx, claim: &SandboxClaim) -> Result<Option<Action>, Error> {
    let ns = claim.namespace().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    let Some(pod) = pool_pods(ctx, &ns, &claim.spec.pool_name)
        .into_iter()
        .find(|p| {
            p.annotations().get(ANN_CLAIM_UID) == Some(&uid)
                && PodView::of(p, &ctx.contract).phase == Some(Phase::Running)
        })
    else {
        return Ok(None);
    };
    let Some(id) = pod.labels().get(&ctx.contract.label_sandbox_id).cloned() else {
        return Ok(None);
    };
    tracing::info!(claim = %claim.name_any(), pod = %pod.name_any(), sandbox_id = %id, "claim adopts the pod it bound");
    forget_waiter(ctx, &uid);
    let status = bound_status(ctx, claim, &pod.name_any(), &id);
    set_status(ctx, claim, &status).await?;
    Ok(Some(Action::requeue(Duration::from_secs(1))))
}

/// The status of a claim bound to `pod` as sandbox `id`.
fn bound_status(ctx: &Ctx, claim: &SandboxClaim, pod: &str, id: &str) -> SandboxClaimStatus {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    SandboxClaimStatus {
        bound_at: Some(now.clone()),
        expires_at: claim
            .expires_at()
            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
        stop: None,
        phase: ClaimPhase::Bound,
        url: ctx.domain.as_ref().map(|d| format!("{id}.{d}")),
        sandbox_id: Some(id.to_string()),
        pod_name: Some(pod.to_string()),
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Bound".into(),
            status: "True".into(),
            reason: "Bound".into(),
            message: format!("bound pod {pod}"),
            last_transition_time: now,
            observed_generation: claim.metadata.generation,
        }],
    }
}

/// Claims `pod` for `claim` in one guarded patch.
async fn bind(
    ctx: &Ctx,
    claim: &SandboxClaim,
    pod: &Pod,
    id: &str,
    timeout: Option<&str>,
) -> Result<(), Error> {
    let c = &ctx.contract;
    let label = |k: &str| format!("/metadata/labels/{}", crate::idle::json_pointer(k));
    let ann = |k: &str| format!("/metadata/annotations/{}", crate::idle::json_pointer(k));
    let mut ops = vec![
        json!({"op": "test", "path": label(&c.label_phase), "value": "idle"}),
        json!({"op": "replace", "path": label(&c.label_phase), "value": "running"}),
        json!({"op": "add", "path": label(&c.label_sandbox_id), "value": id}),
    ];
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    let claim_ref = format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    ops.push(json!({"op": "add", "path": ann(&c.ann_claimed_at), "value": format_time(SystemTime::now())}));
    ops.push(json!({"op": "add", "path": ann(ANN_CLAIM), "value": claim_ref}));
    ops.push(
        json!({"op": "add", "path": ann(ANN_CLAIM_UID), "value": claim.uid().unwrap_or_default()}),
    );
    if let Some(t) = timeout {
        ops.push(json!({"op": "add", "path": ann(&c.ann_idle_timeout), "value": t}));
    }
    for (k, v) in &claim.spec.labels {
        if !k.starts_with(&c.prefix) {
            ops.push(json!({"op": "add", "path": label(k), "value": v}));
        }
    }
    for (k, v) in &claim.spec.annotations {
        if !k.starts_with(&c.prefix) {
            ops.push(json!({"op": "add", "path": ann(k), "value": v}));
        }
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| Error::Finalizer(e.to_string()))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    api.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Json::<()>(patch),
    )
    .await?;
    Ok(())
}

async fn cleanup_claim(claim: Arc<SandboxClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (claim, ctx) = (&*claim, &*ctx);
    let ns = claim.namespace().unwrap_or_default();
    let status = claim.status.clone().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    forget_waiter(ctx, &uid);
    // Its pod: from the status, else (deleted between the bind and the status write) the pod
    // carrying its UID.
    let bound = status
        .pod_name
        .clone()
        .zip(status.sandbox_id.clone())
        .or_else(|| {
            pool_pods(ctx, &ns, &claim.spec.pool_name)
                .into_iter()
                .find(|p| p.annotations().get(ANN_CLAIM_UID) == Some(&uid))
                .and_then(|p| {
                    let id = p.labels().get(&ctx.contract.label_sandbox_id)?.clone();
                    Some((p.name_any(), id))
                })
        });
    if let Some((pod, id)) = bound {
        release_pod(ctx, &ns, &pod, &id, "ClaimDeleted").await?;
    }
    ctx.bound
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&claim.uid().unwrap_or_default());
    Ok(Action::await_change())
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
            let own = p.annotations().get(ANN_CLAIM).and_then(|r| {
                let (ns, name) = r.split_once('/')?;
                Some(ObjectRef::<SandboxClaim>::new(name).within(ns))
            });
            let mut refs = waiters_of(&ctx, &p);
            refs.extend(own);
            refs
        }
    };
    let pools_ctl = Controller::for_stream(pools, pool_store)
        .watches_stream(pool_pods.map(Ok), to_pool)
        .run(reconcile_pool, error_policy, ctx.clone())
        .for_each(log_outcome);
    let claims_ctl = Controller::new(claims, watcher::Config::default())
        .watches_stream(claim_pods.map(Ok), to_claim)
        .run(reconcile_claim, error_policy, ctx)
        .for_each(log_outcome);
    tokio::join!(pools_ctl, claims_ctl);
}
