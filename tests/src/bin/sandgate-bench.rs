//! `make bench`: the data-plane benchmark.
//!
//! 1. Three Envoy variants side by side, same Envoy binary and settings, load from wrk on loopback:
//!    direct (no ext_proc, ORIGINAL_DST from a static header), null (a do-nothing ext_proc answering
//!    a fixed destination) and sandgate (sandgate-extproc, 10 000 indexed sandboxes, requests spread
//!    over 1 000 of them). Rounds are interleaved and the median taken, so drift hits all alike.
//! 2. An in-process microbenchmark of one decision with 100 000 indexed sandboxes.
//! 3. Heap bytes per indexed sandbox, counted by a wrapping allocator.
//!
//! The last line is `RESULT dataplane ...`.
#![allow(unsafe_code)] // only the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
    processing_response::Response as Resp,
    CommonResponse, HeadersResponse, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use futures::{future::BoxFuture, Stream, StreamExt};
use sandgate_extproc::grpc::Router;
use sandgate_extproc::index::{PodRoute, RouteIndex, RouteState, SandboxKey};
use sandgate_extproc::resolver::{LookupError, PodLookup, Resolver};
use sandgate_tests::apidouble::ApiDouble;
use sandgate_tests::envoy::{direct, envoy_bin, render, without_fast_path, EnvoyPorts};
use sandgate_tests::procs::{eventually, free_port, get, wait_for_tcp, Extproc};
use serde_json::json;
use tokio::process::Command;

/// Counts live heap bytes.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser)]
struct Args {
    /// Internal: serve only the null processor on this port (the bench runs it as its own process,
    /// like sandgate-extproc, so both processors stand on equal terms).
    #[arg(long, hide = true)]
    null_server: Option<u16>,
    /// Seconds per measured wrk run.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Interleaved rounds per variant (median taken).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Indexed sandboxes behind Envoy, and how many of them the load hits.
    #[arg(long, default_value_t = 10_000)]
    sandboxes: usize,
    #[arg(long, default_value_t = 1_000)]
    hot: usize,
    /// Only measure Envoy's memory per hot route.
    #[arg(long, hide = true)]
    memory_only: bool,
    /// Hot routes installed in Envoy for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    routes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.null_server {
        let dest = std::env::var("NULL_DEST")?;
        tonic::transport::Server::builder()
            .add_service(ExternalProcessorServer::new(NullProcessor(Arc::new(
                null_reply(dest),
            ))))
            .serve(([127, 0, 0, 1], port).into())
            .await?;
        return Ok(());
    }
    if args.memory_only {
        envoy_bytes_per_route(&args).await?;
        return Ok(());
    }
    println!("== decision microbenchmark (100 000 indexed sandboxes, in process)");
    let (p50_us, p99_us) = decision_bench(100_000, 300_000).await;
    println!("decision: p50 {p50_us:.2} µs, p99 {p99_us:.2} µs (parse + index read + decide + encode reply)");
    let bytes = bytes_per_sandbox(100_000);
    println!("memory: {bytes:.0} heap bytes per indexed sandbox (100 000 entries)");

    println!(
        "\n== Envoy variants (Envoy --concurrency 1, wrk -t1 -c{} -d{}s, {} rounds interleaved)",
        args.connections, args.seconds, args.rounds
    );
    let runs = envoy_bench(&args).await?;
    println!(
        "\nmedians over {} rounds:\n\n| variant | req/s | p50 ms | p99 ms |\n|---|---|---|---|",
        args.rounds
    );
    for (name, rs) in ["direct", "null", "sandgate", "fast"].iter().zip(&runs) {
        let r = median(rs.clone());
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} |",
            r.rps, r.p50_ms, r.p99_ms
        );
    }
    // Ratios are paired per round (the variants run back to back), then the median is taken.
    let (direct, null, sandgate, fast) = (&runs[0], &runs[1], &runs[2], &runs[3]);
    let ratio = |a: &[Run], b: &[Run], f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rps_vs_null = ratio(sandgate, null, |r| r.rps);
    let p99_vs_null = ratio(sandgate, null, |r| r.p99_ms);
    let rps_vs_direct = ratio(sandgate, direct, |r| r.rps);
    let rps_fast = ratio(fast, direct, |r| r.rps);
    let p99_fast = ratio(fast, direct, |r| r.p99_ms);
    println!(
        "\npaired per-round ratios (median): sandgate/null rps {rps_vs_null:.3}, p99 {p99_vs_null:.3}; sandgate/direct rps {rps_vs_direct:.3}; null/direct rps {:.3}; fast/direct rps {rps_fast:.3}, p99 {p99_fast:.3}",
        ratio(null, direct, |r| r.rps)
    );
    println!(
        "\n== Envoy memory per hot route ({} hot hosts pushed by sandgate-extproc)",
        args.routes
    );
    let per_route = envoy_bytes_per_route(&args).await?;
    println!(
        "RESULT dataplane rps_vs_null={rps_vs_null:.3} p99_vs_null={p99_vs_null:.3} rps_vs_direct={rps_vs_direct:.3} rps_fast_vs_direct={rps_fast:.3} p99_fast_vs_direct={p99_fast:.3} envoy_bytes_per_route={per_route:.0} decision_p99_us={p99_us:.2} bytes_per_sandbox={bytes:.0}"
    );
    Ok(())
}

