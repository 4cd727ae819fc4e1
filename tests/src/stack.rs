//! A whole data plane on loopback: the API (the double, or a cluster: see [`crate::target`]),
//! sandgate-extproc and a real Envoy.
//!
//! Scenarios talk to the cluster only through `kube::Client` and a kubeconfig, as they would to a
//! real cluster; only the double itself is test code.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::envoy::{Envoy, EnvoyPorts};
use crate::procs::{eventually, free_port, get, Extproc, Reply};
use crate::target::Target;

/// The domain the test stacks route.
pub const DOMAIN: &str = "sandbox.localhost";

pub struct Stack {
    pub target: Target,
    pub dir: tempfile::TempDir,
    pub extproc: Extproc,
    pub envoy: Envoy,
}

impl Stack {
    /// Starts everything and waits until the extproc is ready.
    pub async fn start() -> Stack {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extproc_flags: &[&str]) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = Target::start(dir.path()).await;
        let (extproc, envoy) = start_gateway(
            dir.path(),
            &target,
            free_port(),
            extproc_flags,
            TEST_ACCESS_LOG_FLUSH,
        )
        .await;
        Stack {
            target,
            dir,
            extproc,
            envoy,
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        self.target.api()
    }

    /// Creates a claimed sandbox pod and waits until the kubelet runs it.
    pub async fn sandbox(&self, pod_name: &str, id: &str, port: u16) -> Pod {
        self.create_pod(pod_name, Some(id), "running", port).await
    }

    pub async fn create_pod(
        &self,
        pod_name: &str,
        id: Option<&str>,
        phase: &str,
        port: u16,
    ) -> Pod {
        create_pod(&self.pods(), pod_name, id, phase, port).await
    }

    /// Merge-patches a pod's contract labels.
    pub async fn set_labels(&self, pod_name: &str, labels: serde_json::Value) {
        let patch = json!({"metadata": {"labels": labels}});
        self.pods()
            .patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch pod");
    }

    pub async fn delete(&self, pod_name: &str) {
        self.pods()
            .delete(pod_name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }

    /// GET through Envoy.
    pub async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        get(self.envoy.addr(), host, path, headers)
            .await
            .expect("request through envoy")
    }

    /// Waits until requests to `host` get `status`.
    pub async fn until_status(&self, host: &str, status: u16, within: Duration) -> Reply {
        eventually(within, || async {
            let r = get(self.envoy.addr(), host, "/", &[])
                .await
                .map_err(|e| e.to_string())?;
            if r.status == status {
                Ok(r)
            } else {
                Err(format!("{host}: got {} {}", r.status, r.body))
            }
        })
        .await
    }

    pub fn envoy_addr(&self) -> SocketAddr {
        self.envoy.addr()
    }

    /// Kills the extproc and starts a new one on the same ports, flags as at the start plus
    /// `extra`. Does not wait for it to be ready.
    pub async fn respawn_extproc(&mut self, extra: &[&str]) {
        self.extproc.kill().await;
        self.extproc = spawn_extproc(
            self.dir.path(),
            &self.target,
            self.extproc.grpc_port,
            self.envoy.ports.admin_port,
            extra,
        )
        .await;
    }

    /// Requests ext_proc has routed so far.
    pub async fn routed_by_ext_proc(&self) -> f64 {
        self.extproc
            .metric("sandgate_extproc_requests_total{outcome=\"routed\"}")
            .await
    }

    /// Waits until `host` is routed by Envoy alone: its virtual host is in Envoy's route table
    /// and a request to it reaches a pod without ext_proc routing it.
    pub async fn until_hot(&self, host: &str, within: Duration) {
        until_hot(&self.extproc, &self.envoy, host, within).await
    }
}

/// Waits until `host` is routed by `envoy` alone: its virtual host is in Envoy's route table and a
/// request to it reaches a pod without `extproc` routing it.
pub async fn until_hot(extproc: &Extproc, envoy: &Envoy, host: &str, within: Duration) {
    let routed = || extproc.metric("sandgate_extproc_requests_total{outcome=\"routed\"}");
    eventually(within, || async {
        let before = routed().await;
        let r = get(envoy.addr(), host, "/", &[])
            .await
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("{host}: {} {}", r.status, r.body));
        }
        let held = envoy.hot_hosts().await;
        let after = routed().await;
        if held.iter().any(|h| h == host) && after == before {
            Ok(())
        } else {
            Err(format!(
                "{host} not hot: envoy holds {held:?}, ext_proc routed {before} then {after}"
            ))
        }
    })
    .await
}

