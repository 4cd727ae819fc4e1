//! Warm pools and claims, process level: real Envoy, sandgate-extproc, sandgate-controller and the
//! API double with its loopback kubelet.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sandgate_controller::crd::{ClaimPhase, SandboxClaim, SandboxPool};
use sandgate_tests::cluster::Cluster;
use sandgate_tests::procs::{eventually, holds};
use sandgate_tests::target::{echo_container, Kind};
use serde_json::json;

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
        ],
    );
    c
}

fn pools(c: &Cluster) -> Api<SandboxPool> {
    c.target.api()
}
fn claims(c: &Cluster) -> Api<SandboxClaim> {
    c.target.api()
}

async fn create_pool(c: &Cluster, name: &str, replicas: i32, idle_timeout: &str) {
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "port": 8080, "defaultIdleTimeout": idle_timeout,
                 "template": {"spec": {"containers": [echo_container(&[8080])]}}},
    }))
    .unwrap();
    pools(c)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
}

async fn scale(c: &Cluster, name: &str, replicas: i32) {
    let patch = json!({"spec": {"replicas": replicas}});
    pools(c)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn until_available(c: &Cluster, pool: &str, n: i32, within: Duration) {
    // A real kubelet starts containers, and stops the last test's: in CI two pods on the test
    // node once took 28 s to start after the 50 of the test before.
    let within = if Kind::current() == Kind::Cluster {
        within * 3
    } else {
        within
    };
    eventually(within, || async {
        let p = pools(c).get(pool).await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        let idle = c.pool_pods(pool, "idle").await.len() as i32;
        // At full size (every caller waits for the pool's `replicas`), the pool says it is Ready.
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.as_str());
        if s.available == n && idle == n && ready == Some("True") {
            Ok(())
        } else {
            Err(format!(
                "{pool}: available {}, idle pods {idle}, Ready {ready:?}, want {n}",
                s.available
            ))
        }
    })
    .await
}

/// Waits until the pool has exactly `n` pods, whatever their phase.
/// Waits until `pool` has `n` pods not being deleted (on a real node a deleted pod stays,
/// Terminating, until its kubelet has stopped it).
async fn until_pool_pods(c: &Cluster, pool: &str, n: usize, within: Duration) {
    eventually(within, || async {
        let lp = ListParams::default().labels(&format!("sandgate.dev/pool={pool}"));
        let have = c
            .pods()
            .list(&lp)
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        if have == n {
            Ok(())
        } else {
            Err(format!("{pool}: {have} pods, want {n}"))
        }
    })
    .await
}

async fn claim(c: &Cluster, name: &str, pool: &str) {
    let cl: SandboxClaim = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
        "metadata": {"name": name},
        "spec": {"poolName": pool},
    }))
    .unwrap();
    claims(c).create(&PostParams::default(), &cl).await.unwrap();
}

/// Waits for a claim to reach `phase`; returns (sandbox id, pod name).
async fn until_claim(
    c: &Cluster,
    name: &str,
    phase: ClaimPhase,
    within: Duration,
) -> (String, String) {
    eventually(within, || async {
        let cl = claims(c).get(name).await.map_err(|e| e.to_string())?;
        let s = cl.status.unwrap_or_default();
        if s.phase == phase {
            Ok((
                s.sandbox_id.unwrap_or_default(),
                s.pod_name.unwrap_or_default(),
            ))
        } else {
            Err(format!("{name} is {:?}", s.phase))
        }
    })
    .await
}

/// Waits until `name` no longer exists.
async fn until_gone<K>(api: &Api<K>, name: &str, within: Duration)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(within, || async {
        match api.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err(format!("{name} still exists")),
        }
    })
    .await
}

#[tokio::test]
async fn a_claim_on_a_warm_pool_binds_and_routes() {
    let c = cluster().await;
    create_pool(&c, "warm", 2, "1h").await;
    until_available(&c, "warm", 2, 30 * SEC).await;
    claim(&c, "c1", "warm").await;
    let (id, pod) = until_claim(&c, "c1", ClaimPhase::Bound, 5 * SEC).await;
    assert!(id.starts_with("sbx-") && id.len() == 24, "{id}");
    let cl = claims(&c).get("c1").await.unwrap();
    assert_eq!(
        cl.status.unwrap().url.as_deref(),
        Some(format!("{id}.sandbox.localhost").as_str())
    );
    // The host form with the pool's default port reaches the claimed pod.
    let r = c.get(0, &format!("{id}.sandbox.localhost")).await;
    assert_eq!((r.status, r.pod()), (200, Some(pod.clone())), "{}", r.body);
    let p = c.pods().get(&pod).await.unwrap();
    let ann = p.metadata.annotations.unwrap();
    assert!(ann.contains_key("sandgate.dev/claimed-at"));
    assert_eq!(ann["sandgate.dev/idle-timeout"], "1h");
    // The pool is replenished at once.
    until_available(&c, "warm", 2, 30 * SEC).await;
}

