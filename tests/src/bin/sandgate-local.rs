//! `make run`: a gateway you can curl, with no cluster. Starts the Kubernetes API double and the
//! loopback kubelet, a few demo sandboxes, sandgate-extproc and Envoy (envoy/local.yaml), prints
//! working curl commands, and stops everything on Ctrl-C.

use std::time::Duration;

use clap::Parser;
use kube::api::{Api, PostParams};
use sandgate_tests::apidouble::ApiDouble;
use sandgate_tests::envoy::{envoy_bin, EnvoyPorts};
use sandgate_tests::kubelet::Kubelet;
use sandgate_tests::procs::{bin_path, eventually, get, wait_for_tcp, workspace_root};
use sandgate_tests::stack::{client_for, sandbox_pod};
use tokio::process::Command;

#[derive(Parser)]
struct Args {
    /// Address of the API double (kubectl works against it with .run/kubeconfig).
    #[arg(long, default_value = "127.0.0.1:16443")]
    api_addr: std::net::SocketAddr,
    /// Domain of the sandbox hosts.
    #[arg(long, default_value = "sandbox.localhost")]
    domain: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let args = Args::parse();
    let run_dir = workspace_root().join(".run");
    std::fs::create_dir_all(&run_dir)?;
    let api = ApiDouble::start_on(args.api_addr).await?;
    let kubeconfig = api.write_kubeconfig(&run_dir)?;
    let client = client_for(&kubeconfig).await;
    let _kubelet = Kubelet::start(client.clone(), None, "sandgate-local", 77).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    for (name, id, port) in [
        ("demo-pod-1", "demo-1", 8080),
        ("demo-pod-2", "demo-2", 8080),
        ("demo-pod-3", "demo-3", 3000),
    ] {
        pods.create(
            &PostParams::default(),
            &sandbox_pod(name, Some(id), "running", port),
        )
        .await?;
    }
    pods.create(
        &PostParams::default(),
        &sandbox_pod("demo-pod-4", Some("demo-booting"), "starting", 8080),
    )
    .await?;

    // A sandbox with a short idle timeout, to watch the controller release it.
    let mut idle_pod = sandbox_pod("demo-pod-5", Some("demo-idle"), "running", 8080);
    idle_pod
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("sandgate.dev/idle-timeout".into(), "30s".into());
    pods.create(&PostParams::default(), &idle_pod).await?;

