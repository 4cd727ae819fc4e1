//! The pool executor: carries out `pool::plan_pool` for one pool pass (mark Ready pods idle,
//! delete, create in growing batches), then writes the pool's status and conditions.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use sandgate_shared::Phase;

use super::{event, event_warning, json_patch, not_leader, pool_pods, with_finalizer, Ctx, Error};
use super::{PoolPhase, POOL_FINALIZER};
use crate::backoff::FailureBackoff;
use crate::crd::SandboxPool;
use crate::pool::{plan_pool, PodView};

/// The most pods one pool pass creates: refills are rate-shaped, so a claim burst is not starved
/// by them, and a scale-up writes its status every pass.
pub const MAX_CREATES_PER_PASS: usize = 64;

/// The least time between two status writes of one pool whose Ready condition stays the same.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

pub async fn reconcile(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if let Some(a) = not_leader(&ctx) {
        return Ok(a);
    }
    with_finalizer(pool, POOL_FINALIZER, ctx, apply, cleanup).await
}

async fn apply(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (pool, ctx) = (&*pool, &*ctx);
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    if let Err(why) = crate::validate::check_pool(&pool.spec) {
        return refuse(ctx, pool, why).await;
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

    mark_idle(ctx, &ns, &key, &plan.mark_idle, &views).await?;
    // Failed pods are replaced with exponential backoff.
    let failed: Vec<&str> = views
        .iter()
        .filter(|v| v.failed || v.phase == Some(Phase::Failed))
        .map(|v| v.name.as_str())
        .collect();
    let backoff = ctx
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.clone())
        .or_insert_with(|| FailureBackoff::new(Instant::now()))
        .observe(
            failed.iter().copied(),
            !plan.mark_idle.is_empty(),
            Instant::now(),
        );
    if !failed.is_empty() {
        let note = format!("{} failed pod(s) replaced", failed.len());
        event(ctx, pool, "PodFailed", note).await;
    }
    delete(ctx, &ns, &key, &plan.delete, &pods).await?;
    // A refused create (a quota, say) is retried after its own backoff, whatever wakes the
    // pool meanwhile; the refusal stays in the status until a create succeeds.
    let (refused_wait, last_refusal) = {
        let b = ctx.create_backoff.lock().unwrap_or_else(|e| e.into_inner());
        let b = b.get(&key);
        let wait = b.and_then(|b| b.wait(Instant::now()));
        (wait, b.and_then(|b| b.why().map(String::from)))
    };
    if backoff.is_some() || refused_wait.is_some() {
        plan.create = 0;
    }
    let refusal = match create(ctx, pool, &key, plan.create).await {
        Some(e) => {
            let mut b = ctx.create_backoff.lock().unwrap_or_else(|e| e.into_inner());
            let wait = b
                .entry(key.clone())
                .or_default()
                .refused(e.clone(), Instant::now());
            tracing::warn!(pool = %key, error = %e, retry_in = ?wait, "pod create refused; backing off");
            Some(e)
        }
        None if plan.create > 0 => {
            let mut b = ctx.create_backoff.lock().unwrap_or_else(|e| e.into_inner());
            b.remove(&key);
            None
        }
        None => last_refusal,
    };
    let retry_in = {
        let b = ctx.create_backoff.lock().unwrap_or_else(|e| e.into_inner());
        b.get(&key).and_then(|b| b.wait(Instant::now()))
    };
    record_metrics(ctx, &key, &plan.status);
    tracing::debug!(pool = %key, cached = views.len(), expected, create = plan.create, delete = plan.delete.len(), mark_idle = plan.mark_idle.len(), backoff = ?backoff, "pool reconciled");

    let problem = refusal
        .map(|e| ("PodCreateFailed".to_string(), e))
        .or_else(|| {
            pods.iter()
                .filter(|p| PodView::of(p, &ctx.contract).phase == Some(Phase::Starting))
                .find_map(|p| crate::pool::pod_problem(p))
        });
    let update = crate::pool::pool_status(
        plan.status,
        pool,
        backoff.is_some(),
        problem,
        jiff::Timestamp::now(),
    );
    if let Some(ready) = &update.warn {
        event_warning(ctx, pool, &ready.reason, ready.message.clone()).await;
    }
    let status = update.status;
    // Written only when it says something new, and while pods churn (a burst) at most every
    // STATUS_EVERY unless the Ready condition changes. A refused create never stops it: the
    // refusal is what the status says.
    let mut status_due = None;
    if pool.status.as_ref() != Some(&status) {
        let since = {
            let w = ctx.status_written.lock().unwrap_or_else(|e| e.into_inner());
            w.get(&key).map(Instant::elapsed)
        };
        match since {
            Some(since) if !update.urgent && since < STATUS_EVERY => {
                status_due = Some(STATUS_EVERY - since);
            }
            _ => {
                let patch = crate::patches::pool_status(pool.status.as_ref(), &status);
                let api: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                let mut w = ctx.status_written.lock().unwrap_or_else(|e| e.into_inner());
                w.insert(key.clone(), Instant::now());
            }
        }
    }
    // Looked at again by the next failure backoff, the next rotation, after a failed or
    // unfinished create, or 30 s at the latest.
    let creating = if retry_in.is_some() {
        retry_in
    } else if plan.create > MAX_CREATES_PER_PASS {
        Some(Duration::from_millis(100))
    } else {
        None
    };
    let again = [backoff, plan.rotate_in, creating, status_due]
        .into_iter()
        .flatten()
        .fold(Duration::from_secs(30), Duration::min);
    Ok(Action::requeue(again.max(Duration::from_millis(100))))
}

