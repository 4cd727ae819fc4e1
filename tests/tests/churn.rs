//! Pods churned through claim, traffic and release, with every answer checked for the pod that
//! gave it: a released sandbox's host must never reach the pod that comes after it, even when
//! that pod has its IP (on the real node the pod network is a /25, so addresses come round
//! again within the run). Prints `RESULT churn …`; on the real node (`tests/scenarios.sh node`)
//! the node's versions are in the run's `RESULT node` line.
//!
//! SANDGATE_CHURN_PODS sets how many (default 200 on a real node, 60 elsewhere).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use sandgate_controller::crd::{ClaimPhase, SandboxClaim, SandboxPool};
use sandgate_tests::cluster::Cluster;
use sandgate_tests::procs::{eventually, get};
use sandgate_tests::target::{echo_container, Kind};
use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Seconds from a pod's creation to its Ready condition, for pods that became Ready.
fn ready_after(pod: &Pod) -> Option<f64> {
    let created = pod.metadata.creation_timestamp.as_ref()?.0;
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?
        .0;
    Some(ready.duration_since(created).as_secs_f64())
}

#[tokio::test]
async fn churned_pods_are_each_reached_only_through_their_own_sandbox() {
    let real_node = Kind::current() == Kind::Cluster;
    let n: usize = std::env::var("SANDGATE_CHURN_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if real_node { 200 } else { 60 });
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
    let pools: Api<SandboxPool> = c.target.api();
    let claims: Api<SandboxClaim> = c.target.api();
    let pods: Api<Pod> = c.target.api();
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": "churn"},
        "spec": {"replicas": 4, "port": 8080, "defaultIdleTimeout": "1h",
                 "template": {"spec": {"terminationGracePeriodSeconds": 5,
                                       "containers": [echo_container(&[8080])]}}},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let envoy = c.gateways[0].envoy.addr();

    let mut claim_ms = Vec::new();
    let mut ready = Vec::new(); // claimed pods: creation → Ready, seconds
    let mut released: Vec<(String, String)> = Vec::new(); // (host, pod) of released sandboxes
    let mut ips: HashMap<String, Vec<String>> = HashMap::new(); // ip -> pods that had it
    let mut misroutes = 0usize;
    let mut checked = 0usize;
    for i in 0..n {
        let name = format!("churn-{i}");
        let cl: SandboxClaim = serde_json::from_value(json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
            "metadata": {"name": name}, "spec": {"poolName": "churn"},
        }))
        .unwrap();
        let start = Instant::now();
        claims.create(&PostParams::default(), &cl).await.unwrap();
        let (id, pod, ip) = eventually(120 * SEC, || async {
            let cl = claims.get(&name).await.map_err(|e| e.to_string())?;
            let s = cl.status.unwrap_or_default();
            match (s.phase, s.sandbox_id, s.pod_name) {
                (ClaimPhase::Bound, Some(id), Some(pod)) => {
                    Ok((id, pod, s.pod_ip.unwrap_or_default()))
                }
                (phase, ..) => Err(format!("{name} is {phase:?}")),
            }
        })
        .await;
        let host = format!("8080-{id}.sandbox.localhost");
        // Claim → first 200 through Envoy from the claimed pod.
        let reply = eventually(30 * SEC, || async {
            let r = get(envoy, &host, "/", &[])
                .await
                .map_err(|e| e.to_string())?;
            if r.status == 200 {
                Ok(r)
            } else {
                Err(format!("{host}: {} {}", r.status, r.body))
            }
        })
        .await;
        claim_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        checked += 1;
        if reply.pod().as_deref() != Some(pod.as_str()) {
            misroutes += 1;
            eprintln!(
                "MISROUTE {host}: answered by {:?}, bound to {pod}",
                reply.pod()
            );
        }
        ips.entry(ip).or_default().push(pod.clone());
        if let Some(t) = pods.get(&pod).await.ok().as_ref().and_then(ready_after) {
            ready.push(t);
        }
        // Every sandbox released so far: never answered by any pod.
        for (old_host, old_pod) in released.iter().rev().take(8) {
            let r = get(envoy, old_host, "/", &[]).await.expect("request");
            checked += 1;
            if r.status == 200 {
                misroutes += 1;
                eprintln!(
                    "MISROUTE {old_host} (released, was {old_pod}): answered by {:?}",
                    r.pod()
                );
            }
        }
        claims
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
        // Released: its host must stop answering before the next claim (the eviction waits for
        // every gateway).
        eventually(30 * SEC, || async {
            let r = get(envoy, &host, "/", &[])
                .await
                .map_err(|e| e.to_string())?;
            if r.status == 200 {
                Err(format!("{host} still answers from {:?}", r.pod()))
            } else {
                Ok(())
            }
        })
        .await;
        released.push((host, pod));
    }
    ready.sort_by(f64::total_cmp);
    claim_ms.sort_by(f64::total_cmp);
    let reused = ips.values().filter(|p| p.len() > 1).count();
    println!(
        "RESULT churn pods_churned={n} requests_checked={checked} misroutes={misroutes} ips_reused={reused} claim_p50_ms={:.0} claim_p99_ms={:.0} ready_p50_ms={:.0} ready_p99_ms={:.0}",
        pct(&claim_ms, 0.5),
        pct(&claim_ms, 0.99),
        pct(&ready, 0.5) * 1000.0,
        pct(&ready, 0.99) * 1000.0,
    );
    if let Some(dir) = std::env::var_os("SANDGATE_TEST_REPORT") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(
            std::path::Path::new(&dir).join("churn"),
            format!(
                "pods_churned={n} misroutes={misroutes} ips_reused={reused} claim_p50_ms={:.0} claim_p99_ms={:.0} ready_p50_ms={:.0} ready_p99_ms={:.0}",
                pct(&claim_ms, 0.5),
                pct(&claim_ms, 0.99),
                pct(&ready, 0.5) * 1000.0,
                pct(&ready, 0.99) * 1000.0
            ),
        );
    }
    assert_eq!(
        misroutes, 0,
        "requests answered by a pod other than their sandbox's"
    );
    let _ = pools.delete("churn", &DeleteParams::default()).await;
}
