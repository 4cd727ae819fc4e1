//! The pool reconciler: keeps `replicas` warm idle pods per SandboxPool.
//!
//! The plan is a pure function of the pool, its pods and the creations still expected to show up
//! in the pod cache ("expectations"), so informer lag never makes it create twice. Claimed
//! (running) pods are never counted, deleted or rotated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use sandgate_shared::{Contract, Phase};

use crate::crd::SandboxPoolStatus;

/// What the pool plan needs to know about one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub phase: Option<Phase>,
    pub ready: bool,
    /// The kubelet reports the pod Failed.
    pub failed: bool,
    pub created: SystemTime,
    pub deleting: bool,
}

impl PodView {
    pub fn of(pod: &Pod, c: &Contract) -> PodView {
        let labels = pod.metadata.labels.as_ref();
        let status = pod.status.as_ref();
        PodView {
            name: pod.metadata.name.clone().unwrap_or_default(),
            phase: labels
                .and_then(|l| l.get(&c.label_phase))
                .and_then(|p| p.parse().ok()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|x| x.type_ == "Ready" && x.status == "True")),
            failed: status.and_then(|s| s.phase.as_deref()) == Some("Failed"),
            created: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| SystemTime::from(t.0))
                .unwrap_or(SystemTime::now()),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// What to do for one pool.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PoolPlan {
    pub create: usize,
    pub delete: Vec<String>,
    pub mark_idle: Vec<String>,
    pub status: SandboxPoolStatus,
    /// When the next idle pod that stays reaches `maxPodAge` (so the pool is looked at again then).
    pub rotate_in: Option<Duration>,
}

/// Plans a pool. `expected` is how many created pods have not yet appeared.
pub fn plan_pool(
    replicas: i32,
    max_age: Option<Duration>,
    pods: &[PodView],
    expected: usize,
    now: SystemTime,
) -> PoolPlan {
    let age = |p: &PodView| now.duration_since(p.created).unwrap_or_default();
    let mut plan = PoolPlan::default();
    let mut counts: BTreeMap<String, i32> = BTreeMap::new();
    let mut warm_starting = Vec::new();
    let mut warm_idle = Vec::new();
    for p in pods.iter().filter(|p| !p.deleting) {
        let phase = if p.failed {
            Some(Phase::Failed)
        } else {
            p.phase
        };
        *counts
            .entry(
                phase
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            )
            .or_default() += 1;
        match phase {
            Some(Phase::Stopping | Phase::Failed) => plan.delete.push(p.name.clone()),
            Some(Phase::Starting) if p.ready => {
                plan.mark_idle.push(p.name.clone());
                warm_idle.push(p);
            }
            Some(Phase::Starting) => warm_starting.push(p),
            Some(Phase::Idle) => {
                if max_age.is_some_and(|m| age(p) > m) {
                    plan.delete.push(p.name.clone());
                } else {
                    warm_idle.push(p);
                }
            }
            Some(Phase::Running) => plan.status.claimed += 1,
            None => {}
        }
    }
    let want = usize::try_from(replicas).unwrap_or(0);
    let warm = warm_idle.len() + warm_starting.len() + expected;
    if warm < want {
        plan.create = want - warm;
    } else {
        // Scale down: starting pods first, then the oldest idle ones. Never a claimed pod.
        let mut excess = warm - want;
        warm_idle.sort_by_key(|p| p.created);
        for p in warm_starting.iter().chain(warm_idle.iter()) {
            if excess == 0 {
                break;
            }
            plan.delete.push(p.name.clone());
            plan.mark_idle.retain(|n| n != &p.name);
            excess -= 1;
        }
    }
    plan.status.available = warm_idle
        .iter()
        .filter(|p| p.ready && !plan.delete.contains(&p.name))
        .count() as i32;
    plan.rotate_in = max_age.and_then(|m| {
        warm_idle
            .iter()
            .filter(|p| !plan.delete.contains(&p.name))
            .map(|p| m.saturating_sub(age(p)))
            .min()
    });
    plan.status.replicas = counts;
    plan
}

/// Creations not yet seen in the pod cache, per pool. Entries expire, so a lost create is retried.
#[derive(Default)]
pub struct Expectations(Mutex<HashMap<String, HashMap<String, Instant>>>);

const EXPECTATION_TTL: Duration = Duration::from_secs(30);

impl Expectations {
    pub fn expect(&self, pool: &str, pod: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(pool.to_string())
            .or_default()
            .insert(pod.to_string(), Instant::now());
    }

    /// How many expected pods of `pool` are still missing from `seen`.
    pub fn pending(&self, pool: &str, seen: &HashSet<&str>) -> usize {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = m.get_mut(pool) else { return 0 };
        e.retain(|name, at| !seen.contains(name.as_str()) && at.elapsed() < EXPECTATION_TTL);
        e.len()
    }
}

pub type SharedExpectations = Arc<Expectations>;

