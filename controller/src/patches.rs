//! Everything the controller writes, built without a client: the guarded JSON patches that move a
//! pod through the contract's phases, the merge patches for annotations and statuses, and the
//! stop records claims keep. Pure, so each is tested by value.
//!
//! A JSON patch that changes a pod's phase starts with `test` operations on what the caller saw
//! (the phase, the sandbox ID, the claim time): if the pod changed since, the API server answers
//! 422 and nothing is written.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use sandgate_shared::{Contract, Phase};
use serde_json::{json, Value};

use crate::crd::{ClaimPhase, SandboxClaim, SandboxClaimStatus, SandboxPoolStatus, StopRecord};
use crate::idle::{format_time, json_pointer};
use crate::pool::CLAIM_ANNOTATION;

/// Pod annotation holding the UID of the claim that bound it: a claim finds its pod by it.
pub const CLAIM_UID_ANNOTATION: &str = "sandgate.dev/claim-uid";

fn label(k: &str) -> String {
    format!("/metadata/labels/{}", json_pointer(k))
}

fn ann(k: &str) -> String {
    format!("/metadata/annotations/{}", json_pointer(k))
}

/// A warm pod turned Ready: `starting` → `idle`, only if it is still `starting`.
pub fn mark_idle(c: &Contract) -> Value {
    json!([
        {"op": "test", "path": label(&c.label_phase), "value": Phase::Starting.as_str()},
        {"op": "replace", "path": label(&c.label_phase), "value": Phase::Idle.as_str()},
    ])
}

/// Claims an idle pod for `claim` as sandbox `id`: only if it is still `idle`. Carries the claim's
/// name and UID, the claim time, the idle timeout, and the claim's own labels and annotations
/// (never one in the contract's prefix).
pub fn bind(
    c: &Contract,
    claim: &SandboxClaim,
    pod: &Pod,
    id: &str,
    idle_timeout: Option<&str>,
    now: SystemTime,
) -> Value {
    let mut ops = vec![
        json!({"op": "test", "path": label(&c.label_phase), "value": Phase::Idle.as_str()}),
        json!({"op": "replace", "path": label(&c.label_phase), "value": Phase::Running.as_str()}),
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
    ops.push(json!({"op": "add", "path": ann(&c.ann_claimed_at), "value": format_time(now)}));
    ops.push(json!({"op": "add", "path": ann(CLAIM_ANNOTATION), "value": claim_ref}));
    ops.push(json!({"op": "add", "path": ann(CLAIM_UID_ANNOTATION), "value": claim.uid().unwrap_or_default()}));
    if let Some(t) = idle_timeout {
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
    Value::Array(ops)
}

/// Releases sandbox `id` for `reason` (a claim's: `Timeout`, `ClaimDeleted`, `PodFailed`):
/// `running` → `stopping`, only if the pod still runs `id`.
pub fn release(c: &Contract, id: &str, reason: &str, now: SystemTime) -> Value {
    json!([
        {"op": "test", "path": label(&c.label_phase), "value": Phase::Running.as_str()},
        {"op": "test", "path": label(&c.label_sandbox_id), "value": id},
        {"op": "replace", "path": label(&c.label_phase), "value": Phase::Stopping.as_str()},
        {"op": "add", "path": ann(&c.ann_stop_reason), "value": reason},
        {"op": "add", "path": ann(&c.ann_stopped_at), "value": format_time(now)},
    ])
}

/// What the idle release needs to know of the pod it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdlePod<'a> {
    pub sandbox_id: &'a str,
    /// Its `claimed-at`: a pod released and claimed again since is not released.
    pub claimed_at: Option<&'a str>,
    pub has_annotations: bool,
    pub last_active: SystemTime,
}

/// Releases an idle sandbox: `running` → `stopping` with stop reason `IdleTimeout` and the
/// `last-active` that decided it, only if the pod still runs the same claim of the same sandbox.
pub fn idle_release(c: &Contract, p: &IdlePod<'_>, now: SystemTime) -> Value {
    let mut ops = vec![
        json!({"op": "test", "path": label(&c.label_phase), "value": Phase::Running.as_str()}),
        json!({"op": "test", "path": label(&c.label_sandbox_id), "value": p.sandbox_id}),
    ];
    if let Some(claimed) = p.claimed_at {
        ops.push(json!({"op": "test", "path": ann(&c.ann_claimed_at), "value": claimed}));
    }
    if !p.has_annotations {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    ops.extend([
        json!({"op": "replace", "path": label(&c.label_phase), "value": Phase::Stopping.as_str()}),
        json!({"op": "add", "path": ann(&c.ann_stop_reason), "value": "IdleTimeout"}),
        json!({"op": "add", "path": ann(&c.ann_stopped_at), "value": format_time(now)}),
        json!({"op": "add", "path": ann(&c.ann_last_active), "value": format_time(p.last_active)}),
    ]);
    Value::Array(ops)
}

/// Sets one pod annotation (`last-active`, `idle-timeout`): a merge patch.
pub fn annotation(key: &str, value: &str) -> Value {
    json!({"metadata": {"annotations": {key: value}}})
}

/// A pool's status as a merge patch. A merge patch keeps keys it does not name, so phases that
/// had pods before and have none now are named with `null`.
pub fn pool_status(previous: Option<&SandboxPoolStatus>, status: &SandboxPoolStatus) -> Value {
    let mut patch = json!({ "status": status });
    for gone in previous
        .iter()
        .flat_map(|s| s.replicas.keys())
        .filter(|k| !status.replicas.contains_key(*k))
    {
        patch["status"]["replicas"][gone] = Value::Null;
    }
    patch
}

/// A claim's status as a merge patch.
pub fn claim_status(status: &SandboxClaimStatus) -> Value {
    json!({ "status": status })
}

/// A condition stamped `now` for an object at `generation`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(now),
        observed_generation: generation,
    }
}