    let local = EnvoyPorts::local();
    let log = std::fs::File::create(run_dir.join("extproc.log"))?;
    let _extproc = Command::new(bin_path("sandgate-extproc"))
        .env("KUBECONFIG", &kubeconfig)
        .args(["--grpc-addr", &format!("127.0.0.1:{}", local.extproc_port)])
        .args(["--admin-addr", "127.0.0.1:9090", "--domain", &args.domain])
        .args(["--control-addr", "127.0.0.1:9002", "--control-token-file"])
        .arg(sandgate_tests::procs::write_token(&run_dir)?)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    // The controller finds the extproc through an EndpointSlice, as in a cluster.
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), "sandgate-system");
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "sandgate-extproc-control-local", "labels": {"kubernetes.io/service-name": "sandgate-extproc-control"}},
                "addressType": "IPv4", "ports": [{"name": "control", "port": 9002}],
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
            }))?,
        )
        .await?;
    let log = std::fs::File::create(run_dir.join("controller.log"))?;
    let _controller = Command::new(bin_path("sandgate-controller"))
        .env("KUBECONFIG", &kubeconfig)
        .args([
            "--namespace",
            "default",
            "--interval",
            "5s",
            "--default-idle-timeout",
            "10m",
        ])
        .args([
            "--admin-addr",
            "127.0.0.1:9091",
            "--sandbox-domain",
            &args.domain,
            "--control-token-file",
        ])
        .arg(run_dir.join("control-token"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let log = std::fs::File::create(run_dir.join("envoy.log"))?;
    let _envoy = Command::new(envoy_bin())
        .arg("-c")
        .arg(workspace_root().join("envoy/local.yaml"))
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "warning",
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    wait_for_tcp(("127.0.0.1", local.listen_port), Duration::from_secs(20)).await?;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], 9090));
    eventually(Duration::from_secs(20), || async {
        match get(admin, "localhost", "/readyz", &[]).await {
            Ok(r) if r.status == 200 => Ok(()),
            other => Err(format!(
                "extproc not ready: {other:?} (see .run/extproc.log)"
            )),
        }
    })
    .await;

    // The pool lifecycle: a warm pool and one claim on it.
    let pools: Api<sandgate_controller::crd::SandboxPool> =
        Api::namespaced(client.clone(), "default");
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
                "metadata": {"name": "agents", "namespace": "default"},
                "spec": {"replicas": 3, "port": 8080, "defaultIdleTimeout": "30s",
                         "template": {"spec": {"containers": [{"name": "sandbox", "image": "sandgate/echo", "ports": [{"containerPort": 8080}]}]}}},
            }))?,
        )
        .await?;
    let claims: Api<sandgate_controller::crd::SandboxClaim> =
        Api::namespaced(client.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
                "metadata": {"name": "demo-claim", "namespace": "default"}, "spec": {"poolName": "agents"},
            }))?,
        )
        .await?;
    let url = eventually(Duration::from_secs(20), || async {
        let s = claims
            .get("demo-claim")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        s.url
            .ok_or_else(|| "demo-claim not bound yet (see .run/controller.log)".to_string())
    })
    .await;

    let e2b = start_e2b(
        &client,
        &kubeconfig,
        &run_dir,
        &args.domain,
        local.listen_port,
    )
    .await?;
    let d = &args.domain;
    let p = local.listen_port;
    println!(
        "\nsandgate is running: Envoy on 127.0.0.1:{p}, extproc metrics on 127.0.0.1:9090, API double on {}\n\
         \nTry:\n\
         \x20 curl -H 'Host: 8080-demo-1.{d}' localhost:{p}/hello           # host form, port 8080\n\
         \x20 curl -H 'Host: demo-3.{d}' localhost:{p}/                      # host form, the pod's default port\n\
         \x20 curl -H 'x-sandbox-id: demo-2' -H 'x-sandbox-port: 8080' localhost:{p}/   # header form\n\
         \x20 curl localhost:{p}/sandboxes/demo-3/3000/api?x=1                 # path form (prefix stripped)\n\
         \x20 curl -i -H 'Host: 8080-nobody.{d}' localhost:{p}/               # 502 sandbox not found\n\
         \x20 curl -i -H 'Host: 8080-demo-booting.{d}' localhost:{p}/         # 503 not ready\n\
         \x20 curl -s localhost:9090/metrics | grep -E 'fast_path_routes|outcome=\"routed'   # hosts Envoy now routes alone; what ext_proc routed\n\
         \x20 KUBECONFIG=.run/kubeconfig kubectl get pods --show-labels\n\
         \x20 KUBECONFIG=.run/kubeconfig kubectl get pods -w -L sandgate.dev/phase   # demo-pod-5 is released after 30 s idle\n\
         \x20 curl localhost:9091/metrics                                     # the controller's ticks and releases\n\
         \n\
         \nThe pool lifecycle: SandboxPool `agents` keeps 3 warm pods; SandboxClaim `demo-claim` is bound to one:\n\
         \x20 curl -H 'Host: {url}' localhost:{p}/                # the claimed sandbox (pool port 8080)\n\
         \x20 KUBECONFIG=.run/kubeconfig kubectl get sandboxclaims -o custom-columns=NAME:.metadata.name,PHASE:.status.phase,URL:.status.url\n\
         \x20 KUBECONFIG=.run/kubeconfig kubectl get sandboxpools -o custom-columns=NAME:.metadata.name,AVAILABLE:.status.available,CLAIMED:.status.claimed\n\
         \x20 # idle 30 s → the sandbox is released, the claim turns Released, the pool refills to 3\n\
         \x20 KUBECONFIG=.run/kubeconfig kubectl create --validate=false -f - <<< '{{\"apiVersion\":\"sandgate.dev/v1alpha1\",\"kind\":\"SandboxClaim\",\"metadata\":{{\"name\":\"mine\"}},\"spec\":{{\"poolName\":\"agents\"}}}}'\n\
\n\nThe E2B API (sandgate-api on 127.0.0.1:3000, template `base`), for the unmodified E2B SDK:\n\
         {lines}\n\
         \x20 # the same lines are in .run/e2b.env; with the `e2b` package installed:\n\
         \x20 set -a; . .run/e2b.env; set +a; python3 - <<'EOF'\n\
         from e2b import Sandbox\n\
         import urllib.request\n\
         sbx = Sandbox.create(template=\"base\")\n\
         req = urllib.request.Request(\"http://127.0.0.1:{p}/\", headers={{\"Host\": sbx.get_host(8080)}})\n\
         print(urllib.request.urlopen(req).read().decode())\n\
         print(sbx.commands.run(\"echo hi from $(hostname)\").stdout); sbx.kill()\n\
         EOF\n\
         \x20 # `base` pods run the real sandgate-envd, here on this machine and as you: commands.run runs here\n\
\nLogs in .run/. Ctrl-C stops everything.",
        api.addr,
        lines = e2b.lines.iter().map(|l| format!("  export {l}")).collect::<Vec<_>>().join("\n"),
    );
    sandgate_tests::procs::ctrl_c().await;
    println!("stopping");
    drop(e2b);
    Ok(())
}

