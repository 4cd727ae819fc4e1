//! What one claim reconcile does, decided from the claim, its pool and the pool's cached pods
//! alone (the executor is `lifecycle::claims`). Pure: no client, the clock passed in.
//!
//! A Pending claim: refused if its spec can never work; adopts the pod carrying its UID if it
//! already bound one (its status was lost); else binds one of its pool's idle, Ready pods, the
//! pool's waiters served in creation order. A Bound claim: released when its pod died, expired
//! or no longer runs it. A Released or Failed claim: deleted after its TTL.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sandgate_shared::{Contract, Phase};

use crate::crd::{ClaimPhase, SandboxClaim, SandboxPool};
use crate::idle::parse_idle_timeout;
use crate::patches::CLAIM_UID_ANNOTATION;
use crate::pool::PodView;

/// What the planner knows of a claim beyond the object.
pub struct Facts<'a> {
    pub claim: &'a SandboxClaim,
    /// Its pool, from the cache.
    pub pool: Option<&'a SandboxPool>,
    /// The pool's pods, from the cache.
    pub pods: &'a [Arc<Pod>],
    /// Claims of the same pool that have waited longer.
    pub ahead: usize,
    /// This process bound the claim this long ago, and its pod cache had not shown the bind
    /// when last looked.
    pub bound_here: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClaimStep {
    /// Released or Failed: deleted at `delete_at`, kept forever without a TTL.
    Finished {
        delete_at: Option<jiff::Timestamp>,
    },
    /// Bound, and the cache shows its pod running its sandbox.
    Bound(BoundStep),
    /// Bound, but the cache does not show its pod running its sandbox: ask the API before
    /// calling it released (the cache may lag behind a bind).
    Confirm,
    /// The status write of this process's bind is not in the cache yet.
    AwaitStatus,
    /// Bound by this process, and the pod cache has not caught up with the bind: the pod's
    /// change wakes the claim (no API read).
    AwaitPod,
    /// The spec can never bind: `Failed`, reason `InvalidSpec`.
    Refuse(String),
    /// A lost status: the pod carrying the claim's UID is its own.
    Adopt {
        pod: String,
        sandbox_id: String,
    },
    PoolMissing,
    /// The pool's spec cannot give this claim an idle timeout.
    PoolInvalid(String),
    /// Try these idle, Ready pods in turn, with this idle timeout on the pod.
    Bind {
        candidates: Vec<String>,
        idle_timeout: Option<String>,
    },
    /// Nothing to take yet: wait for the pool to refill.
    Wait,
}

/// A Bound claim whose pod runs its sandbox.
#[derive(Debug, Clone, PartialEq)]
pub enum BoundStep {
    /// The pod's containers ended (`Failed` or `Succeeded`): the claim fails with a stop record.
    Died,
    /// `spec.timeout` passed: release with stop reason `Timeout`.
    Expire,
    /// Still running: bring `status.expiresAt` and the pod's idle timeout up to date, and look
    /// again after `again`.
    Keep {
        expires_at: Option<jiff::Timestamp>,
        idle_timeout: Option<String>,
        again: Duration,
    },
}

/// How long a claim bound here waits for its own status write to show before it writes it again.
pub const STATUS_GRACE: Duration = Duration::from_secs(5);

/// How often a bound claim is looked at when nothing wakes it.
pub const BOUND_RECHECK: Duration = Duration::from_secs(60);

pub fn plan_claim(f: &Facts<'_>, c: &Contract, now: jiff::Timestamp) -> ClaimStep {
    let claim = f.claim;
    let status = claim.status.clone().unwrap_or_default();
    match status.phase {
        ClaimPhase::Released | ClaimPhase::Failed => {
            let ttl = claim
                .spec
                .ttl_seconds_after_finished
                .or_else(|| f.pool.and_then(|p| p.spec.claim_ttl_seconds_after_finished));
            let stopped = status.stop.as_ref().map_or(now, |s| s.stopped_at.0);
            ClaimStep::Finished {
                delete_at: ttl.map(|t| stopped + jiff::SignedDuration::from_secs(t.max(0))),
            }
        }
        ClaimPhase::Bound => {
            let runs_it = |p: &&Arc<Pod>| {
                Some(p.name_any()) == status.pod_name
                    && runs(p, c, status.sandbox_id.as_deref().unwrap_or_default())
            };
            match f.pods.iter().find(runs_it) {
                Some(pod) => ClaimStep::Bound(plan_bound(claim, pod, c, now)),
                None if f.bound_here.is_some() => ClaimStep::AwaitPod,
                None => ClaimStep::Confirm,
            }
        }
        ClaimPhase::Pending => plan_pending(f, c),
    }
}