struct NoApi;
impl PodLookup for NoApi {
    fn lookup(&self, _: SandboxKey) -> BoxFuture<'static, Result<Option<PodRoute>, LookupError>> {
        Box::pin(async { Ok(None) })
    }
}

fn route(i: usize) -> PodRoute {
    PodRoute {
        ip: Some(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into()),
        default_port: Some(8080),
        h2c: Default::default(),
        state: RouteState::Running,
        pod: i as u64,
        scope: 0,
    }
}

fn filled_index(n: usize) -> RouteIndex {
    let index = RouteIndex::new();
    for i in 0..n {
        index.apply(
            SandboxKey::new(&format!("sbx-{i:08x}")).expect("id"),
            route(i),
        );
    }
    index.len();
    index
}

async fn decision_bench(n: usize, iters: usize) -> (f64, f64) {
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = sandgate_extproc::metrics::Metrics::new(&mut reg);
    let index = Arc::new(filled_index(n));
    let resolver = Arc::new(Resolver::new(
        index.clone(),
        Arc::new(NoApi),
        Duration::from_secs(1),
        Duration::from_secs(1),
        metrics.clone(),
    ));
    let activity = Arc::new(sandgate_extproc::activity::ActivityTable::new());
    let addresses = sandgate_shared::AddressConfig::new(["sandbox.example.com"]).expect("domain");
    // The fast path as it runs: each routed host is offered, made hot by the sync task, and
    // later offers of it cost one lock-free lookup.
    let (_running, shutdown) = sandgate_extproc::shutdown::channel();
    let fast = sandgate_extproc::fastpath::FastPath::new(
        sandgate_extproc::fastpath::FastPathConfig {
            enabled: true,
            template: sandgate_extproc::fastpath::RouteTemplate {
                route_config: "sandboxes".into(),
                cluster: "sandbox_pods_fast".into(),
                cluster_h2: "sandbox_pods_fast_h2".into(),
                header: "x-sandgate-destination".into(),
                ext_proc_cluster: "sandbox_pods".into(),
                ext_proc_cluster_h2: "sandbox_pods_h2".into(),
                response_timeout: Duration::from_secs(300),
            },
            max_routes: 10_000,
            ttl: Duration::from_secs(1),
            batch: Duration::from_millis(50),
            activity_interval: Duration::from_secs(3600),
            envoy_admin: ([127, 0, 0, 1], 1).into(),
            envd_port: Some(49983),
        },
        addresses.clone(),
        None,
        index,
        activity.clone(),
        sandgate_extproc::metrics::FastPathMetrics::new(&mut reg),
        shutdown,
    );
    let router = Router {
        addresses,
        resolver,
        default_port: None,
        metrics,
        streams: Arc::new(sandgate_extproc::streams::StreamTable::new(
            activity.clone(),
            std::time::Duration::from_secs(120),
        )),
        activity,
        max_streams_per_sandbox: 1000,
        envd_port: Some(49983),
        fast: Some(fast.clone()),
    };
    // Prebuilt requests, as Envoy would send them.
    let requests: Vec<HttpHeaders> = (0..4096)
        .map(|k| {
            let i = (k * 7919) % n;
            let h = |k: &str, v: String| HeaderValue {
                key: k.into(),
                raw_value: v.into_bytes(),
                ..Default::default()
            };
            HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![
                        h(
                            ":authority",
                            format!("49983-sbx-{i:08x}.sandbox.example.com"),
                        ),
                        h(":path", "/api/v1/run".into()),
                        h(":method", "GET".into()),
                        h("user-agent", "e2b-sdk".into()),
                        h("accept", "*/*".into()),
                    ],
                }),
                ..Default::default()
            }
        })
        .collect();
    // One pass offers every host; the sync task's round (run here, not in the background, so
    // that nothing else allocates or runs meanwhile) makes them hot.
    for req in &requests {
        router.on_request_headers(req).await;
    }
    fast.sync_once();
    let mut samples = Vec::with_capacity(iters);
    for k in 0..iters {
        let req = &requests[k % requests.len()];
        let t = Instant::now();
        let reply = router.on_request_headers(req).await;
        samples.push(t.elapsed());
        assert!(reply.dynamic_metadata.is_some(), "decision did not route");
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (pct(0.50), pct(0.99))
}

