//! Claims and pools that never fail silently, process level (real controller, the loopback
//! kubelet, the double in-process or kube-apiserver): dead sandboxes leave a record, finished
//! claims go after their TTL, templates roll, stuck and failing pods are visible, waiting claims
//! cost the API nothing and are served in order.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use sandgate_controller::crd::{ClaimPhase, SandboxClaim, SandboxPool};
use sandgate_tests::cluster::Cluster;
use sandgate_tests::procs::{eventually, holds};
use sandgate_tests::target::echo_container;
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);

async fn cluster() -> Cluster {
    let mut c = Cluster::start(1).await;
    c.start_controller(
        "ctrl",
        &[
            "--sandbox-domain",
            "sandbox.localhost",
            "--leader-election",
            "false",
            "--not-ready-grace",
            "2s",
        ],
    );
    c
}

async fn pool(c: &Cluster, name: &str, replicas: i32, extra: Value) {
    let mut spec = json!({"replicas": replicas, "port": 8080, "defaultIdleTimeout": "1h",
                          "template": {"spec": {"containers": [echo_container(&[8080])]}}});
    json_patch::merge(&mut spec, &extra);
    let p: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    c.target
        .api::<SandboxPool>()
        .create(&PostParams::default(), &p)
        .await
        .unwrap();
}

async fn claim(c: &Cluster, name: &str, pool: &str, extra: Value) {
    let mut spec = json!({"poolName": pool});
    json_patch::merge(&mut spec, &extra);
    let cl: SandboxClaim = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    c.target
        .api::<SandboxClaim>()
        .create(&PostParams::default(), &cl)
        .await
        .unwrap();
}

async fn until_claim(c: &Cluster, name: &str, phase: ClaimPhase) -> SandboxClaim {
    eventually(20 * SEC, || async {
        let cl = c
            .target
            .api::<SandboxClaim>()
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let now = cl.status.clone().unwrap_or_default().phase;
        if now == phase {
            Ok(cl)
        } else {
            Err(format!("{name} is {now:?}"))
        }
    })
    .await
}

async fn until_idle(c: &Cluster, pool: &str, n: usize) -> Vec<Pod> {
    eventually(30 * SEC, || async {
        let idle: Vec<Pod> = c
            .pool_pods(pool, "idle")
            .await
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if idle.len() == n {
            Ok(idle)
        } else {
            Err(format!("{} idle, want {n}", idle.len()))
        }
    })
    .await
}