/// Whether `pod` is running sandbox `id`.
pub fn runs(pod: &Pod, c: &Contract, id: &str) -> bool {
    let labels = pod.labels();
    labels.get(&c.label_phase).map(String::as_str) == Some(Phase::Running.as_str())
        && labels.get(&c.label_sandbox_id).map(String::as_str) == Some(id)
}

/// A Bound claim whose `pod` runs its sandbox.
pub fn plan_bound(
    claim: &SandboxClaim,
    pod: &Pod,
    c: &Contract,
    now: jiff::Timestamp,
) -> BoundStep {
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    ) {
        return BoundStep::Died;
    }
    let expires_at = claim.expires_at();
    if expires_at.is_some_and(|e| now >= e) {
        return BoundStep::Expire;
    }
    let idle_timeout = claim
        .spec
        .idle_timeout
        .clone()
        .filter(|want| pod.annotations().get(&c.ann_idle_timeout) != Some(want));
    let left = expires_at.map_or(BOUND_RECHECK, |e| {
        Duration::try_from(e.duration_since(now)).unwrap_or_default() + Duration::from_millis(20)
    });
    BoundStep::Keep {
        expires_at,
        idle_timeout,
        again: left.min(BOUND_RECHECK),
    }
}

fn plan_pending(f: &Facts<'_>, c: &Contract) -> ClaimStep {
    let claim = f.claim;
    let uid = claim.uid().unwrap_or_default();
    let own = f.pods.iter().find_map(|p| {
        let mine = p.annotations().get(CLAIM_UID_ANNOTATION) == Some(&uid);
        let running = PodView::of(p, c).phase == Some(Phase::Running);
        let id = p.labels().get(&c.label_sandbox_id)?;
        (mine && running).then(|| (p.name_any(), id.clone()))
    });
    match (f.bound_here, own) {
        // Bound here: its status write is on its way (the pod's or the claim's change wakes it).
        // Never a second pod while the cache does not show the first.
        (Some(_), None) => return ClaimStep::AwaitStatus,
        (Some(age), Some(_)) if age < STATUS_GRACE => return ClaimStep::AwaitStatus,
        // A lost status (a failed write, a crash, a status patched away): take the pod again.
        (_, Some((pod, sandbox_id))) => return ClaimStep::Adopt { pod, sandbox_id },
        (None, None) => {}
    }
    if let Err(why) = crate::validate::check_claim(&claim.spec, c) {
        return ClaimStep::Refuse(why);
    }
    let Some(pool) = f.pool else {
        return ClaimStep::PoolMissing;
    };
    let idle_timeout = claim
        .spec
        .idle_timeout
        .clone()
        .or(pool.spec.default_idle_timeout.clone());
    if let Some(t) = &idle_timeout {
        if parse_idle_timeout(t).is_err() {
            return ClaimStep::PoolInvalid(format!(
                "SandboxPool {} has an invalid spec.defaultIdleTimeout {t:?}",
                claim.spec.pool_name
            ));
        }
    }
    let candidates: Vec<String> = f
        .pods
        .iter()
        .filter(|p| takeable(p, c))
        .map(|p| p.name_any())
        .collect();
    // Waiters are served in creation order: the first n take the n idle pods.
    if f.ahead >= candidates.len() {
        return ClaimStep::Wait;
    }
    ClaimStep::Bind {
        candidates,
        idle_timeout,
    }
}

/// An idle, Ready pool pod that is neither being deleted nor failed.
pub fn takeable(pod: &Pod, c: &Contract) -> bool {
    let v = PodView::of(pod, c);
    v.phase == Some(Phase::Idle) && v.ready && !v.deleting && !v.failed
}

#[cfg(test)]
mod tests;