#[tokio::test]
async fn fifty_concurrent_claims_get_fifty_pods_and_a_fifty_first_waits_for_the_refill() {
    let c = cluster().await;
    create_pool(&c, "big", 50, "1h").await;
    until_available(&c, "big", 50, 30 * SEC).await;
    let names: Vec<String> = (0..51).map(|i| format!("c{i}")).collect();
    join_all(names.iter().map(|n| claim(&c, n, "big"))).await;
    let bound = join_all(
        names
            .iter()
            .map(|n| until_claim(&c, n, ClaimPhase::Bound, 30 * SEC)),
    )
    .await;
    let pods: HashSet<&String> = bound.iter().map(|(_, p)| p).collect();
    let ids: HashSet<&String> = bound.iter().map(|(i, _)| i).collect();
    assert_eq!(pods.len(), 51, "two claims share a pod");
    assert_eq!(ids.len(), 51);
    assert_eq!(c.pool_pods("big", "running").await.len(), 51);
}

#[tokio::test]
async fn claim_traffic_idle_release_then_the_pool_is_whole_again() {
    let c = cluster().await;
    create_pool(&c, "cycle", 2, "3s").await;
    until_available(&c, "cycle", 2, 30 * SEC).await;
    claim(&c, "c1", "cycle").await;
    let (id, pod) = until_claim(&c, "c1", ClaimPhase::Bound, 5 * SEC).await;
    for _ in 0..3 {
        assert_eq!(
            c.get(0, &format!("{id}.sandbox.localhost")).await.status,
            200
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    until_claim(&c, "c1", ClaimPhase::Released, 15 * SEC).await;
    assert_eq!(
        c.get(0, &format!("{id}.sandbox.localhost")).await.status,
        502
    );
    // The released pod is deleted and the pool is back at full size.
    until_gone(&c.pods(), &pod, 10 * SEC).await;
    until_available(&c, "cycle", 2, 30 * SEC).await;
}

#[tokio::test]
async fn a_failed_pod_is_replaced() {
    let c = cluster().await;
    create_pool(&c, "fail", 2, "1h").await;
    until_available(&c, "fail", 2, 30 * SEC).await;
    let victim = c.pool_pods("fail", "idle").await[0]
        .metadata
        .name
        .clone()
        .unwrap();
    // Its container exits (the loopback kubelet reports it as a node would).
    let exit = json!({"metadata": {"annotations": {"kubelet.sandgate.dev/exit": "Error:1"}}});
    c.pods()
        .patch(&victim, &PatchParams::default(), &Patch::Merge(&exit))
        .await
        .unwrap();
    until_gone(&c.pods(), &victim, 10 * SEC).await;
    until_available(&c, "fail", 2, 30 * SEC).await;
}

#[tokio::test]
async fn scaling_never_removes_a_claimed_pod() {
    let c = cluster().await;
    create_pool(&c, "sc", 1, "1h").await;
    until_available(&c, "sc", 1, 30 * SEC).await;
    scale(&c, "sc", 3).await;
    until_available(&c, "sc", 3, 30 * SEC).await;
    claim(&c, "c1", "sc").await;
    let (_, pod) = until_claim(&c, "c1", ClaimPhase::Bound, 5 * SEC).await;
    scale(&c, "sc", 0).await;
    until_available(&c, "sc", 0, 30 * SEC).await;
    until_pool_pods(&c, "sc", 1, 10 * SEC).await;
    assert_eq!(c.phase(&pod).await, "running");
    scale(&c, "sc", 2).await;
    until_available(&c, "sc", 2, 30 * SEC).await;
    assert_eq!(c.phase(&pod).await, "running");
}

#[tokio::test]
async fn deleting_a_claim_releases_its_sandbox() {
    let c = cluster().await;
    create_pool(&c, "del", 1, "1h").await;
    until_available(&c, "del", 1, 30 * SEC).await;
    claim(&c, "c1", "del").await;
    let (id, _) = until_claim(&c, "c1", ClaimPhase::Bound, 5 * SEC).await;
    assert_eq!(
        c.get(0, &format!("{id}.sandbox.localhost")).await.status,
        200
    );
    claims(&c)
        .delete("c1", &DeleteParams::default())
        .await
        .unwrap();
    eventually(5 * SEC, || async {
        let r = c.get(0, &format!("{id}.sandbox.localhost")).await;
        if r.status == 502 {
            Ok(())
        } else {
            Err(format!("still {}", r.status))
        }
    })
    .await;
    until_gone(&claims(&c), "c1", 5 * SEC).await;
    until_available(&c, "del", 1, 30 * SEC).await;
}

#[tokio::test]
async fn deleting_a_pool_keeps_claimed_sandboxes_until_released() {
    let c = cluster().await;
    create_pool(&c, "gone", 2, "1h").await;
    until_available(&c, "gone", 2, 30 * SEC).await;
    claim(&c, "c1", "gone").await;
    let (id, pod) = until_claim(&c, "c1", ClaimPhase::Bound, 5 * SEC).await;
    pools(&c)
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    // Idle pods go; the claimed one keeps serving and the pool waits for it.
    until_pool_pods(&c, "gone", 1, 10 * SEC).await;
    c.assert_running_until(
        &pod,
        std::time::Instant::now() + 2 * SEC,
        "a claimed sandbox stopped when its pool was deleted",
    )
    .await;
    assert_eq!(
        c.get(0, &format!("{id}.sandbox.localhost")).await.status,
        200
    );
    assert!(
        pools(&c).get_opt("gone").await.unwrap().is_some(),
        "pool removed while a sandbox is claimed"
    );
    // Releasing the sandbox lets the pool go.
    claims(&c)
        .delete("c1", &DeleteParams::default())
        .await
        .unwrap();
    until_gone(&pools(&c), "gone", 15 * SEC).await;
}

#[tokio::test]
async fn a_claim_on_an_empty_pool_waits_with_a_reason_then_binds() {
    let c = cluster().await;
    create_pool(&c, "empty", 0, "1h").await;
    claim(&c, "c1", "empty").await;
    // The controller may see the claim before the pool reaches its cache (a moment of
    // PoolNotFound, looked at again every 2 s); the reason it settles on is the empty pool.
    eventually(5 * SEC, || async {
        let s = claims(&c)
            .get("c1")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        match s.conditions.first() {
            Some(cond) if s.phase == ClaimPhase::Pending && cond.reason == "NoIdlePod" => Ok(()),
            cond => Err(format!("{:?}, condition {cond:?}", s.phase)),
        }
    })
    .await;
    scale(&c, "empty", 1).await;
    until_claim(&c, "c1", ClaimPhase::Bound, 10 * SEC).await;
    let s = claims(&c).get("c1").await.unwrap().status.unwrap();
    assert_eq!(
        (
            s.conditions[0].reason.as_str(),
            s.conditions[0].status.as_str()
        ),
        ("Bound", "True")
    );
}

#[tokio::test]
async fn idle_pods_past_max_pod_age_are_replaced_and_claimed_ones_stay() {
    let c = cluster().await;
    create_pool(&c, "rot", 2, "1h").await;
    until_available(&c, "rot", 2, 30 * SEC).await;
    let first: HashSet<String> = c
        .pool_pods("rot", "idle")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    claim(&c, "c1", "rot").await;
    let (id, claimed) = until_claim(&c, "c1", ClaimPhase::Bound, 5 * SEC).await;
    // Longer than a real node takes to start a pod, or the replacements would be rotated out in
    // turn before the pool is ever full of them.
    let patch = json!({"spec": {"maxPodAge": "15s"}});
    pools(&c)
        .patch("rot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    // Every idle pod from before is rotated out (within 15 s of its creation), and the pool is
    // full again with new ones…
    let pods = c.pods();
    eventually(60 * SEC, || async {
        let idle: Vec<String> = c
            .pool_pods("rot", "idle")
            .await
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let old: Vec<&String> = idle.iter().filter(|n| first.contains(*n)).collect();
        let gone = futures::future::join_all(
            first
                .iter()
                .filter(|n| **n != claimed)
                .map(|n| pods.get_opt(n)),
        )
        .await
        .into_iter()
        .all(|p| matches!(p, Ok(None)));
        if gone && old.is_empty() && idle.len() == 2 {
            Ok(())
        } else {
            Err(format!("idle {idle:?}, first {first:?}"))
        }
    })
    .await;
    // …while the claimed pod, older still, keeps running and routing.
    assert_eq!(c.phase(&claimed).await, "running");
    assert_eq!(
        c.get(0, &format!("{id}.sandbox.localhost")).await.status,
        200
    );
}

#[tokio::test]
async fn a_claim_the_api_server_would_refuse_fails_with_a_reason_and_is_not_retried() {
    let c = cluster().await;
    create_pool(&c, "strict", 1, "1h").await;
    until_available(&c, "strict", 1, 30 * SEC).await;
    // Valid in the CRD's schema (a map of strings), not as pod labels.
    let cl: SandboxClaim = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
        "metadata": {"name": "bad"},
        "spec": {"poolName": "strict", "labels": {"team": "not a label value"}},
    }))
    .unwrap();
    claims(&c)
        .create(&PostParams::default(), &cl)
        .await
        .unwrap();
    until_claim(&c, "bad", ClaimPhase::Failed, 10 * SEC).await;
    let failed = claims(&c).get("bad").await.unwrap();
    let cond = failed.status.clone().unwrap().conditions[0].clone();
    assert_eq!(
        (
            cond.type_.as_str(),
            cond.status.as_str(),
            cond.reason.as_str()
        ),
        ("Bound", "False", "InvalidSpec")
    );
    assert!(
        cond.message.contains("spec.labels[team]"),
        "{}",
        cond.message
    );
    // Settled: no write to the claim, and the warm pod stays untouched.
    let rv = failed.metadata.resource_version.clone();
    holds(3 * SEC, || async {
        let now = claims(&c).get("bad").await.map_err(|e| e.to_string())?;
        let idle = c.pool_pods("strict", "idle").await.len();
        if now.metadata.resource_version != rv {
            return Err("the failed claim is still being written".into());
        }
        if idle != 1 {
            return Err(format!("{idle} idle pods"));
        }
        Ok(())
    })
    .await;
}
