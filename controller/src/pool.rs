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

/// An idle pod NotReady for longer than this is replaced (it would count as warm forever);
/// `--not-ready-grace` by default.
pub const NOT_READY_GRACE: Duration = Duration::from_secs(60);

/// The pod annotation holding the hash of the pool template it was made from.
pub const TEMPLATE_HASH_ANNOTATION: &str = "sandgate.dev/template-hash";

/// A short, stable hash of a pool's pod template (FNV-1a over its JSON).
pub fn template_hash(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> String {
    let json = serde_json::to_vec(template).unwrap_or_default();
    let h = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The pod annotation naming the claim that bound it.
pub const CLAIM_ANNOTATION: &str = "sandgate.dev/claim";

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
    /// Bound by a SandboxClaim (which records a dead claimed pod's end before it goes).
    pub has_claim: bool,
    /// Made from an older version of the pool's template (its template hash differs).
    pub outdated: bool,
    /// How long its Ready condition has been False (None while Ready, or never reported).
    pub not_ready_for: Option<Duration>,
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
            has_claim: pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(CLAIM_ANNOTATION)),
            outdated: false,
            not_ready_for: status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|x| x.type_ == "Ready" && x.status != "True"))
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| {
                    SystemTime::now()
                        .duration_since(SystemTime::from(t.0))
                        .unwrap_or_default()
                }),
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
    /// When the next idle pod that stays reaches `maxPodAge`, or its NotReady grace ends (so the
    /// pool is looked at again then).
    pub rotate_in: Option<Duration>,
}

/// What a pool asks for, and the controller's own rules for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolRules {
    pub replicas: i32,
    /// Idle pods older than this are replaced (`spec.maxPodAge`).
    pub max_age: Option<Duration>,
    /// Idle pods NotReady longer than this are replaced (`--not-ready-grace`).
    pub not_ready_grace: Duration,
}

impl PoolRules {
    pub fn new(replicas: i32, max_age: Option<Duration>) -> Self {
        PoolRules {
            replicas,
            max_age,
            not_ready_grace: NOT_READY_GRACE,
        }
    }
}