fn bytes_per_sandbox(n: usize) -> f64 {
    let before = LIVE.load(Ordering::SeqCst);
    let index = filled_index(n);
    let after = LIVE.load(Ordering::SeqCst);
    assert_eq!(index.len(), n as u64);
    (after - before) as f64 / n as f64
}

#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The do-nothing processor: one fixed destination, built once.
#[derive(Clone)]
struct NullProcessor(Arc<ProcessingResponse>);

#[tonic::async_trait]
impl ExternalProcessor for NullProcessor {
    type ProcessStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<ProcessingResponse, tonic::Status>> + Send>>;
    async fn process(
        &self,
        req: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
        let reply = self.0.clone();
        let s = req
            .into_inner()
            .take_while(|m| futures::future::ready(m.is_ok()))
            .map(move |_| Ok((*reply).clone()));
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

fn null_reply(dest: String) -> ProcessingResponse {
    let lb = Struct {
        fields: [(
            "x-sandbox-destination".to_string(),
            Value {
                kind: Some(Kind::StringValue(dest)),
            },
        )]
        .into(),
    };
    ProcessingResponse {
        dynamic_metadata: Some(Struct {
            fields: [(
                "envoy.lb".to_string(),
                Value {
                    kind: Some(Kind::StructValue(lb)),
                },
            )]
            .into(),
        }),
        response: Some(Resp::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse::default()),
        })),
        ..Default::default()
    }
}

struct Variant {
    name: &'static str,
    config: String,
    listen_port: u16,
}

