//! Table tests for the claim planner: one row per situation a claim can be in.

use super::*;
use serde_json::{json, Value};

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

const CREATED: &str = "2026-12-01T00:00:00Z";

/// A claim of pool `p` created at [`CREATED`], with `spec` and `status` merged in.
fn claim(spec: Value, status: Value) -> SandboxClaim {
    let mut s = json!({"poolName": "p"});
    s.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    let mut c = json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
        "metadata": {"name": "c", "namespace": "ns", "uid": "uid-c", "creationTimestamp": CREATED},
        "spec": s,
    });
    if !status.is_null() {
        c["status"] = status;
    }
    serde_json::from_value(c).unwrap()
}

fn pool(spec: Value) -> SandboxPool {
    let mut s =
        json!({"replicas": 2, "template": {"spec": {"containers": [{"name": "s", "image": "x"}]}}});
    s.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": "p", "namespace": "ns"}, "spec": s,
    }))
    .unwrap()
}

/// A pool pod: `phase` label, Ready or not, running `id`, with `ann` annotations and a
/// `status.phase`.
fn pod(
    name: &str,
    phase: &str,
    ready: bool,
    id: Option<&str>,
    ann: Value,
    pod_phase: &str,
) -> Arc<Pod> {
    let mut labels = json!({"sandgate.dev/pool": "p", "sandgate.dev/phase": phase});
    if let Some(id) = id {
        labels["sandgate.dev/sandbox-id"] = json!(id);
    }
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels, "annotations": ann},
            "status": {"phase": pod_phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap(),
    )
}

fn idle(name: &str) -> Arc<Pod> {
    pod(name, "idle", true, None, json!({}), "Running")
}

fn bound_status(pod: &str, id: &str) -> Value {
    json!({"phase": "Bound", "podName": pod, "sandboxID": id})
}

fn running(name: &str, id: &str, ann: Value) -> Arc<Pod> {
    pod(name, "running", true, Some(id), ann, "Running")
}

struct Row {
    what: &'static str,
    claim: SandboxClaim,
    pool: Option<SandboxPool>,
    pods: Vec<Arc<Pod>>,
    ahead: usize,
    bound_here: Option<Duration>,
    now: &'static str,
    want: ClaimStep,
}

fn row(what: &'static str, claim: SandboxClaim, pods: Vec<Arc<Pod>>, want: ClaimStep) -> Row {
    Row {
        what,
        claim,
        pool: Some(pool(json!({}))),
        pods,
        ahead: 0,
        bound_here: None,
        now: "2026-12-01T00:01:00Z",
        want,
    }
}

fn bind(candidates: &[&str], idle_timeout: Option<&str>) -> ClaimStep {
    ClaimStep::Bind {
        candidates: candidates.iter().map(|s| s.to_string()).collect(),
        idle_timeout: idle_timeout.map(String::from),
    }
}