/// Plans a pool. `expected` is how many created pods have not yet appeared.
pub fn plan_pool(
    rules: &PoolRules,
    pods: &[PodView],
    expected: usize,
    now: SystemTime,
) -> PoolPlan {
    let (replicas, max_age) = (rules.replicas, rules.max_age);
    let age = |p: &PodView| now.duration_since(p.created).unwrap_or_default();
    let mut plan = PoolPlan::default();
    let mut counts: BTreeMap<String, i32> = BTreeMap::new();
    let mut warm_starting = Vec::new();
    let mut warm_idle = Vec::new();
    for p in pods.iter().filter(|p| !p.deleting) {
        // A claimed pod that died is its claim's to record and release first.
        if p.failed && p.phase == Some(Phase::Running) && p.has_claim {
            plan.status.claimed += 1;
            *counts.entry(Phase::Running.to_string()).or_default() += 1;
            continue;
        }
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
                let stuck = !p.ready && p.not_ready_for.is_some_and(|d| d > rules.not_ready_grace);
                if stuck || max_age.is_some_and(|m| age(p) > m) {
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
    // Idle pods of an older template are replaced a few at a time (a quarter of the pool, at
    // least one, per pass), oldest first, so the pool never empties for a template change.
    let mut outdated: Vec<&PodView> = warm_idle.iter().copied().filter(|p| p.outdated).collect();
    outdated.sort_by_key(|p| p.created);
    let roll = outdated.len().min((want / 4).max(1));
    for p in &outdated[..roll] {
        plan.delete.push(p.name.clone());
    }
    warm_idle.retain(|p| !plan.delete.contains(&p.name));
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
    let kept = || warm_idle.iter().filter(|p| !plan.delete.contains(&p.name));
    let aging = max_age.and_then(|m| kept().map(|p| m.saturating_sub(age(p))).min());
    let unready = kept()
        .filter(|p| !p.ready)
        .filter_map(|p| p.not_ready_for)
        .map(|d| rules.not_ready_grace.saturating_sub(d))
        .min();
    plan.rotate_in = [aging, unready].into_iter().flatten().min();
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

    /// A create that was refused: no pod is coming.
    pub fn forget(&self, pool: &str, pod: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get_mut(pool) {
            e.remove(pod);
        }
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

/// Why pods of a pool do not start, from their status: an image that cannot be pulled, a
/// container that crashes at start, a pod the scheduler cannot place. `(reason, message)`.
pub fn pod_problem(pod: &Pod) -> Option<(String, String)> {
    const WAITING: [&str; 6] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "InvalidImageName",
    ];
    let name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.as_ref()?;
    for c in status.container_statuses.iter().flatten() {
        let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = w.reason.clone().unwrap_or_default();
        if WAITING.contains(&reason.as_str()) {
            let detail = w.message.clone().unwrap_or_default();
            return Some((reason.clone(), format!("pod {name}: {reason}: {detail}")));
        }
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            let reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
            let detail = c.message.clone().unwrap_or_default();
            (reason.clone(), format!("pod {name}: {reason}: {detail}"))
        })
}

/// A not-Ready condition says the most specific thing known: `problem` (a pod's, or a failed
/// create's) replaces the generic reason.
pub fn diagnosed(mut ready: Condition, problem: Option<(String, String)>) -> Condition {
    if ready.status != "True" {
        if let Some((reason, message)) = problem {
            ready.reason = reason;
            ready.message = format!("{}; {message}", ready.message);
        }
    }
    ready
}

/// A pool's status after one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub status: SandboxPoolStatus,
    /// A new reason the pool is not Ready (a diagnosis, a backoff): worth a Warning event.
    pub warn: Option<Condition>,
    /// Write it now, rather than at the next status interval: the Ready reason is news.
    /// Flips between Full and Replenishing are a pool at work (every claim makes one) and wait.
    pub urgent: bool,
}

/// The status a pass writes: the plan's counts, the `Ready` condition (with `problem`, the first
/// reason a pod does not start or a create was refused, explaining a shortfall), and whether it
/// is news.
pub fn pool_status(
    mut status: SandboxPoolStatus,
    pool: &crate::crd::SandboxPool,
    backing_off: bool,
    problem: Option<(String, String)>,
    now: jiff::Timestamp,
) -> StatusUpdate {
    let generation = pool.metadata.generation;
    status.observed_generation = generation.unwrap_or(0);
    let previous = pool
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let ready = diagnosed(
        ready_condition(
            &status,
            pool.spec.replicas,
            backing_off,
            previous,
            generation,
            now,
        ),
        problem,
    );
    let routine = |r: &str| matches!(r, "Full" | "Replenishing");
    let new_reason = previous.is_none_or(|p| p.reason != ready.reason);
    let warn =
        (ready.status != "True" && new_reason && !routine(&ready.reason)).then(|| ready.clone());
    let urgent = previous.is_none_or(|p| {
        p.reason != ready.reason && !(routine(&p.reason) && routine(&ready.reason))
    });
    status.conditions = vec![ready];
    StatusUpdate {
        status,
        warn,
        urgent,
    }
}

/// A new warm pod `<pool>-<suffix>` from the pool's template, with the contract's labels, the
/// template hash and the pool's port.
pub fn new_pod(pool: &crate::crd::SandboxPool, c: &Contract, suffix: &str) -> Pod {
    use kube::ResourceExt;
    let name = pool.name_any();
    let t = pool.spec.template.clone();
    let mut meta = t.metadata.unwrap_or_default();
    meta.name = Some(format!("{name}-{suffix}"));
    meta.namespace = pool.namespace();
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(c.label_pool.clone(), name);
    labels.insert(c.label_phase.clone(), Phase::Starting.as_str().into());
    labels.remove(&c.label_sandbox_id);
    let ann = meta.annotations.get_or_insert_with(Default::default);
    ann.insert(
        TEMPLATE_HASH_ANNOTATION.into(),
        template_hash(&pool.spec.template),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn why_pods_do_not_start_is_named() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": "p1"}, "status": status}),
            )
            .unwrap()
        };
        let pull = pod(
            serde_json::json!({"containerStatuses": [{"name": "c", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}),
        );
        assert_eq!(
            pod_problem(&pull),
            Some((
                "ImagePullBackOff".into(),
                "pod p1: ImagePullBackOff: no such image".into()
            ))
        );
        let unschedulable = pod(
            serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes"}]}),
        );
        assert_eq!(pod_problem(&unschedulable).unwrap().0, "Unschedulable");
        let starting = pod(
            serde_json::json!({"containerStatuses": [{"name": "c", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(
            pod_problem(&starting),
            None,
            "an ordinary start is no problem"
        );
        let cond = |status: &str| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: "Replenishing".into(),
            message: "0 of 1 warm pods available".into(),
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        };
        let d = diagnosed(cond("False"), pod_problem(&pull));
        assert_eq!(d.reason, "ImagePullBackOff");
        assert!(d.message.ends_with("no such image"), "{}", d.message);
        assert_eq!(
            diagnosed(cond("True"), pod_problem(&pull)).reason,
            "Replenishing"
        );
    }

    fn pod(name: &str, phase: Phase, ready: bool) -> PodView {
        PodView {
            name: name.into(),
            phase: Some(phase),
            ready,
            failed: false,
            created: SystemTime::UNIX_EPOCH,
            deleting: false,
            has_claim: false,
            outdated: false,
            not_ready_for: None,
        }
    }

    #[test]
    fn an_older_template_rolls_a_quarter_at_a_time_and_claimed_pods_stay() {
        let now = SystemTime::now();
        let mut pods: Vec<PodView> = (0..8)
            .map(|i| PodView {
                outdated: true,
                created: SystemTime::UNIX_EPOCH + Duration::from_secs(i),
                ..pod(&format!("p{i}"), Phase::Idle, true)
            })
            .collect();
        pods.push(PodView {
            outdated: true,
            ..pod("claimed", Phase::Running, true)
        });
        let plan = plan_pool(&PoolRules::new(8, None), &pods, 0, now);
        assert_eq!(plan.delete, ["p0", "p1"], "the two oldest of eight");
        assert_eq!(plan.create, 2);
        assert_eq!(plan.status.claimed, 1);
        let fresh: Vec<PodView> = (0..8)
            .map(|i| pod(&format!("q{i}"), Phase::Idle, true))
            .collect();
        assert!(plan_pool(&PoolRules::new(8, None), &fresh, 0, now)
            .delete
            .is_empty());
        // A pool of one still rolls.
        assert_eq!(
            plan_pool(&PoolRules::new(1, None), &pods[..1], 0, now).delete,
            ["p0"]
        );
    }

    #[test]
    fn an_idle_pod_not_ready_past_the_grace_is_replaced() {
        let now = SystemTime::now();
        let flaky = |name: &str, for_secs: u64| PodView {
            not_ready_for: Some(Duration::from_secs(for_secs)),
            ..pod(name, Phase::Idle, false)
        };
        let plan = plan_pool(
            &PoolRules::new(2, None),
            &[flaky("a", 5), flaky("b", 120)],
            0,
            now,
        );
        assert_eq!(plan.delete, ["b"]);
        assert_eq!(plan.create, 1);
        assert_eq!(plan.status.available, 0);
    }

    #[test]
    fn a_dead_claimed_pod_waits_for_its_claim() {
        let now = SystemTime::now();
        let dead = PodView {
            failed: true,
            has_claim: true,
            ..pod("c", Phase::Running, false)
        };
        let plan = plan_pool(
            &PoolRules::new(0, None),
            std::slice::from_ref(&dead),
            0,
            now,
        );
        assert!(
            plan.delete.is_empty(),
            "deleted before its claim recorded it"
        );
        assert_eq!(plan.status.claimed, 1);
        let unclaimed = PodView {
            has_claim: false,
            ..dead
        };
        assert_eq!(
            plan_pool(&PoolRules::new(0, None), &[unclaimed], 0, now).delete,
            ["c"]
        );
    }

    #[test]
    fn fills_the_pool_and_counts_expectations() {
        let now = SystemTime::now();
        assert_eq!(plan_pool(&PoolRules::new(3, None), &[], 0, now).create, 3);
        assert_eq!(plan_pool(&PoolRules::new(3, None), &[], 2, now).create, 1);
        let pods = [
            pod("a", Phase::Idle, true),
            pod("b", Phase::Starting, false),
        ];
        assert_eq!(plan_pool(&PoolRules::new(3, None), &pods, 0, now).create, 1);
    }

    #[test]
    fn claimed_pods_do_not_count_and_are_never_touched() {
        let now = SystemTime::now();
        let pods = [
            pod("c1", Phase::Running, true),
            pod("c2", Phase::Running, true),
            pod("a", Phase::Idle, true),
        ];
        let plan = plan_pool(&PoolRules::new(1, None), &pods, 0, now);
        assert_eq!(plan.create, 0);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.status.claimed, 2);
        // Scale to zero: only the idle pod goes.
        let plan = plan_pool(&PoolRules::new(0, None), &pods, 0, now);
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
        let plan = plan_pool(&PoolRules::new(2, None), &pods, 0, now);
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
        let plan = plan_pool(
            &PoolRules::new(1, Some(Duration::from_secs(3600))),
            &pods,
            0,
            now,
        );
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
        let plan = plan_pool(
            &PoolRules::new(2, Some(Duration::from_secs(120))),
            &[young, older],
            0,
            now,
        );
        assert!(plan.delete.is_empty());
        assert_eq!(plan.rotate_in, Some(Duration::from_secs(20)));
        assert_eq!(
            plan_pool(&PoolRules::new(2, None), &[], 0, now).rotate_in,
            None
        );
    }

    #[test]
    fn expectations_clear_when_pods_appear() {
        let e = Expectations::default();
        e.expect("p", "p-1");
        e.expect("p", "p-2");
        assert_eq!(e.pending("p", &HashSet::new()), 2);
        assert_eq!(e.pending("p", &["p-1"].into_iter().collect()), 1);
        assert_eq!(e.pending("other", &HashSet::new()), 0);
        e.forget("p", "p-2");
        assert_eq!(
            e.pending("p", &HashSet::new()),
            0,
            "a refused create is not waited for"
        );
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

    #[test]
    fn status_updates_say_what_is_news() {
        let now = jiff::Timestamp::from_second(5_000).unwrap();
        let pool = |previous: Option<(&str, &str)>| -> crate::crd::SandboxPool {
            let conditions: Vec<serde_json::Value> = previous
                .into_iter()
                .map(|(status, reason)| serde_json::json!({"type": "Ready", "status": status, "reason": reason, "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z"}))
                .collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
                "metadata": {"name": "p", "generation": 4},
                "spec": {"replicas": 2, "template": {"spec": {"containers": []}}},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let counts = |available: i32| SandboxPoolStatus {
            available,
            ..Default::default()
        };
        let quota = || Some(("PodCreateFailed".to_string(), "exceeded quota".to_string()));
        // (previous Ready, available, problem) → (reason, warn, urgent)
        type Row<'a> = (
            &'a str,
            Option<(&'a str, &'a str)>,
            i32,
            Option<(String, String)>,
            &'a str,
            bool,
            bool,
        );
        let rows: Vec<Row<'_>> = vec![
            ("the first status", None, 2, None, "Full", false, true),
            (
                "a claim takes a pod",
                Some(("True", "Full")),
                1,
                None,
                "Replenishing",
                false,
                false,
            ),
            (
                "the pool refills",
                Some(("False", "Replenishing")),
                2,
                None,
                "Full",
                false,
                false,
            ),
            (
                "a refused create",
                Some(("False", "Replenishing")),
                1,
                quota(),
                "PodCreateFailed",
                true,
                true,
            ),
            (
                "still refused",
                Some(("False", "PodCreateFailed")),
                1,
                quota(),
                "PodCreateFailed",
                false,
                false,
            ),
            (
                "recovered",
                Some(("False", "PodCreateFailed")),
                2,
                None,
                "Full",
                false,
                true,
            ),
            (
                "a problem while full says nothing",
                Some(("True", "Full")),
                2,
                quota(),
                "Full",
                false,
                false,
            ),
        ];
        for (what, previous, available, problem, reason, warn, urgent) in rows {
            let u = pool_status(counts(available), &pool(previous), false, problem, now);
            let ready = &u.status.conditions[0];
            assert_eq!(
                (ready.reason.as_str(), u.warn.is_some(), u.urgent),
                (reason, warn, urgent),
                "{what}"
            );
            assert_eq!(u.status.observed_generation, 4, "{what}");
        }
    }
}