/// sandgate-api on 127.0.0.1:3000 with a pool `base` (pods serving 8080 and sandgate-envd on 49983) and a
/// fresh API key; writes `.run/e2b.env`.
struct LocalE2b {
    lines: Vec<String>,
    _api: tokio::process::Child,
}

async fn start_e2b(
    client: &kube::Client,
    kubeconfig: &std::path::Path,
    run_dir: &std::path::Path,
    domain: &str,
    gateway_port: u16,
) -> anyhow::Result<LocalE2b> {
    let pools: Api<sandgate_controller::crd::SandboxPool> =
        Api::namespaced(client.clone(), "default");
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
                "metadata": {"name": "base", "namespace": "default",
                             "annotations": {sandgate_api::envd::ANN_ENVD: "sandgate"}},
                "spec": {"replicas": 2, "port": 8080, "defaultIdleTimeout": "10m",
                         "template": {"spec": {"containers": [{"name": "sandbox", "image": "sandgate-envd",
                             "ports": [{"containerPort": 8080}, {"containerPort": 49983}]}]}}},
            }))?,
        )
        .await?;
    let key = sandgate_api::keys::generate();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "e2b-key-local", "labels": {sandgate_api::keys::SECRET_LABEL: "true"}},
                "stringData": {"team": "local", "sha256": sandgate_api::keys::hash(&key)},
            }))?,
        )
        .await?;
    let log = std::fs::File::create(run_dir.join("api.log"))?;
    let api = Command::new(bin_path("sandgate-api"))
        .env("KUBECONFIG", kubeconfig)
        .args(["--namespace", "default", "--sandbox-domain", domain])
        .args([
            "--listen-addr",
            "127.0.0.1:3000",
            "--admin-addr",
            "127.0.0.1:9093",
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], 9093));
    eventually(Duration::from_secs(20), || async {
        match get(admin, "localhost", "/readyz", &[]).await {
            Ok(r) if r.status == 200 => Ok(()),
            other => Err(format!(
                "sandgate-api not ready: {other:?} (see .run/api.log)"
            )),
        }
    })
    .await;
    let lines = vec![
        "E2B_API_URL=http://127.0.0.1:3000".to_string(),
        format!("E2B_API_KEY={key}"),
        format!("E2B_DOMAIN={domain}"),
        format!("E2B_SANDBOX_URL=http://127.0.0.1:{gateway_port}"),
    ];
    std::fs::write(run_dir.join("e2b.env"), lines.join("\n") + "\n")?;
    Ok(LocalE2b { lines, _api: api })
}