/// The pool's `Ready` condition: True once `available` warm pods reach `replicas`. False says
/// why: replacing failed pods under backoff, or still replenishing. The transition time is kept
/// while the status does not change, as `kubectl wait --for=condition=Ready` expects.
pub fn ready_condition(
    status: &SandboxPoolStatus,
    replicas: i32,
    backoff: bool,
    previous: Option<&Condition>,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Condition {
    let (ok, reason) = if status.available >= replicas {
        (true, "Full")
    } else if backoff {
        (false, "FailedPodsBackoff")
    } else {
        (false, "Replenishing")
    };
    let state = if ok { "True" } else { "False" };
    let since = previous
        .filter(|c| c.status == state)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: "Ready".into(),
        status: state.into(),
        reason: reason.into(),
        message: format!("{} of {replicas} warm pods available", status.available),
        last_transition_time: since,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, phase: Phase, ready: bool) -> PodView {
        PodView {
            name: name.into(),
            phase: Some(phase),
            ready,
            failed: false,
            created: SystemTime::UNIX_EPOCH,
            deleting: false,
        }
    }

    #[test]
    fn fills_the_pool_and_counts_expectations() {
        let now = SystemTime::now();
        assert_eq!(plan_pool(3, None, &[], 0, now).create, 3);
        assert_eq!(plan_pool(3, None, &[], 2, now).create, 1);
        let pods = [
            pod("a", Phase::Idle, true),
            pod("b", Phase::Starting, false),
        ];
        assert_eq!(plan_pool(3, None, &pods, 0, now).create, 1);
    }

    #[test]
    fn claimed_pods_do_not_count_and_are_never_touched() {
        let now = SystemTime::now();
        let pods = [
            pod("c1", Phase::Running, true),
            pod("c2", Phase::Running, true),
            pod("a", Phase::Idle, true),
        ];
        let plan = plan_pool(1, None, &pods, 0, now);
        assert_eq!(plan.create, 0);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.status.claimed, 2);
        // Scale to zero: only the idle pod goes.
        let plan = plan_pool(0, None, &pods, 0, now);
        assert_eq!(plan.delete, ["a"]);
    }

    #[test]
    fn ready_starting_pods_become_idle_and_released_or_failed_pods_go() {
        let now = SystemTime::now();
        let mut failed = pod("f", Phase::Idle, false);
        failed.failed = true;
        let pods = [
            pod("s", Phase::Starting, true),
            pod("r", Phase::Stopping, true),
            failed,
        ];
        let plan = plan_pool(2, None, &pods, 0, now);
        assert_eq!(plan.mark_idle, ["s"]);
        assert_eq!(plan.delete, ["r", "f"]);
        assert_eq!(plan.create, 1);
        assert_eq!(plan.status.available, 1);
    }

    #[test]
    fn old_idle_pods_rotate_but_claimed_ones_stay() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let pods = [
            pod("old-idle", Phase::Idle, true),
            pod("old-claimed", Phase::Running, true),
        ];
        let plan = plan_pool(1, Some(Duration::from_secs(3600)), &pods, 0, now);
        assert_eq!(plan.delete, ["old-idle"]);
        assert_eq!(plan.create, 1);
        assert_eq!(plan.rotate_in, None);
    }

    #[test]
    fn the_next_rotation_is_when_the_oldest_idle_pod_expires() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut young = pod("young", Phase::Idle, true);
        young.created = SystemTime::UNIX_EPOCH + Duration::from_secs(90);
        let older = pod("older", Phase::Idle, true);
        let plan = plan_pool(2, Some(Duration::from_secs(120)), &[young, older], 0, now);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.rotate_in, Some(Duration::from_secs(20)));
        assert_eq!(plan_pool(2, None, &[], 0, now).rotate_in, None);
    }

    #[test]
    fn expectations_clear_when_pods_appear() {
        let e = Expectations::default();
        e.expect("p", "p-1");
        e.expect("p", "p-2");
        assert_eq!(e.pending("p", &HashSet::new()), 2);
        assert_eq!(e.pending("p", &["p-1"].into_iter().collect()), 1);
        assert_eq!(e.pending("other", &HashSet::new()), 0);
    }

    #[test]
    fn ready_turns_true_when_full_and_keeps_its_transition_time() {
        let t0 = jiff::Timestamp::from_second(1_000).unwrap();
        let t1 = jiff::Timestamp::from_second(2_000).unwrap();
        let mut st = SandboxPoolStatus {
            available: 1,
            ..Default::default()
        };
        let c = ready_condition(&st, 2, false, None, Some(3), t0);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Replenishing")
        );
        assert_eq!(c.message, "1 of 2 warm pods available");
        let c = ready_condition(&st, 2, true, Some(&c), Some(3), t1);
        assert_eq!(c.reason, "FailedPodsBackoff");
        assert_eq!(c.last_transition_time.0, t0, "still False: the time stays");
        st.available = 2;
        let c = ready_condition(&st, 2, false, Some(&c), Some(3), t1);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Full"));
        assert_eq!(c.last_transition_time.0, t1);
        assert_eq!(c.observed_generation, Some(3));
    }

    #[test]
    fn an_empty_pool_is_ready() {
        let c = ready_condition(
            &SandboxPoolStatus::default(),
            0,
            false,
            None,
            None,
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert_eq!(c.status, "True");
    }
}
