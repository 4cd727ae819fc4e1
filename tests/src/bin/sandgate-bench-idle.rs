//! `make bench` (idle part): the cost of the idle-timeout loop.
//!
//! 1. Ticks: 10 000 running sandboxes in the API double, three extproc replicas (the real
//!    `ControlApi` and `ActivityTable`, served over gRPC in this process), 10% of the sandboxes busy
//!    (touched on a random replica before every tick). The real controller tick runs every 1 s with
//!    a 2 s refresh interval; we measure its duration and the annotation writes it causes.
//! 2. GetLastActive at 100 000 tracked sandboxes: full, and with a cursor after 1% changed.
//!
//! The last line is `RESULT idle ...`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use prost::Message;
use sandgate_controller::{idle, metrics::Metrics, poller::Poller, tick, writer::AnnotationWriter};
use sandgate_extproc::activity::ActivityTable;
use sandgate_extproc::control::{BearerAuth, ControlApi};
use sandgate_extproc::index::{PodRoute, RouteIndex, SandboxKey};
use sandgate_extproc::resolver::{LookupError, PodLookup, Resolver};
use sandgate_shared::control::{control_client::ControlClient, GetLastActiveRequest};
use sandgate_shared::Contract;
use sandgate_tests::apidouble::ApiDouble;
use sandgate_tests::procs::TEST_TOKEN;
use sandgate_tests::stack::client_for;
use serde_json::json;

const SANDBOXES: usize = 10_000;
const BUSY: usize = 1_000;
const REPLICAS: usize = 3;
const TICKS: usize = 12;
const INTERVAL: Duration = Duration::from_secs(1);
const REFRESH: Duration = Duration::from_secs(2);

struct NoApi;
impl PodLookup for NoApi {
    fn lookup(&self, _: SandboxKey) -> BoxFuture<'static, Result<Option<PodRoute>, LookupError>> {
        Box::pin(async { Ok(None) })
    }
}

/// Serves a control API over `table` on an ephemeral port.
async fn serve_replica(table: Arc<ActivityTable>, name: &str) -> anyhow::Result<SocketAddr> {
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = sandgate_extproc::metrics::Metrics::new(&mut reg);
    let resolver = Arc::new(Resolver::new(
        Arc::new(RouteIndex::new()),
        Arc::new(NoApi),
        Duration::from_secs(1),
        Duration::from_secs(1),
        metrics,
    ));
    let api = ControlApi {
        activity: table,
        resolver,
        replica: name.into(),
        boot_id: format!("{name}-boot"),
        warm: Box::new(|| true),
        fast: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api.into_service(BearerAuth::new(TEST_TOKEN)))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    Ok(addr)
}

fn key(i: usize) -> SandboxKey {
    SandboxKey::new(&format!("sbx-{i}")).expect("id")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (tick_p50, tick_max, writes) = tick_bench().await?;
    let (full_ms, full_bytes, delta_ms, delta_bytes) = getlastactive_bench().await?;
    let bound = BUSY as f64 * INTERVAL.as_secs_f64() / REFRESH.as_secs_f64();
    println!("\n| measure | figure | target |\n|---|---|---|");
    println!("| tick duration, 10 000 sandboxes / 3 replicas / 10% busy | p50 {tick_p50:.1} ms, max {tick_max:.1} ms | ≤ 250 ms |");
    println!(
        "| annotation writes per tick | {writes:.0} | ≤ busy × interval / refresh = {bound:.0} |"
    );
    println!("| GetLastActive, 100 000 sandboxes, full | {full_ms:.1} ms, {full_bytes} bytes | ≤ 100 ms |");
    println!("| GetLastActive, cursor after 1% changed | {delta_ms:.2} ms, {delta_bytes} bytes | ∝ changes |");
    println!("RESULT idle tick_ms={tick_max:.1} writes_per_tick={writes:.0} getlastactive_full_ms={full_ms:.1} getlastactive_delta_ms={delta_ms:.2} delta_bytes={delta_bytes}");
    Ok(())
}

