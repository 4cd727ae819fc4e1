//! `make bench` (pool part): claim-to-routable latency. From creating a SandboxClaim to the first
//! 200 through Envoy, with warm pods, over 200 claims one after another. Real Envoy, extproc and
//! controller processes (release builds), the API double with its loopback kubelet.
//!
//! The last line is `RESULT pool ...`.

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use sandgate_controller::crd::{ClaimPhase, SandboxClaim, SandboxPool};
use sandgate_tests::cluster::Cluster;
use sandgate_tests::procs::get;
use serde_json::json;

const CLAIMS: usize = 200;
const WARM: i32 = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("== claim to routable: {CLAIMS} claims in sequence, pool of {WARM} warm pods");
    let mut c = Cluster::start(1).await;
    c.start_controller(
        "bench",
        &[
            "--sandbox-domain",
            "sandbox.localhost",
            "--leader-election",
            "false",
            "--default-idle-timeout",
            "1h",
        ],
    );
    let pools: Api<SandboxPool> = c.target.api();
    let claims: Api<SandboxClaim> = c.target.api();
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": "bench"},
        "spec": {"replicas": WARM, "port": 8080, "defaultIdleTimeout": "1h",
                 "template": {"spec": {"containers": [{"name": "s", "image": "x", "ports": [{"containerPort": 8080}]}]}}},
    }))?;
    pools.create(&PostParams::default(), &pool).await?;
    let mut latencies = Vec::with_capacity(CLAIMS);
    for i in 0..CLAIMS {
        // Warm pods only: wait until the pool has refilled.
        wait(Duration::from_secs(30), || async {
            let s = pools.get("bench").await.ok()?.status?;
            (s.available >= WARM).then_some(())
        })
        .await?;
        let claim: SandboxClaim = serde_json::from_value(json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
            "metadata": {"name": format!("c{i}")}, "spec": {"poolName": "bench"},
        }))?;
        let start = Instant::now();
        claims.create(&PostParams::default(), &claim).await?;
        let id = wait(Duration::from_secs(10), || async {
            let s = claims.get(&format!("c{i}")).await.ok()?.status?;
            (s.phase == ClaimPhase::Bound).then_some(s.sandbox_id?)
        })
        .await?;
        let host = format!("{id}.sandbox.localhost");
        let envoy = c.gateways[0].envoy.addr();
        wait(Duration::from_secs(10), || async {
            get(envoy, &host, "/", &[])
                .await
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ())
        })
        .await?;
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!("claim → first 200 through Envoy: p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms (target p99 ≤ 100 ms)", latencies[latencies.len() - 1]);
    println!("RESULT pool claim_p50_ms={p50:.1} claim_p99_ms={p99:.1}");
    Ok(())
}

/// Polls `f` every 2 ms until it yields, or fails after `within`.
async fn wait<T, F, Fut>(within: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {within:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
