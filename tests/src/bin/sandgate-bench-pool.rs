//! `make bench-pool`: claim-to-routable latency. From creating a SandboxClaim to the first 200
//! through Envoy:
//! 1. with warm pods, over 200 claims one after another (`RESULT pool …`);
//! 2. a burst: 1 000 claims arriving as a Poisson process at 50/s on a pool of 100 warm pods that
//!    refills, with the API requests made per claim (everything the API served during the burst,
//!    divided by the claims) (`RESULT claims-burst …`, the last line).
//!
//! Real Envoy, extproc and controller processes (release builds), the API double and the loopback
//! kubelet; with SANDGATE_TEST_KUBECONFIG and SANDGATE_TEST_TARGET=realapi, kube-apiserver (its
//! `apiserver_request_total` counts the requests). SANDGATE_BURST_RATE changes the arrival rate.

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
    create_pool(&pools, "bench", WARM).await?;
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
    // SANDGATE_BURST_RATE=<claims/s> measures another arrival rate (the RESULT line says which).
    let rate = std::env::var("SANDGATE_BURST_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50.0);
    burst(&c, 1000, rate, 100).await
}

/// A pool of `replicas` warm pods serving port 8080.
async fn create_pool(pools: &Api<SandboxPool>, name: &str, replicas: i32) -> anyhow::Result<()> {
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "port": 8080, "defaultIdleTimeout": "1h",
                 "template": {"spec": {"containers": [{"name": "s", "image": "x", "ports": [{"containerPort": 8080}]}]}}},
    }))?;
    pools.create(&PostParams::default(), &pool).await?;
    Ok(())
}

/// Requests the API server has served so far: the double's counter, or kube-apiserver's own.
async fn api_requests(c: &Cluster) -> anyhow::Result<f64> {
    if let Some(api) = c.target.double() {
        return Ok(api.hooks.total_requests() as f64);
    }
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = c.target.client.request_text(req).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn burst(c: &Cluster, n: usize, rate: f64, warm: i32) -> anyhow::Result<()> {
    use futures::StreamExt;
    println!("== claims burst: {n} claims, Poisson arrivals at {rate}/s, pool of {warm} warm pods");
    let pools: Api<SandboxPool> = c.target.api();
    let claims: Api<SandboxClaim> = c.target.api();
    create_pool(&pools, "burst", warm).await?;
    wait(Duration::from_secs(120), || async {
        let s = pools.get("burst").await.ok()?.status?;
        (s.available >= warm).then_some(())
    })
    .await?;
    // One watch tells when each claim is bound (no polling that would count as load).
    let bound: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        Default::default();
    let notify = std::sync::Arc::new(tokio::sync::Notify::new());
    {
        let (bound, notify) = (bound.clone(), notify.clone());
        let stream = kube::runtime::watcher(claims.clone(), Default::default());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::applied_objects(stream));
            while let Some(Ok(cl)) = stream.next().await {
                let s = cl.status.clone().unwrap_or_default();
                if let (ClaimPhase::Bound, Some(id)) = (s.phase, s.sandbox_id) {
                    let name = cl.metadata.name.clone().unwrap_or_default();
                    bound
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name, id);
                    notify.notify_waiters();
                }
            }
        });
    }
    let before = api_requests(c).await?;
    let kinds_before = c.target.double().map(|d| d.hooks.requests_by_kind());
    let envoy = c.gateways[0].envoy.addr();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        // Exponential gaps: a Poisson process at `rate`.
        let gap = -(1.0 - rand::random::<f64>()).ln() / rate;
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        let (claims, bound, notify) = (claims.clone(), bound.clone(), notify.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("b{i}");
            let claim: SandboxClaim = serde_json::from_value(json!({
                "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
                "metadata": {"name": name}, "spec": {"poolName": "burst"},
            }))?;
            let start = Instant::now();
            claims.create(&PostParams::default(), &claim).await?;
            let id = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    let woken = notify.notified();
                    if let Some(id) = bound.lock().unwrap_or_else(|e| e.into_inner()).get(&name) {
                        return id.clone();
                    }
                    woken.await;
                }
            })
            .await
            .map_err(|_| anyhow::anyhow!("{name} not bound within 60 s"))?;
            let host = format!("{id}.sandbox.localhost");
            wait(Duration::from_secs(10), || async {
                get(envoy, &host, "/", &[])
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|_| ())
            })
            .await?;
            anyhow::Ok(start.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    for t in tasks {
        latencies.push(t.await??);
    }
    let took = started.elapsed();
    let requests = api_requests(c).await? - before;
    if let (Some(d), Some(b)) = (c.target.double(), kinds_before) {
        let mut by: Vec<(String, u64)> = d
            .hooks
            .requests_by_kind()
            .into_iter()
            .map(|(k, v)| {
                let was = b.get(&k).copied().unwrap_or(0);
                (k, v - was)
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        by.sort_by_key(|k| std::cmp::Reverse(k.1));
        let per: Vec<String> = by
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", *v as f64 / n as f64))
            .collect();
        println!("API requests per claim by kind: {}", per.join(", "));
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let per_claim = requests / n as f64;
    println!(
        "{n} claims over {:.1} s: claim → first 200 p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {requests:.0} API requests ({per_claim:.1} per claim) (targets against the double: p99 ≤ 250 ms, ≤ 10 requests per claim)",
        took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        latencies[n - 1]
    );
    println!(
        "RESULT claims-burst n={n} rate={rate} p50_ms={:.1} p99_ms={:.1} api_requests_per_claim={per_claim:.1}",
        pct(0.5),
        pct(0.99)
    );
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