async fn envoy_bench(args: &Args) -> anyhow::Result<Vec<Vec<Run>>> {
    let dir = tempfile::tempdir()?;
    // Upstream: one minimal HTTP server every variant routes to.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_port = upstream.local_addr()?.port();
    tokio::spawn(serve_ok(upstream));

    // null: the do-nothing processor, in its own process like sandgate-extproc.
    let null_port = free_port();
    let _null = Command::new(std::env::current_exe()?)
        .args(["--null-server", &null_port.to_string()])
        .env("NULL_DEST", format!("127.0.0.1:{up_port}"))
        .kill_on_drop(true)
        .spawn()?;
    wait_for_tcp(("127.0.0.1", null_port), Duration::from_secs(10)).await?;

    // sandgate: the API double with N running sandboxes, and the real extproc.
    let api = ApiDouble::start().await?;
    api.running_sandboxes(args.sandboxes, json!({}))?;
    let kubeconfig = api.write_kubeconfig(dir.path())?;
    // sandgate: the ext_proc path only; fast: the same binary with hot routes held in Envoy.
    let sg_port = free_port();
    let extproc = Extproc::spawn(
        dir.path(),
        &kubeconfig,
        sg_port,
        &["--domain", "sandbox.localhost", "--fast-path=false"],
    )?;
    let fast_port = free_port();
    let fast_admin = free_port();
    let fast_admin_flag = format!("127.0.0.1:{fast_admin}");
    let fast = Extproc::spawn(
        dir.path(),
        &kubeconfig,
        fast_port,
        &[
            "--domain",
            "sandbox.localhost",
            "--envoy-admin",
            &fast_admin_flag,
        ],
    )?;
    extproc.wait_ready(Duration::from_secs(30)).await;
    fast.wait_ready(Duration::from_secs(30)).await;

    let mk = |name, extproc_port: u16, admin_port: u16, shape: fn(&str) -> String| {
        let ports = EnvoyPorts {
            listen_addr: "127.0.0.1".into(),
            listen_port: free_port(),
            extproc_port,
            admin_port,
            access_log_flush: "30s".into(),
            upstream_headers_timeout: "300s".into(),
            advertise_admin: true,
        };
        Variant {
            name,
            config: shape(&render(&ports)),
            listen_port: ports.listen_port,
        }
    };
    let variants = [
        mk("direct", 1, free_port(), direct),
        mk("null", null_port, free_port(), without_fast_path),
        mk("sandgate", sg_port, free_port(), without_fast_path),
        mk("fast", fast_port, fast_admin, str::to_string),
    ];

    let script = dir.path().join("spread.lua");
    std::fs::write(
        &script,
        format!(
            "local i = 0\nrequest = function()\n  i = (i + 7919) % {hot}\n  return wrk.format(\"GET\", \"/\", {{[\"Host\"] = \"{up_port}-sbx-\" .. i .. \".sandbox.localhost\", [\"x-envoy-original-dst-host\"] = \"127.0.0.1:{up_port}\"}})\nend\n",
            hot = args.hot
        ),
    )?;

    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds {
        for (vi, v) in variants.iter().enumerate() {
            let cfg = dir.path().join(format!("{}.yaml", v.name));
            std::fs::write(&cfg, &v.config)?;
            let mut envoy = Command::new(envoy_bin())
                .arg("-c")
                .arg(&cfg)
                .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"])
                .kill_on_drop(true)
                .spawn()?;
            wait_for_tcp(("127.0.0.1", v.listen_port), Duration::from_secs(20)).await?;
            let addr = ([127, 0, 0, 1], v.listen_port).into();
            let host = format!("{up_port}-sbx-1.sandbox.localhost");
            let dst = format!("127.0.0.1:{up_port}");
            eventually(Duration::from_secs(10), || async {
                match get(addr, &host, "/", &[("x-envoy-original-dst-host", &dst)]).await {
                    Ok(r) if r.status == 200 => Ok(()),
                    other => Err(format!("{} not routing: {other:?}", v.name)),
                }
            })
            .await;
            wrk(args, v.listen_port, &script, 2).await?; // warm-up
            if v.name == "fast" {
                // Every hot host installed and valid in this Envoy, as it is in steady state.
                until_hot(&fast, args.hot).await;
                wrk(args, v.listen_port, &script, 1).await?;
            }
            let via_ext_proc =
                metric(&fast, "sandgate_extproc_requests_total{outcome=\"routed\"}").await;
            let run = wrk(args, v.listen_port, &script, args.seconds).await?;
            if v.name == "fast" {
                let through = metric(&fast, "sandgate_extproc_requests_total{outcome=\"routed\"}")
                    .await
                    - via_ext_proc;
                println!(
                    "         fast: {through:.0} of {:.0} requests went through ext_proc",
                    run.rps * args.seconds as f64
                );
            }
            println!(
                "round {} {:>8}: {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms",
                round + 1,
                v.name,
                run.rps,
                run.p50_ms,
                run.p99_ms
            );
            runs[vi].push(run);
            let _ = envoy.kill().await;
        }
    }
    drop(extproc);
    drop(fast);
    Ok(runs)
}