/// How often the test Envoys report open streams (the shipped config says 30 s).
pub const TEST_ACCESS_LOG_FLUSH: &str = "1s";

/// Whether test gateways run with the fast path (hot routes held in Envoy): on unless
/// `SANDGATE_TEST_FAST_PATH=off`. CI runs the data-plane and idle scenarios both ways.
pub fn fast_path() -> bool {
    std::env::var("SANDGATE_TEST_FAST_PATH").map_or(true, |v| v != "off")
}

/// Starts sandgate-extproc against `target` (ext_proc gRPC on `grpc_port`, `--domain` DOMAIN,
/// watching the target's namespace, plus `extra` flags) and an Envoy in front of it (open streams
/// reported every `access_log_flush`), and waits until the extproc is ready.
pub async fn start_gateway(
    dir: &std::path::Path,
    target: &Target,
    grpc_port: u16,
    extra: &[&str],
    access_log_flush: &str,
) -> (Extproc, Envoy) {
    let envoy_admin = free_port();
    let extproc = spawn_extproc(dir, target, grpc_port, envoy_admin, extra).await;
    let ports = EnvoyPorts {
        listen_addr: "127.0.0.1".into(),
        listen_port: free_port(),
        extproc_port: grpc_port,
        admin_port: envoy_admin,
        access_log_flush: access_log_flush.into(),
        upstream_headers_timeout: "3s".into(),
        advertise_admin: true,
    };
    let envoy = Envoy::start(dir, ports).await.expect("envoy");
    extproc.wait_ready(Duration::from_secs(40)).await;
    (extproc, envoy)
}

/// Starts sandgate-extproc as a test gateway runs it (`--domain` DOMAIN, the target's namespace,
/// its Envoy's admin port, the fast path as [`fast_path`] says, plus `extra`). Does not wait.
pub async fn spawn_extproc(
    dir: &std::path::Path,
    target: &Target,
    grpc_port: u16,
    envoy_admin: u16,
    extra: &[&str],
) -> Extproc {
    let envoy_admin_flag = format!("127.0.0.1:{envoy_admin}");
    let mut flags = vec![
        // As the test Envoys' per-try timeout (`upstream_headers_timeout`).
        "--fast-path-response-timeout=3s",
        "--domain",
        DOMAIN,
        "--namespace",
        &target.namespace,
        "--envoy-admin",
        &envoy_admin_flag,
    ];
    // Tests about the fast path itself name it in `extra`.
    if !fast_path() && !extra.iter().any(|f| f.starts_with("--fast-path")) {
        flags.push("--fast-path=false");
    }
    flags.extend_from_slice(extra);
    let kubeconfig = target.kubeconfig_for(dir, "sandgate-extproc").await;
    Extproc::spawn(dir, &kubeconfig, grpc_port, &flags).expect("spawn extproc")
}

/// Creates a contract pod and waits until the kubelet runs it.
pub async fn create_pod(
    pods: &Api<Pod>,
    pod_name: &str,
    id: Option<&str>,
    phase: &str,
    port: u16,
) -> Pod {
    // The sandbox ID is added once the pod runs, as a claim does: a gateway then never sees the
    // sandbox before it is Ready (a pod created with its ID would answer 503 "not ready" until
    // the gateway's watch caught up with the kubelet).
    pods.create(
        &PostParams::default(),
        &sandbox_pod(pod_name, None, phase, port),
    )
    .await
    .expect("create pod");
    let pod = eventually(Duration::from_secs(10), || async {
        let p = pods.get(pod_name).await.map_err(|e| e.to_string())?;
        match p.status.as_ref().and_then(|s| s.pod_ip.as_ref()) {
            Some(_) => Ok(p),
            None => Err(format!("{pod_name} has no IP yet")),
        }
    })
    .await;
    let Some(id) = id else { return pod };
    let patch = json!({"metadata": {"labels": {"sandgate.dev/sandbox-id": id}}});
    pods.patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label the pod with its sandbox ID")
}

/// A kube client from a kubeconfig file, as the binaries build theirs.
pub async fn client_for(kubeconfig: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

/// A pool pod in the contract's shape, serving `port` (its namespace is the API's it is created
/// through).
pub fn sandbox_pod(name: &str, id: Option<&str>, phase: &str, port: u16) -> Pod {
    let mut labels = json!({"sandgate.dev/pool": "demo", "sandgate.dev/phase": phase});
    if let Some(id) = id {
        labels["sandgate.dev/sandbox-id"] = json!(id);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"sandgate.dev/port": port.to_string()}},
        "spec": {"containers": [crate::target::echo_container(&[port])]},
    }))
    .expect("pod fixture")
}