/// Waits until pool `name`'s `Ready` condition has `reason`; returns it.
async fn until_pool_reason(
    c: &Cluster,
    name: &str,
    reason: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    eventually(20 * SEC, || async {
        let p = c
            .target
            .api::<SandboxPool>()
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let status = p.status.unwrap_or_default();
        let cond = status.conditions.into_iter().find(|c| c.type_ == "Ready");
        match cond {
            Some(c) if c.reason == reason => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Waits until claim `name` waits for its pool (`NoIdlePod`) with a message naming `why`.
async fn until_waiting_because(c: &Cluster, name: &str, why: &str) {
    eventually(20 * SEC, || async {
        let cl = c
            .target
            .api::<SandboxClaim>()
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let cond = cl.status.unwrap_or_default().conditions.into_iter().next();
        match cond {
            Some(c) if c.reason == "NoIdlePod" && c.message.contains(why) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

async fn annotate(c: &Cluster, pod: &str, key: &str, value: &str) {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    c.pods()
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dead_sandbox_fails_its_claim_with_a_record_and_the_claim_goes_after_its_ttl() {
    let c = cluster().await;
    pool(&c, "p", 1, json!({"claimTtlSecondsAfterFinished": 3})).await;
    until_idle(&c, "p", 1).await;
    claim(&c, "doomed", "p", json!({})).await;
    let bound = until_claim(&c, "doomed", ClaimPhase::Bound).await;
    let pod = bound.status.unwrap().pod_name.unwrap();
    annotate(&c, &pod, "kubelet.sandgate.dev/exit", "OOMKilled:137").await;
    let failed = until_claim(&c, "doomed", ClaimPhase::Failed).await;
    let stop = failed.status.unwrap().stop.expect("a stop record");
    assert_eq!(
        (stop.reason.as_str(), stop.exit_code),
        ("OOMKilled", Some(137))
    );
    assert_eq!(stop.images, [sandgate_tests::target::echo_image()]);
    // Then the pod goes and the pool refills; the claim goes after the pool's TTL.
    eventually(15 * SEC, || async {
        match c.pods().get_opt(&pod).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("the dead pod is still there".to_string()),
        }
    })
    .await;
    until_idle(&c, "p", 1).await;
    eventually(15 * SEC, || async {
        match c
            .target
            .api::<SandboxClaim>()
            .get_opt("doomed")
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(_) => Err("the finished claim outlived its TTL".to_string()),
        }
    })
    .await;
}

#[tokio::test]
async fn a_template_change_rolls_idle_pods_and_leaves_claimed_ones() {
    let c = cluster().await;
    pool(&c, "roll", 4, json!({})).await;
    let old: Vec<String> = until_idle(&c, "roll", 4)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    claim(&c, "keeper", "roll", json!({})).await;
    let kept = until_claim(&c, "keeper", ClaimPhase::Bound)
        .await
        .status
        .unwrap()
        .pod_name
        .unwrap();
    until_idle(&c, "roll", 4).await;
    let new_template = json!({"spec": {"template": {"metadata": {"labels": {"version": "2"}},
        "spec": {"containers": [echo_container(&[8080])]}}}});
    c.target
        .api::<SandboxPool>()
        .patch(
            "roll",
            &PatchParams::default(),
            &Patch::Merge(&new_template),
        )
        .await
        .unwrap();
    eventually(45 * SEC, || async {
        let idle = until_idle(&c, "roll", 4).await;
        let versions: Vec<Option<String>> = idle
            .iter()
            .map(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("version").cloned())
            })
            .collect();
        if versions.iter().all(|v| v.as_deref() == Some("2")) {
            Ok(())
        } else {
            Err(format!("{versions:?}"))
        }
    })
    .await;
    let claimed = c.pods().get(&kept).await.expect("the claimed pod stays");
    assert_eq!(
        claimed.metadata.labels.unwrap()["sandgate.dev/phase"],
        "running",
        "the claimed pod was touched"
    );
    for name in old.iter().filter(|n| **n != kept) {
        assert!(
            c.pods()
                .get_opt(name)
                .await
                .unwrap()
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
            "{name} still idle"
        );
    }
}

#[tokio::test]
async fn an_idle_pod_stuck_not_ready_is_replaced() {
    let c = cluster().await;
    pool(&c, "flaky", 1, json!({})).await;
    let pod = until_idle(&c, "flaky", 1)
        .await
        .remove(0)
        .metadata
        .name
        .unwrap();
    annotate(&c, &pod, "kubelet.sandgate.dev/ready", "false").await;
    eventually(20 * SEC, || async {
        let idle = until_idle(&c, "flaky", 1).await;
        let name = idle[0].metadata.name.clone().unwrap();
        let ready = idle[0]
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if name != pod && ready {
            Ok(())
        } else {
            Err(format!("{name} ready={ready}"))
        }
    })
    .await;
}

#[tokio::test]
async fn why_a_pool_does_not_fill_shows_in_its_status_and_its_waiting_claims() {
    let c = cluster().await;
    pool(
        &c,
        "broken",
        1,
        json!({"template": {"metadata": {"annotations": {"kubelet.sandgate.dev/waiting": "ImagePullBackOff: manifest for sandgate/echo:nope not found"}}}}),
    )
    .await;
    let ready = until_pool_reason(&c, "broken", "ImagePullBackOff").await;
    assert!(
        ready
            .message
            .contains("manifest for sandgate/echo:nope not found"),
        "{}",
        ready.message
    );
    claim(&c, "waiter", "broken", json!({})).await;
    until_waiting_because(&c, "waiter", "ImagePullBackOff").await;
}

#[tokio::test]
async fn raising_a_bound_claims_idle_timeout_reaches_its_pod() {
    let c = cluster().await;
    pool(&c, "p", 1, json!({})).await;
    until_idle(&c, "p", 1).await;
    claim(&c, "c", "p", json!({"idleTimeout": "5m"})).await;
    let pod = until_claim(&c, "c", ClaimPhase::Bound)
        .await
        .status
        .unwrap()
        .pod_name
        .unwrap();
    let raise = json!({"spec": {"idleTimeout": "2h"}});
    c.target
        .api::<SandboxClaim>()
        .patch("c", &PatchParams::default(), &Patch::Merge(&raise))
        .await
        .unwrap();
    eventually(10 * SEC, || async {
        let p = c.pods().get(&pod).await.map_err(|e| e.to_string())?;
        let t = p
            .metadata
            .annotations
            .unwrap_or_default()
            .get("sandgate.dev/idle-timeout")
            .cloned();
        if t.as_deref() == Some("2h") {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn five_hundred_waiting_claims_cost_the_api_nothing_and_are_served_in_order_on_double() {
    let c = cluster().await;
    let api = c.target.double().expect("counts the double's requests");
    pool(&c, "empty", 0, json!({})).await;
    for i in 0..500 {
        claim(&c, &format!("w{i:03}"), "empty", json!({})).await;
    }
    eventually(60 * SEC, || async {
        let pending = c
            .target
            .api::<SandboxClaim>()
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .filter(|cl| cl.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
            .count();
        if pending == 500 {
            Ok(())
        } else {
            Err(format!("{pending} of 500 report why they wait"))
        }
    })
    .await;
    // While they wait, the controller makes (next to) no request: no polling of the pool.
    let before = api.hooks.recent_requests().len();
    let window = 5 * SEC;
    holds(window, || async { Ok(()) }).await;
    let during: Vec<String> = api
        .hooks
        .recent_requests()
        .into_iter()
        .skip(before)
        .collect();
    let waiting_related: Vec<&String> = during
        .iter()
        .filter(|r| r.contains("sandboxclaims") || r.contains("sandboxpools/empty"))
        .collect();
    assert!(
        waiting_related.len() < 10,
        "{} requests in {window:?}: {:?}",
        waiting_related.len(),
        &waiting_related[..waiting_related.len().min(10)]
    );
    // Three pods appear: the three oldest waiters get them.
    let scale = json!({"spec": {"replicas": 3}});
    c.target
        .api::<SandboxPool>()
        .patch("empty", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    for first in ["w000", "w001", "w002"] {
        until_claim(&c, first, ClaimPhase::Bound).await;
    }
}

/// The pods kube-apiserver's ResourceQuota admission counts in the test's namespace against
/// `pods`: no quota controller runs here, so the harness writes the quota's status itself, as
/// the controller-manager would (admission then keeps `used` current on every create).
async fn set_pod_quota(c: &Cluster, hard: usize, used: usize) {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let api = c.target.api::<ResourceQuota>();
    let q: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "pods"}, "spec": {"hard": {"pods": hard.to_string()}},
    }))
    .unwrap();
    match api.create(&PostParams::default(), &q).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let spec = json!({"spec": {"hard": {"pods": hard.to_string()}}});
            api.patch("pods", &PatchParams::default(), &Patch::Merge(&spec))
                .await
                .unwrap();
        }
        Err(e) => panic!("{e}"),
    }
    let status =
        json!({"status": {"hard": {"pods": hard.to_string()}, "used": {"pods": used.to_string()}}});
    api.patch_status("pods", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn pool_ready(
    c: &Cluster,
    name: &str,
) -> (
    sandgate_controller::crd::SandboxPoolStatus,
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) {
    let p = c.target.api::<SandboxPool>().get(name).await.unwrap();
    let status = p.status.unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .cloned();
    (status, ready.expect("a Ready condition"))
}

/// kube-apiserver's own quota admission refuses the pool's pod creates: the refusal shows in the
/// pool's `Ready` condition, a Warning event and the waiting claim's condition; the pool's status
/// is still written; creates back off (a handful in 12 s, not one per wakeup); raising the quota
/// lets the pool refill and the waiting claim bind.
#[tokio::test]
async fn a_quota_that_refuses_pods_is_visible_backs_off_and_recovers_on_real_api() {
    let c = cluster().await;
    pool(&c, "q", 1, json!({})).await;
    until_idle(&c, "q", 1).await;
    let pods = c
        .pods()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    set_pod_quota(&c, pods, pods).await;
    claim(&c, "first", "q", json!({})).await;
    until_claim(&c, "first", ClaimPhase::Bound).await;
    let ready = until_pool_reason(&c, "q", "PodCreateFailed").await;
    assert!(
        ready.message.contains("exceeded quota"),
        "{}",
        ready.message
    );
    let (status, _) = pool_ready(&c, "q").await;
    assert_eq!(
        status.replicas.get("running"),
        Some(&1),
        "the refusal stopped the status write: {status:?}"
    );
    eventually(10 * SEC, || async {
        let events = c.target.api::<k8s_openapi::api::events::v1::Event>();
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("PodCreateFailed")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("q")
            })
            .map(|_| ())
            .ok_or_else(|| {
                format!(
                    "no PodCreateFailed Warning among {} events",
                    list.items.len()
                )
            })
    })
    .await;
    claim(&c, "second", "q", json!({})).await;
    until_waiting_because(&c, "second", "exceeded quota").await;
    let refused = || async {
        c.controllers[0]
            .metric("sandgate_controller_pod_creates_total{label=\"refused\"}")
            .await
    };
    let before = refused().await;
    assert!(before >= 1.0, "no refused create counted");
    holds(12 * SEC, || async {
        let n = refused().await - before;
        if n <= 4.0 {
            Ok(())
        } else {
            Err(format!("{n} refused creates in 12 s: no backoff"))
        }
    })
    .await;
    let (status, ready) = pool_ready(&c, "q").await;
    assert_eq!(ready.reason, "PodCreateFailed", "{ready:?}");
    assert_eq!(status.replicas.get("running"), Some(&1));
    // The quota is raised: the next retry (30 s at most) creates the pod, the claim binds.
    let pods = c
        .pods()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    set_pod_quota(&c, pods + 1, pods).await;
    eventually(45 * SEC, || async {
        let cl = c
            .target
            .api::<SandboxClaim>()
            .get("second")
            .await
            .map_err(|e| e.to_string())?;
        match cl.status.unwrap_or_default().phase {
            ClaimPhase::Bound => Ok(()),
            p => Err(format!("second is {p:?}")),
        }
    })
    .await;
}
