//! Claims waiting for a pod of their pool. No waiter polls: a pool pod's change wakes as many of
//! its pool's oldest waiters as the pool has pods to take (waking every waiter on every change
//! would be quadratic in a burst), and waiters are served in creation order.

use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use k8s_openapi::api::core::v1::Pod;

use super::{pool_pods, Ctx};
use crate::claim::takeable;
use crate::crd::SandboxClaim;

/// A claim waiting for a pod of its pool.
#[derive(Debug, Clone)]
pub struct Waiter {
    /// `<namespace>/<pool>`.
    pub pool: String,
    /// Served in this order: creation time, then name.
    pub order: (i64, String),
    pub claim: ObjectRef<SandboxClaim>,
}

fn order(claim: &SandboxClaim) -> (i64, String) {
    let created = claim.meta().creation_timestamp.as_ref();
    (created.map_or(0, |t| t.0.as_second()), claim.name_any())
}

fn pool_key(claim: &SandboxClaim) -> String {
    let ns = claim.namespace().unwrap_or_default();
    format!("{ns}/{}", claim.spec.pool_name)
}

/// How many claims of `claim`'s pool have waited longer than it.
pub fn ahead_of(ctx: &Ctx, claim: &SandboxClaim) -> usize {
    let (pool, order) = (pool_key(claim), order(claim));
    let waiting = ctx.waiting.lock().unwrap_or_else(|e| e.into_inner());
    waiting
        .values()
        .filter(|w| w.pool == pool && w.order < order)
        .count()
}

/// Records `claim` as waiting for its pool.
pub fn wait(ctx: &Ctx, claim: &SandboxClaim) {
    let waiter = Waiter {
        pool: pool_key(claim),
        order: order(claim),
        claim: ObjectRef::from_obj(claim),
    };
    let mut waiting = ctx.waiting.lock().unwrap_or_else(|e| e.into_inner());
    waiting.insert(claim.uid().unwrap_or_default(), waiter);
    ctx.metrics.claims_waiting.set(waiting.len() as i64);
}

/// `uid` waits no longer (bound, refused, deleted).
pub fn forget(ctx: &Ctx, uid: &str) {
    let mut waiting = ctx.waiting.lock().unwrap_or_else(|e| e.into_inner());
    waiting.remove(uid);
    ctx.metrics.claims_waiting.set(waiting.len() as i64);
}

/// The waiting claims a pool pod's change wakes: as many of its pool's oldest waiters as the
/// pool has idle, Ready pods.
pub fn to_wake(ctx: &Ctx, pod: &Pod) -> Vec<ObjectRef<SandboxClaim>> {
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
        .filter(|p| takeable(p, &ctx.contract))
        .count();
    waiters.sort_by(|a, b| a.order.cmp(&b.order));
    waiters.into_iter().take(idle).map(|w| w.claim).collect()
}