/// Ready warm pods: `starting` → `idle` (guarded: the cache may still show `starting` for a pod
/// already idle or claimed).
async fn mark_idle(
    ctx: &Ctx,
    ns: &str,
    key: &str,
    names: &[String],
    views: &[PodView],
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for n in names {
        let patch = json_patch(crate::patches::mark_idle(&ctx.contract))?;
        match api
            .patch(n, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => tracing::debug!(pool = %key, pod = %n, "pod ready: starting -> idle"),
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => continue,
            Err(e) => return Err(e.into()),
        }
        if let Some(v) = views.iter().find(|v| &v.name == n) {
            let took = SystemTime::now().duration_since(v.created);
            let took = took.unwrap_or_default().as_secs_f64();
            ctx.metrics.replenish_seconds.observe(took);
        }
    }
    Ok(())
}

/// Deletes pods the plan retires, each only as the cache saw it: one claimed (or otherwise
/// changed) since is a 409 and stays.
async fn delete(
    ctx: &Ctx,
    ns: &str,
    key: &str,
    names: &[String],
    pods: &[Arc<Pod>],
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for n in names {
        let seen_rv = pods
            .iter()
            .find(|p| p.metadata.name.as_ref() == Some(n))
            .and_then(|p| p.metadata.resource_version.clone());
        match api.delete(n, &as_seen(seen_rv)).await {
            Ok(_) => tracing::debug!(pool = %key, pod = %n, "pod deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                tracing::debug!(pool = %key, pod = %n, code = e.code, "pod delete skipped")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn as_seen(resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version,
            uid: None,
        }),
        ..Default::default()
    }
}

/// Every phase, so one that no longer has pods reads 0 rather than its last count.
fn record_metrics(ctx: &Ctx, key: &str, status: &crate::crd::SandboxPoolStatus) {
    for phase in Phase::ALL {
        let n = status.replicas.get(phase.as_str()).copied().unwrap_or(0);
        let labels = PoolPhase {
            pool: key.to_string(),
            phase: phase.as_str().to_string(),
        };
        ctx.metrics
            .pool_pods
            .get_or_create(&labels)
            .set(i64::from(n));
    }
}

/// Creates up to `n` (at most [`MAX_CREATES_PER_PASS`]) pool pods in growing batches (1, 2, 4, …,
/// each batch's creates concurrent), as ReplicaSets do, stopping at the first refusal (a quota
/// 403, say). Returns the refusal, for the pool's status.
async fn create(ctx: &Ctx, pool: &SandboxPool, key: &str, n: usize) -> Option<String> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let mut left = n.min(MAX_CREATES_PER_PASS);
    let mut batch = 1;
    while left > 0 {
        let size = batch.min(left);
        let creates = (0..size).map(|_| {
            let pod = crate::pool::new_pod(pool, &ctx.contract, &super::random_id(8));
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            ctx.expectations.expect(key, &pod_name);
            let api = api.clone();
            async move { (pod_name, api.create(&PostParams::default(), &pod).await) }
        });
        let mut refused = None;
        for (pod_name, r) in futures::future::join_all(creates).await {
            let outcome = if r.is_ok() { "created" } else { "refused" };
            let labels = crate::metrics::Labels { label: outcome };
            ctx.metrics.pod_creates.get_or_create(&labels).inc();
            match r {
                Ok(_) => tracing::debug!(pool = %key, pod = %pod_name, "pod created"),
                Err(e) => {
                    // No pod is coming: the create backoff, not the expectation, holds retries.
                    ctx.expectations.forget(key, &pod_name);
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
async fn refuse(ctx: &Ctx, pool: &SandboxPool, why: String) -> Result<Action, Error> {
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
        let generation = pool.metadata.generation;
        let cond = crate::patches::condition(
            "Ready",
            false,
            crate::validate::INVALID_SPEC,
            why.clone(),
            generation,
            jiff::Timestamp::now(),
        );
        let patch = serde_json::json!({"status": {
            "observedGeneration": generation.unwrap_or(0),
            "conditions": [cond],
        }});
        let api: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        event_warning(ctx, pool, crate::validate::INVALID_SPEC, why).await;
    }
    Ok(Action::await_change())
}

/// A deleted pool: its unclaimed pods go; it stays (the finalizer) while claimed ones remain.
async fn cleanup(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (pool, ctx) = (&*pool, &*ctx);
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut claimed = 0;
    for p in pool_pods(ctx, &ns, &name) {
        if PodView::of(&p, &ctx.contract).phase == Some(Phase::Running) {
            claimed += 1;
        } else if p.metadata.deletion_timestamp.is_none() {
            let _ = api
                .delete(&p.name_any(), &as_seen(p.metadata.resource_version.clone()))
                .await;
        }
    }
    if claimed > 0 {
        return Err(Error::ClaimedRemain(format!("{ns}/{name}")));
    }
    Ok(Action::await_change())
}