async fn tick_bench() -> anyhow::Result<(f64, f64, f64)> {
    println!("== idle ticks: {SANDBOXES} running sandboxes, {REPLICAS} replicas, {BUSY} busy, interval {INTERVAL:?}, refresh {REFRESH:?}");
    let api = ApiDouble::start().await?;
    let now = idle::format_time(SystemTime::now());
    api.running_sandboxes(
        SANDBOXES,
        json!({"sandgate.dev/last-active": now, "sandgate.dev/idle-timeout": "1h"}),
    )?;
    let tables: Vec<Arc<ActivityTable>> = (0..REPLICAS)
        .map(|_| Arc::new(ActivityTable::new()))
        .collect();
    for (r, t) in tables.iter().enumerate() {
        let addr = serve_replica(t.clone(), &format!("replica-{r}")).await?;
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("r{r}"), "namespace": "sandgate-system", "labels": {"kubernetes.io/service-name": "ctl"}},
            "addressType": "IPv4", "ports": [{"name": "control", "port": addr.port()}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]});
        api.store
            .create("discovery.k8s.io/endpointslices", "sandgate-system", slice)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let dir = tempfile::tempdir()?;
    let client = client_for(&api.write_kubeconfig(dir.path())?).await;
    let contract = Contract::default();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let pods: Vec<kube::runtime::reflector::Store<Pod>> =
        sandgate_controller::pod_stores(&client, &["default".into()], &contract);
    for s in &pods {
        s.wait_until_ready().await?;
    }
    let limiter = Arc::new(tick::RateLimiter::new(100_000));
    let writer = Arc::new(AnnotationWriter::default());
    tokio::spawn(writer.clone().run(
        client.clone(),
        contract.ann_last_active.clone(),
        limiter.clone(),
        16,
        metrics.clone(),
    ));
    let ctx = tick::Context {
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "bench".into(),
                instance: None,
            },
        ),
        slices: kube::Api::namespaced(client.clone(), "sandgate-system"),
        client,
        pods,
        contract,
        default_timeout: idle::IdleTimeout::After(Duration::from_secs(3600)),
        refresh: Some(REFRESH),
        service: "ctl".into(),
        port_name: "control".into(),
        poller: tokio::sync::Mutex::new(Poller::new(
            TEST_TOKEN,
            Duration::from_secs(5),
            Duration::from_secs(30),
        )?),
        metrics: metrics.clone(),
        write_concurrency: 16,
        limiter,
        writer: writer.clone(),
        seen: Default::default(),
    };
    let mut durations = Vec::new();
    let mut writes_at = Vec::new();
    let mut every = tokio::time::interval(INTERVAL);
    for n in 0..TICKS {
        every.tick().await;
        for i in 0..BUSY {
            tables[rand::random_range(0..REPLICAS)].touch(key(i * (SANDBOXES / BUSY)));
        }
        let t = Instant::now();
        let report = tick::tick(&ctx).await;
        let took = t.elapsed();
        anyhow::ensure!(
            report.outcome == "ok" && report.released.is_empty(),
            "unexpected tick: {report:?}"
        );
        writes_at.push(metrics.annotation_writes.get());
        println!(
            "tick {:>2}: {:>6.1} ms, {:>4} writes queued, {} written so far",
            n + 1,
            took.as_secs_f64() * 1e3,
            report.annotated,
            metrics.annotation_writes.get()
        );
        durations.push(took.as_secs_f64() * 1e3);
    }
    // Skip the first two ticks (full reports, first writes); the rest are steady state.
    let steady = &durations[2..];
    let mut sorted = steady.to_vec();
    sorted.sort_by(f64::total_cmp);
    let writes = (writes_at[TICKS - 1] - writes_at[1]) as f64 / (TICKS - 2) as f64;
    Ok((sorted[sorted.len() / 2], sorted[sorted.len() - 1], writes))
}

async fn getlastactive_bench() -> anyhow::Result<(f64, usize, f64, usize)> {
    const N: usize = 100_000;
    println!("\n== GetLastActive with {N} tracked sandboxes");
    let table = Arc::new(ActivityTable::new());
    for i in 0..N {
        table.touch(key(i));
    }
    let addr = serve_replica(table.clone(), "big").await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = ControlClient::new(channel).max_decoding_message_size(256 << 20);
    let call = |cursor: u64| {
        let mut req = tonic::Request::new(GetLastActiveRequest {
            cursor,
            boot_id: "big-boot".into(),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {TEST_TOKEN}").parse().expect("header"),
        );
        req
    };
    let mut full = Vec::new();
    let mut cursor = 0;
    let mut full_bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let resp = client.get_last_active(call(0)).await?.into_inner();
        full.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            resp.full && resp.sandboxes.len() == N,
            "full report has {} entries",
            resp.sandboxes.len()
        );
        full_bytes = resp.encoded_len();
        cursor = resp.cursor;
    }
    let mut delta = Vec::new();
    let mut delta_bytes = 0;
    for round in 0..5 {
        for i in 0..N / 100 {
            table.touch(key((i * 100 + round) % N));
        }
        let t = Instant::now();
        let resp = client.get_last_active(call(cursor)).await?.into_inner();
        delta.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            !resp.full && resp.sandboxes.len() == N / 100,
            "delta has {} entries",
            resp.sandboxes.len()
        );
        delta_bytes = resp.encoded_len();
        cursor = resp.cursor;
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, d) = (med(full), med(delta));
    println!(
        "full: {f:.1} ms, {full_bytes} bytes; delta (1% changed): {d:.2} ms, {delta_bytes} bytes"
    );
    Ok((f, full_bytes, d, delta_bytes))
}