/// Envoy's RSS growth per hot route: a fresh Envoy and extproc, one host made hot (the
/// baseline), then `args.routes` more, each by one request through ext_proc; measured once every
/// push is acknowledged and RSS has settled.
async fn envoy_bytes_per_route(args: &Args) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_port = upstream.local_addr()?.port();
    tokio::spawn(serve_ok(upstream));
    let api = ApiDouble::start().await?;
    api.running_sandboxes(args.routes + 2, json!({}))?;
    let kubeconfig = api.write_kubeconfig(dir.path())?;
    let (port, admin) = (free_port(), free_port());
    let max = (args.routes * 2).to_string();
    let admin_flag = format!("127.0.0.1:{admin}");
    let extproc = Extproc::spawn(
        dir.path(),
        &kubeconfig,
        port,
        &[
            "--domain",
            "sandbox.localhost",
            "--envoy-admin",
            &admin_flag,
            "--fast-path-max-routes",
            &max,
        ],
    )?;
    extproc.wait_ready(Duration::from_secs(30)).await;
    let ports = EnvoyPorts {
        listen_addr: "127.0.0.1".into(),
        listen_port: free_port(),
        extproc_port: port,
        admin_port: admin,
        access_log_flush: "30s".into(),
        upstream_headers_timeout: "300s".into(),
        advertise_admin: true,
    };
    let cfg = dir.path().join("memory.yaml");
    std::fs::write(&cfg, render(&ports))?;
    let envoy = Command::new(envoy_bin())
        .arg("-c")
        .arg(&cfg)
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"])
        .kill_on_drop(true)
        .spawn()?;
    let pid = envoy.id().ok_or_else(|| anyhow::anyhow!("envoy exited"))?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], ports.listen_port).into();
    wait_for_tcp(addr, Duration::from_secs(20)).await?;
    let host = move |i: usize| format!("{up_port}-sbx-{i}.sandbox.localhost");
    eventually(Duration::from_secs(10), || async {
        match get(addr, &host(0), "/", &[]).await {
            Ok(r) if r.status == 200 => Ok(()),
            other => Err(format!("not routing: {other:?}")),
        }
    })
    .await;
    until_hot(&extproc, 1).await;
    for _ in 0..200 {
        get(addr, &host(0), "/", &[]).await?;
    }
    let admin_addr: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    let heap = || async move {
        get(admin_addr, "localhost", "/memory", &[])
            .await
            .map(|r| r.json())
            .unwrap_or_default()
    };
    let before = settled_rss(pid).await?;
    let heap_before = heap().await;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let n = args.routes;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i > n {
                        return anyhow::Ok(());
                    }
                    let r = get(addr, &host(i), "/", &[]).await?;
                    anyhow::ensure!(r.status == 200, "{}: {}", host(i), r.status);
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    until_hot(&extproc, args.routes + 1).await;
    // How long Envoy takes to apply one update to a full table (each rebuilds all of it).
    let (sum0, n0) = acks(&extproc).await;
    let extra = host(args.routes + 1);
    get(addr, &extra, "/", &[]).await?;
    let (sum1, n1) = eventually(Duration::from_secs(30), || async {
        let (sum, n) = acks(&extproc).await;
        let pushes = metric(&extproc, "sandgate_extproc_fast_path_pushes_total").await;
        if n > n0 && n == pushes {
            Ok((sum, n))
        } else {
            Err(format!("{n} of {pushes} updates acknowledged"))
        }
    })
    .await;
    println!(
        "one update to a table of {} routes acknowledged in {:.0} ms",
        args.routes + 1,
        (sum1 - sum0) / (n1 - n0).max(1.0) * 1000.0
    );
    let after = settled_rss(pid).await?;
    let heap_after = heap().await;
    let added = (args.routes + 1) as f64;
    let field = |v: &serde_json::Value, k: &str| {
        v[k].as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    println!(
        "envoy heap in use: {:.0} bytes per route (allocator's heap {:.0}, unmapped {:.0})",
        (field(&heap_after, "allocated") - field(&heap_before, "allocated")) / added,
        (field(&heap_after, "heap_size") - field(&heap_before, "heap_size")) / added,
        (field(&heap_after, "pageheap_unmapped") - field(&heap_before, "pageheap_unmapped"))
            / added,
    );
    println!(
        "envoy RSS {} KB with 1 hot route, {} KB with {}: {:.0} bytes per route",
        before / 1024,
        after / 1024,
        args.routes + 2,
        (after as f64 - before as f64) / added
    );
    Ok((after as f64 - before as f64) / added)
}

