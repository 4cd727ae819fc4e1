//! A bound claim's life (carrying out `claim::BoundStep`): its absolute timeout, its pod's death,
//! its release (by the idle reconciler or anyone), then its TTL once finished.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;

use super::claims::set_status;
use super::{event, event_warning, json_patch, Ctx, Error};
use crate::claim::{plan_bound, runs, BoundStep};
use crate::crd::{ClaimPhase, SandboxClaim, SandboxClaimStatus};

/// Carries out one step for a claim whose `pod` runs its sandbox.
pub async fn run(
    ctx: &Ctx,
    claim: &SandboxClaim,
    step: BoundStep,
    pod: &Pod,
) -> Result<Action, Error> {
    let status = claim.status.clone().unwrap_or_default();
    let ns = claim.namespace().unwrap_or_default();
    let pod_name = status.pod_name.clone().unwrap_or_default();
    match step {
        BoundStep::Died => died(ctx, claim, &status, pod).await,
        BoundStep::Expire => expire(ctx, claim, &status).await,
        BoundStep::Keep {
            expires_at,
            idle_timeout,
            again,
        } => {
            if let Some(want) = idle_timeout {
                let patch = crate::patches::annotation(&ctx.contract.ann_idle_timeout, &want);
                let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                api.patch(&pod_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                tracing::info!(claim = %claim.name_any(), pod = %pod_name, idle_timeout = %want, "idle timeout changed");
            }
            let at = expires_at.map(Time);
            if status.expires_at != at {
                let current = SandboxClaimStatus {
                    expires_at: at,
                    ..status
                };
                set_status(ctx, claim, &current).await?;
            }
            Ok(Action::requeue(again))
        }
    }
}

/// The cache does not show the claim's pod running its sandbox; it may lag behind a bind, so the
/// API decides. Still running: carry on. Else the claim is over, released with the record the
/// pod's annotations keep.
pub async fn confirm(ctx: &Ctx, claim: &SandboxClaim) -> Result<Action, Error> {
    let status = claim.status.clone().unwrap_or_default();
    let ns = claim.namespace().unwrap_or_default();
    let id = status.sandbox_id.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = match status.pod_name.as_deref() {
        Some(name) => api.get_opt(name).await?,
        None => None,
    };
    if let Some(pod) = pod.as_ref().filter(|p| runs(p, &ctx.contract, &id)) {
        let step = plan_bound(claim, pod, &ctx.contract, jiff::Timestamp::now());
        return run(ctx, claim, step, pod).await;
    }
    let record =
        crate::patches::release_record(&ctx.contract, pod.as_ref(), jiff::Timestamp::now());
    let released = SandboxClaimStatus {
        phase: ClaimPhase::Released,
        stop: Some(record),
        ..status
    };
    set_status(ctx, claim, &released).await?;
    event(ctx, claim, "Released", format!("sandbox {id} released")).await;
    Ok(Action::await_change())
}

/// The claimed pod died (OOMKilled, an exit code, evicted): the claim turns Failed with the
/// record of how, written before the pod is released (the pool deletes it after).
async fn died(
    ctx: &Ctx,
    claim: &SandboxClaim,
    status: &SandboxClaimStatus,
    pod: &Pod,
) -> Result<Action, Error> {
    let record = crate::patches::death_record(pod, jiff::Timestamp::now());
    let id = status.sandbox_id.clone().unwrap_or_default();
    let code = record.exit_code.map(|c| format!(" (exit code {c})"));
    let note = format!(
        "sandbox {id} died: {}{}",
        record.reason,
        code.unwrap_or_default()
    );
    let failed = SandboxClaimStatus {
        phase: ClaimPhase::Failed,
        stop: Some(record),
        ..status.clone()
    };
    set_status(ctx, claim, &failed).await?;
    tracing::warn!(claim = %claim.name_any(), pod = %pod.name_any(), %note, "claimed pod died");
    event_warning(ctx, claim, "SandboxFailed", note).await;
    let ns = claim.namespace().unwrap_or_default();
    release_pod(ctx, &ns, &pod.name_any(), &id, "PodFailed").await?;
    Ok(Action::await_change())
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
    let why = format!(
        "spec.timeout {} reached",
        claim.spec.timeout.as_deref().unwrap_or_default()
    );
    let released = SandboxClaimStatus {
        phase: ClaimPhase::Released,
        stop: Some(crate::patches::stop_record(
            "Timeout",
            Some(why),
            jiff::Timestamp::now(),
        )),
        ..status.clone()
    };
    set_status(ctx, claim, &released).await?;
    tracing::info!(claim = %claim.name_any(), sandbox_id = %id, "claim timeout: sandbox released");
    let note = format!("sandbox {id} released: its timeout passed");
    event(ctx, claim, "Timeout", note).await;
    Ok(Action::await_change())
}

/// Flips a claimed pod to `stopping` with a stop reason, only if it still runs `id` (a pod
/// re-claimed or already released since is left alone).
pub async fn release_pod(
    ctx: &Ctx,
    ns: &str,
    pod: &str,
    id: &str,
    reason: &str,
) -> Result<(), Error> {
    let ops = crate::patches::release(&ctx.contract, id, reason, SystemTime::now());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .patch(
            pod,
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch(ops)?),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(pod, sandbox_id = %id, reason, "sandbox released");
            // Unroutable everywhere before the claim moves on (a deleted claim's finalizer
            // goes next: whoever waits for that sees a sandbox nothing reaches).
            ctx.evictor.evict_everywhere(id).await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {
            ctx.evictor.evict_everywhere(id).await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if matches!(e.code, 409 | 422) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A Released or Failed claim: deleted at `delete_at` (its TTL after its sandbox stopped); kept
/// forever without one.
pub async fn finished(
    ctx: &Ctx,
    claim: &SandboxClaim,
    delete_at: Option<jiff::Timestamp>,
) -> Result<Action, Error> {
    let Some(due) = delete_at else {
        return Ok(Action::await_change());
    };
    let now = jiff::Timestamp::now();
    if now < due {
        let left = Duration::try_from(due.duration_since(now)).unwrap_or_default();
        return Ok(Action::requeue(left + Duration::from_millis(50)));
    }
    let api: Api<SandboxClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    match api
        .delete(&claim.name_any(), &DeleteParams::default())
        .await
    {
        Ok(_) => tracing::info!(claim = %claim.name_any(), "finished claim deleted after its TTL"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}