#[test]
fn pending_claims() {
    let c = Contract::default();
    let mine = json!({"sandgate.dev/claim-uid": "uid-c"});
    let rows = vec![
        row(
            "binds an idle, Ready pod",
            claim(json!({}), Value::Null),
            vec![idle("a")],
            bind(&["a"], None),
        ),
        row(
            "only idle, Ready, live pods are candidates",
            claim(json!({}), Value::Null),
            vec![
                idle("a"),
                pod("notready", "idle", false, None, json!({}), "Running"),
                pod("starting", "starting", true, None, json!({}), "Running"),
                running("taken", "sbx-x", json!({})),
                pod("dead", "idle", true, None, json!({}), "Failed"),
            ],
            bind(&["a"], None),
        ),
        row(
            "the claim's idle timeout wins over the pool's",
            claim(json!({"idleTimeout": "90s"}), Value::Null),
            vec![idle("a")],
            bind(&["a"], Some("90s")),
        ),
        Row {
            pool: Some(pool(json!({"defaultIdleTimeout": "15m"}))),
            ..row(
                "else the pool's default",
                claim(json!({}), Value::Null),
                vec![idle("a")],
                bind(&["a"], Some("15m")),
            )
        },
        Row {
            ahead: 1,
            ..row(
                "one idle pod and an older waiter: wait",
                claim(json!({}), Value::Null),
                vec![idle("a")],
                ClaimStep::Wait,
            )
        },
        Row {
            ahead: 1,
            ..row(
                "two idle pods and an older waiter: bind",
                claim(json!({}), Value::Null),
                vec![idle("a"), idle("b")],
                bind(&["a", "b"], None),
            )
        },
        row(
            "no idle pod: wait",
            claim(json!({}), Value::Null),
            vec![],
            ClaimStep::Wait,
        ),
        Row {
            pool: None,
            ..row(
                "no pool",
                claim(json!({}), Value::Null),
                vec![],
                ClaimStep::PoolMissing,
            )
        },
        Row {
            pool: Some(pool(json!({"defaultIdleTimeout": "soon"}))),
            ..row(
                "a pool default that does not parse",
                claim(json!({}), Value::Null),
                vec![idle("a")],
                ClaimStep::PoolInvalid(
                    "SandboxPool p has an invalid spec.defaultIdleTimeout \"soon\"".into(),
                ),
            )
        },
        row(
            "an idle timeout that does not parse is refused",
            claim(json!({"idleTimeout": "soon"}), Value::Null),
            vec![idle("a")],
            ClaimStep::Refuse(
                "spec.idleTimeout: \"soon\" is not a duration (e.g. 90s, 15m, never)".into(),
            ),
        ),
        row(
            "a lost status adopts the pod carrying the claim's UID, not a second pod",
            claim(json!({}), Value::Null),
            vec![idle("a"), running("mine", "sbx-1", mine.clone())],
            ClaimStep::Adopt {
                pod: "mine".into(),
                sandbox_id: "sbx-1".into(),
            },
        ),
        row(
            "a status patched back to Pending adopts too",
            claim(json!({}), json!({"phase": "Pending"})),
            vec![running("mine", "sbx-1", mine.clone())],
            ClaimStep::Adopt {
                pod: "mine".into(),
                sandbox_id: "sbx-1".into(),
            },
        ),
        Row {
            bound_here: Some(Duration::from_millis(100)),
            ..row(
                "bound here a moment ago: its status write is on its way",
                claim(json!({}), Value::Null),
                vec![running("mine", "sbx-1", mine.clone())],
                ClaimStep::AwaitStatus,
            )
        },
        Row {
            bound_here: Some(Duration::from_secs(6)),
            ..row(
                "bound here, and the status never came (a failed write): adopt",
                claim(json!({}), Value::Null),
                vec![running("mine", "sbx-1", mine.clone())],
                ClaimStep::Adopt {
                    pod: "mine".into(),
                    sandbox_id: "sbx-1".into(),
                },
            )
        },
        Row {
            bound_here: Some(Duration::from_secs(60)),
            ..row(
                "bound here, the cache not showing the pod: never a second pod",
                claim(json!({}), Value::Null),
                vec![idle("a")],
                ClaimStep::AwaitStatus,
            )
        },
        row(
            "a pod it bound that was released since is not adopted",
            claim(json!({}), Value::Null),
            vec![pod(
                "mine",
                "stopping",
                true,
                Some("sbx-1"),
                mine.clone(),
                "Running",
            )],
            ClaimStep::Wait,
        ),
        Row {
            bound_here: Some(Duration::from_millis(100)),
            ..row(
                "bound here, status not seen yet",
                claim(json!({}), Value::Null),
                vec![idle("a")],
                ClaimStep::AwaitStatus,
            )
        },
    ];
    check(rows, &c);
}