/// A claim waiting (`Pending`) with `Bound=False` naming why.
pub fn pending(
    claim: &SandboxClaim,
    reason: &str,
    message: String,
    now: jiff::Timestamp,
) -> SandboxClaimStatus {
    let generation = claim.metadata.generation;
    SandboxClaimStatus {
        phase: ClaimPhase::Pending,
        conditions: vec![condition("Bound", false, reason, message, generation, now)],
        ..Default::default()
    }
}

/// A claim that can never bind as written: `Failed` with `Bound=False` of reason `InvalidSpec`.
pub fn refused(claim: &SandboxClaim, why: String, now: jiff::Timestamp) -> SandboxClaimStatus {
    let generation = claim.metadata.generation;
    SandboxClaimStatus {
        phase: ClaimPhase::Failed,
        conditions: vec![condition(
            "Bound",
            false,
            crate::validate::INVALID_SPEC,
            why,
            generation,
            now,
        )],
        ..Default::default()
    }
}

/// A claim bound to `pod` as sandbox `id`; its URL under `domain`, its expiry from `spec.timeout`.
pub fn bound(
    claim: &SandboxClaim,
    pod: &str,
    pod_ip: Option<&str>,
    id: &str,
    domain: Option<&str>,
    now: jiff::Timestamp,
) -> SandboxClaimStatus {
    SandboxClaimStatus {
        bound_at: Some(Time(now)),
        expires_at: claim.expires_at().map(Time),
        stop: None,
        phase: ClaimPhase::Bound,
        url: domain.map(|d| format!("{id}.{d}")),
        sandbox_id: Some(id.to_string()),
        pod_name: Some(pod.to_string()),
        pod_ip: pod_ip.map(str::to_string),
        conditions: vec![condition(
            "Bound",
            true,
            "Bound",
            format!("bound pod {pod}"),
            claim.metadata.generation,
            now,
        )],
    }
}

/// A stop record for `reason`, stamped `now`.
pub fn stop_record(reason: &str, message: Option<String>, now: jiff::Timestamp) -> StopRecord {
    StopRecord {
        reason: reason.into(),
        stopped_at: Time(now),
        message,
        exit_code: None,
        images: Vec::new(),
        last_active: None,
    }
}

/// How a dead pod ended, from its status: the first terminated container (its reason, exit code
/// and finish time) or the pod's own reason (Evicted), and the images it ran.
pub fn death_record(pod: &Pod, now: jiff::Timestamp) -> StopRecord {
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
        .unwrap_or(Time(now));
    let mut images: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.image.clone())
        .collect();
    images.dedup();
    StopRecord {
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

/// How a released pod was released, from its `stop-reason`, `stopped-at` and `last-active`
/// annotations; `PodGone` when there is no pod to read.
pub fn release_record(c: &Contract, pod: Option<&Pod>, now: jiff::Timestamp) -> StopRecord {
    let mut record = stop_record("PodGone", None, now);
    let Some(pod) = pod else {
        return record;
    };
    let ann = pod.annotations();
    if let Some(r) = ann.get(&c.ann_stop_reason) {
        record.reason = r.clone();
    }
    if let Some(at) = ann
        .get(&c.ann_stopped_at)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    {
        record.stopped_at = Time(at);
    }
    record.last_active = ann.get(&c.ann_last_active).cloned();
    record
}

#[cfg(test)]
mod tests;