/// Envoy's resident memory once it stops falling (freed pages go back to the system gradually):
/// the lowest reading over 3 s with no new low in the last second.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let read = || -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
        Ok(kb * 1024)
    };
    let start = Instant::now();
    let mut low = read()?;
    let mut low_at = Instant::now();
    while start.elapsed() < Duration::from_secs(3) || low_at.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read()?;
        if now < low {
            low = now;
            low_at = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    Ok(low)
}

/// The sum and count of an extproc's update acknowledgement times.
async fn acks(p: &Extproc) -> (f64, f64) {
    (
        metric(p, "sandgate_extproc_fast_path_ack_duration_seconds_sum").await,
        metric(p, "sandgate_extproc_fast_path_ack_duration_seconds_count").await,
    )
}

/// A metric's value from an extproc's /metrics (0 when absent).
async fn metric(p: &Extproc, name: &str) -> f64 {
    let text = p
        .admin_get("/metrics")
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `n` hot hosts are in the table, every push is acknowledged and Envoy holds them
/// as valid.
async fn until_hot(p: &Extproc, n: usize) {
    eventually(Duration::from_secs(60), || async {
        let routes = metric(p, "sandgate_extproc_fast_path_routes").await;
        let valid = metric(p, "sandgate_extproc_fast_path_valid_streams").await;
        let pushes = metric(p, "sandgate_extproc_fast_path_pushes_total").await;
        let acks = metric(p, "sandgate_extproc_fast_path_ack_duration_seconds_count").await;
        if routes >= n as f64 && valid >= 1.0 && pushes == acks {
            Ok(())
        } else {
            Err(format!(
                "routes {routes} of {n}, valid {valid}, pushes {pushes}, acks {acks}"
            ))
        }
    })
    .await
}

fn median(mut rs: Vec<Run>) -> Run {
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Run {
        rps: mid(&mut rs.iter().map(|r| r.rps).collect()),
        p50_ms: mid(&mut rs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: mid(&mut rs.iter_mut().map(|r| r.p99_ms).collect()),
    }
}

async fn wrk(args: &Args, port: u16, script: &std::path::Path, secs: u64) -> anyhow::Result<Run> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{}", args.connections),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        !text.contains("Non-2xx"),
        "wrk saw non-2xx responses:\n{text}"
    );
    anyhow::ensure!(
        !text.contains("Socket errors"),
        "wrk saw socket errors:\n{text}"
    );
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
    };
    let rps: f64 = field("Requests/sec:")
        .ok_or_else(|| anyhow::anyhow!("no Requests/sec in:\n{text}"))?
        .parse()?;
    let ms = |p: &str| {
        field(p)
            .and_then(|v| parse_wrk_time(&v))
            .ok_or_else(|| anyhow::anyhow!("no {p} in:\n{text}"))
    };
    Ok(Run {
        rps,
        p50_ms: ms("50%")?,
        p99_ms: ms("99%")?,
    })
}

fn parse_wrk_time(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|n| n * mult)
}

async fn serve_ok(listener: tokio::net::TcpListener) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