#[test]
fn bound_and_finished_claims() {
    let c = Contract::default();
    let b = bound_status("p-1", "sbx-1");
    let keep = |expires: Option<&str>, idle: Option<&str>, again: u64| {
        ClaimStep::Bound(BoundStep::Keep {
            expires_at: expires.map(ts),
            idle_timeout: idle.map(String::from),
            again: Duration::from_millis(again),
        })
    };
    let rows = vec![
        row(
            "a running pod keeps its claim",
            claim(json!({}), b.clone()),
            vec![running("p-1", "sbx-1", json!({}))],
            keep(None, None, 60_000),
        ),
        row(
            "a timeout comes back when it is due",
            claim(json!({"timeout": "90s"}), b.clone()),
            vec![running("p-1", "sbx-1", json!({}))],
            keep(Some("2026-12-01T00:01:30Z"), None, 30_020),
        ),
        row(
            "a far timeout is looked at every minute",
            claim(json!({"timeout": "1h"}), b.clone()),
            vec![running("p-1", "sbx-1", json!({}))],
            keep(Some("2026-12-01T01:00:00Z"), None, 60_000),
        ),
        Row {
            now: "2026-12-01T00:01:30Z",
            ..row(
                "at its timeout it expires",
                claim(json!({"timeout": "90s"}), b.clone()),
                vec![running("p-1", "sbx-1", json!({}))],
                ClaimStep::Bound(BoundStep::Expire),
            )
        },
        row(
            "a raised idle timeout reaches the pod",
            claim(json!({"idleTimeout": "1h"}), b.clone()),
            vec![running(
                "p-1",
                "sbx-1",
                json!({"sandgate.dev/idle-timeout": "5m"}),
            )],
            keep(None, Some("1h"), 60_000),
        ),
        row(
            "an idle timeout the pod already has is not written again",
            claim(json!({"idleTimeout": "1h"}), b.clone()),
            vec![running(
                "p-1",
                "sbx-1",
                json!({"sandgate.dev/idle-timeout": "1h"}),
            )],
            keep(None, None, 60_000),
        ),
        row(
            "a pod whose container exited: died",
            claim(json!({}), b.clone()),
            vec![pod(
                "p-1",
                "running",
                false,
                Some("sbx-1"),
                json!({}),
                "Failed",
            )],
            ClaimStep::Bound(BoundStep::Died),
        ),
        row(
            "a pod that completed: died",
            claim(json!({}), b.clone()),
            vec![pod(
                "p-1",
                "running",
                false,
                Some("sbx-1"),
                json!({}),
                "Succeeded",
            )],
            ClaimStep::Bound(BoundStep::Died),
        ),
        row(
            "its pod released: confirm with the API",
            claim(json!({}), b.clone()),
            vec![pod(
                "p-1",
                "stopping",
                true,
                Some("sbx-1"),
                json!({}),
                "Running",
            )],
            ClaimStep::Confirm,
        ),
        row(
            "its pod runs another sandbox: confirm",
            claim(json!({}), b.clone()),
            vec![running("p-1", "sbx-2", json!({}))],
            ClaimStep::Confirm,
        ),
        row(
            "its pod is not in the cache: confirm",
            claim(json!({}), b.clone()),
            vec![],
            ClaimStep::Confirm,
        ),
        Row {
            bound_here: Some(Duration::from_millis(100)),
            ..row(
                "bound here and the cache has not seen the bind yet: wait for the pod, no API read",
                claim(json!({}), b.clone()),
                vec![idle("p-1")],
                ClaimStep::AwaitPod,
            )
        },
        Row {
            bound_here: Some(Duration::from_millis(100)),
            ..row(
                "bound here and the cache caught up",
                claim(json!({}), b.clone()),
                vec![running("p-1", "sbx-1", json!({}))],
                keep(None, None, 60_000),
            )
        },
        row(
            "a released claim without a TTL stays",
            claim(json!({}), json!({"phase": "Released"})),
            vec![],
            ClaimStep::Finished { delete_at: None },
        ),
        row(
            "a claim's TTL counts from its stop",
            claim(
                json!({"ttlSecondsAfterFinished": 30}),
                json!({"phase": "Failed", "stop": {"reason": "OOMKilled", "stoppedAt": "2026-12-01T00:00:10Z"}}),
            ),
            vec![],
            ClaimStep::Finished {
                delete_at: Some(ts("2026-12-01T00:00:40Z")),
            },
        ),
        Row {
            pool: Some(pool(json!({"claimTtlSecondsAfterFinished": 600}))),
            ..row(
                "else the pool's default",
                claim(
                    json!({}),
                    json!({"phase": "Released", "stop": {"reason": "IdleTimeout", "stoppedAt": "2026-12-01T00:00:10Z"}}),
                ),
                vec![],
                ClaimStep::Finished {
                    delete_at: Some(ts("2026-12-01T00:10:10Z")),
                },
            )
        },
        Row {
            pool: Some(pool(json!({"claimTtlSecondsAfterFinished": 600}))),
            ..row(
                "the claim's own TTL wins, zero included",
                claim(
                    json!({"ttlSecondsAfterFinished": 0}),
                    json!({"phase": "Released", "stop": {"reason": "IdleTimeout", "stoppedAt": "2026-12-01T00:00:10Z"}}),
                ),
                vec![],
                ClaimStep::Finished {
                    delete_at: Some(ts("2026-12-01T00:00:10Z")),
                },
            )
        },
    ];
    check(rows, &c);
}

fn check(rows: Vec<Row>, c: &Contract) {
    for r in rows {
        let facts = Facts {
            claim: &r.claim,
            pool: r.pool.as_ref(),
            pods: &r.pods,
            ahead: r.ahead,
            bound_here: r.bound_here,
        };
        assert_eq!(plan_claim(&facts, c, ts(r.now)), r.want, "{}", r.what);
    }
}
