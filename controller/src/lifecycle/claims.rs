//! The claim executor: carries out `claim::plan_claim` for a Pending claim (refuse, adopt, bind,
//! wait) and releases a deleted claim's sandbox. Bound and finished claims go to `bound`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::{bound, event, event_warning, json_patch, not_leader, pool_pods, waiters};
use super::{with_finalizer, Ctx, Error, CLAIM_FINALIZER};
use crate::claim::{plan_claim, ClaimStep, Facts};
use crate::crd::{SandboxClaim, SandboxClaimStatus};
use crate::patches::CLAIM_UID_ANNOTATION;

pub async fn reconcile(claim: Arc<SandboxClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if let Some(a) = not_leader(&ctx) {
        return Ok(a);
    }
    with_finalizer(claim, CLAIM_FINALIZER, ctx, apply, cleanup).await
}

async fn apply(claim: Arc<SandboxClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (claim, ctx) = (&*claim, &*ctx);
    let ns = claim.namespace().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    let pool = ctx
        .pool_store
        .get(&ObjectRef::new(&claim.spec.pool_name).within(&ns));
    let pods = pool_pods(ctx, &ns, &claim.spec.pool_name);
    // Bound by this process: remembered until the pod cache shows the bind.
    let bound_here = {
        let bound = ctx.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.get(&uid).map(|(_, at)| at.elapsed())
    };
    let facts = Facts {
        claim,
        pool: pool.as_deref(),
        pods: &pods,
        ahead: waiters::ahead_of(ctx, claim),
        bound_here,
    };
    let step = plan_claim(&facts, &ctx.contract, jiff::Timestamp::now());
    tracing::trace!(claim = %claim.name_any(), ?step, "claim planned");
    match step {
        ClaimStep::Finished { delete_at } => bound::finished(ctx, claim, delete_at).await,
        ClaimStep::AwaitPod => Ok(Action::requeue(Duration::from_secs(1))),
        ClaimStep::Bound(step) => {
            forget_bind(ctx, &uid);
            let name = claim.status.as_ref().and_then(|s| s.pod_name.clone());
            match pods.iter().find(|p| Some(p.name_any()) == name) {
                Some(pod) => bound::run(ctx, claim, step, pod).await,
                None => bound::confirm(ctx, claim).await,
            }
        }
        ClaimStep::Confirm => {
            forget_bind(ctx, &uid);
            bound::confirm(ctx, claim).await
        }
        // Bound by this process already; the status write is what is missing.
        ClaimStep::AwaitStatus => Ok(Action::requeue(Duration::from_secs(1))),
        ClaimStep::Refuse(why) => refuse(ctx, claim, why).await,
        ClaimStep::Adopt { pod, sandbox_id } => {
            tracing::info!(claim = %claim.name_any(), %pod, %sandbox_id, "claim adopts the pod it bound");
            waiters::forget(ctx, &uid);
            let status = bound_status(ctx, claim, &pods, &pod, &sandbox_id);
            set_status(ctx, claim, &status).await?;
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        ClaimStep::PoolMissing => {
            waiters::wait(ctx, claim);
            let msg = format!("SandboxPool {} does not exist", claim.spec.pool_name);
            set_pending(ctx, claim, "PoolNotFound", msg).await?;
            // A pool appearing does not trigger claims: look again now and then.
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        ClaimStep::PoolInvalid(msg) => {
            set_pending(ctx, claim, "PoolInvalidSpec", msg).await?;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        ClaimStep::Wait => {
            waiters::wait(ctx, claim);
            wait_for_refill(ctx, claim).await
        }
        ClaimStep::Bind {
            candidates,
            idle_timeout,
        } => {
            waiters::wait(ctx, claim);
            take_one(ctx, claim, &pods, candidates, idle_timeout.as_deref()).await
        }
    }
}

fn forget_bind(ctx: &Ctx, uid: &str) {
    ctx.bound
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid);
}

/// Binds the first candidate that is still idle, in random order so concurrent claims spread
/// over different pods. A lost race (422 on the `test`, 409) tries the next; a pod the API server
/// refuses to carry the claim's labels refuses the claim.
async fn take_one(
    ctx: &Ctx,
    claim: &SandboxClaim,
    pods: &[Arc<Pod>],
    mut candidates: Vec<String>,
    idle_timeout: Option<&str>,
) -> Result<Action, Error> {
    for i in (1..candidates.len()).rev() {
        candidates.swap(i, rand::random_range(0..=i));
    }
    let uid = claim.uid().unwrap_or_default();
    for name in candidates {
        let Some(pod) = pods.iter().find(|p| p.name_any() == name) else {
            continue;
        };
        let id = super::new_sandbox_id();
        let ops = crate::patches::bind(
            &ctx.contract,
            claim,
            pod,
            &id,
            idle_timeout,
            SystemTime::now(),
        );
        let api: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Json::<()>(json_patch(ops)?),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if crate::validate::is_invalid_object(&e) => {
                // The API server refuses what the claim asks the pod to carry.
                return refuse(ctx, claim, e.message.clone()).await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => continue,
            Err(e) => return Err(e.into()),
        }
        ctx.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.clone(), (name.clone(), std::time::Instant::now()));
        waiters::forget(ctx, &uid);
        let status = bound_status(ctx, claim, pods, &name, &id);
        set_status(ctx, claim, &status).await?;
        event(
            ctx,
            claim,
            "Bound",
            format!("bound pod {name} as sandbox {id}"),
        )
        .await;
        if let Some(created) = claim.meta().creation_timestamp.as_ref() {
            let waited = SystemTime::now().duration_since(SystemTime::from(created.0));
            let waited = waited.unwrap_or_default().as_secs_f64();
            ctx.metrics.claim_seconds.observe(waited);
        }
        let again = claim.expires_at().map_or(crate::claim::BOUND_RECHECK, |e| {
            let left = Duration::try_from(e.duration_since(jiff::Timestamp::now()));
            left.unwrap_or_default().min(crate::claim::BOUND_RECHECK)
        });
        return Ok(Action::requeue(again));
    }
    wait_for_refill(ctx, claim).await
}

fn bound_status(
    ctx: &Ctx,
    claim: &SandboxClaim,
    pods: &[Arc<Pod>],
    pod: &str,
    id: &str,
) -> SandboxClaimStatus {
    let domain = ctx.domain.as_deref();
    let ip = pods
        .iter()
        .find(|p| p.name_any() == pod)
        .and_then(|p| p.status.as_ref()?.pod_ip.clone());
    crate::patches::bound(
        claim,
        pod,
        ip.as_deref(),
        id,
        domain,
        jiff::Timestamp::now(),
    )
}

/// No idle pod for this claim yet: Pending with `NoIdlePod` and, if the pool knows, why it does
/// not refill (an image that cannot be pulled, a quota). Woken by the pod watch when its pool
/// changes; the requeue is only a safety net.
async fn wait_for_refill(ctx: &Ctx, claim: &SandboxClaim) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
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

pub(super) async fn set_status(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
) -> Result<(), Error> {
    let api: Api<SandboxClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let patch = crate::patches::claim_status(status);
    api.patch_status(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
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
    let status = crate::patches::pending(claim, reason, message, jiff::Timestamp::now());
    set_status(ctx, claim, &status).await
}

/// A claim that can never bind as written: Failed, with a `Bound=False` condition of reason
/// `InvalidSpec` naming the field, and a Warning event. Not retried.
async fn refuse(ctx: &Ctx, claim: &SandboxClaim, why: String) -> Result<Action, Error> {
    tracing::warn!(claim = %claim.name_any(), %why, "claim spec refused");
    waiters::forget(ctx, &claim.uid().unwrap_or_default());
    let status = crate::patches::refused(claim, why.clone(), jiff::Timestamp::now());
    set_status(ctx, claim, &status).await?;
    event_warning(ctx, claim, crate::validate::INVALID_SPEC, why).await;
    Ok(Action::await_change())
}

/// A deleted claim releases its pod: the one in its status, else (deleted between the bind and
/// the status write) the pod carrying its UID.
async fn cleanup(claim: Arc<SandboxClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (claim, ctx) = (&*claim, &*ctx);
    let ns = claim.namespace().unwrap_or_default();
    let status = claim.status.clone().unwrap_or_default();
    let uid = claim.uid().unwrap_or_default();
    waiters::forget(ctx, &uid);
    let held = status
        .pod_name
        .clone()
        .zip(status.sandbox_id.clone())
        .or_else(|| {
            pool_pods(ctx, &ns, &claim.spec.pool_name)
                .into_iter()
                .find(|p| p.annotations().get(CLAIM_UID_ANNOTATION) == Some(&uid))
                .and_then(|p| {
                    let id = p.labels().get(&ctx.contract.label_sandbox_id)?.clone();
                    Some((p.name_any(), id))
                })
        });
    if let Some((pod, id)) = held {
        bound::release_pod(ctx, &ns, &pod, &id, "ClaimDeleted").await?;
    }
    ctx.bound
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&uid);
    Ok(Action::await_change())
}
