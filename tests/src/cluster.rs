//! A control-plane test bed on loopback: the API (the double, or a cluster: see
//! [`crate::target`]), several gateways (each a real Envoy with
//! its own sandgate-extproc, registered in the extproc control Service's EndpointSlices) and
//! sandgate-controller processes.

use std::path::Path;
use std::process::Stdio;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::envoy::Envoy;
use crate::procs::{bin_path, free_port, get, write_token, Extproc, Reply};
use crate::target::Target;

/// The extproc control Service whose EndpointSlices (in the test's namespace) list the replicas.
pub const CONTROL_SERVICE: &str = "sandgate-extproc-control";

/// One Envoy + sandgate-extproc pair.
pub struct Gateway {
    pub extproc: Extproc,
    pub envoy: Envoy,
}

/// A running sandgate-controller, killed on drop.
pub struct Controller {
    pub identity: String,
    pub admin_port: u16,
    child: Child,
}

impl Controller {
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
    pub async fn metrics(&self) -> String {
        get(
            ([127, 0, 0, 1], self.admin_port).into(),
            "localhost",
            "/metrics",
            &[],
        )
        .await
        .map(|r| r.body)
        .unwrap_or_default()
    }
    /// A counter or gauge value from /metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Everything lives in the target's namespace: pods, pools, claims, the replicas' EndpointSlices,
/// the leader Lease and Events.
pub struct Cluster {
    pub target: Target,
    pub dir: tempfile::TempDir,
    /// The controller's credential (its own ServiceAccount's token where RBAC is enforced).
    controller_kubeconfig: std::path::PathBuf,
    pub gateways: Vec<Gateway>,
    pub controllers: Vec<Controller>,
    /// The gateways' Envoy `access_log_flush_interval`.
    access_log_flush: String,
}

impl Cluster {
    /// Starts the double and `gateways` gateways, registered and ready (no controller yet).
    pub async fn start(gateways: usize) -> Cluster {
        Self::start_with_flush(gateways, crate::stack::TEST_ACCESS_LOG_FLUSH).await
    }

    /// As [`Cluster::start`], with Envoys that report open streams every `access_log_flush`
    /// (`"30s"` is the shipped config).
    pub async fn start_with_flush(gateways: usize, access_log_flush: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = Target::start(dir.path()).await;
        let controller_kubeconfig = target
            .kubeconfig_for(dir.path(), "sandgate-controller")
            .await;
        let mut c = Cluster {
            target,
            dir,
            controller_kubeconfig,
            gateways: Vec::new(),
            controllers: Vec::new(),
            access_log_flush: access_log_flush.to_string(),
        };
        for i in 0..gateways {
            let gw = c.start_gateway(free_port()).await;
            c.register_replica(&format!("gw-{i}"), gw.extproc.control_port)
                .await;
            c.gateways.push(gw);
        }
        c
    }

    /// Starts an Envoy + extproc pair with its ext_proc gRPC on `grpc_port`.
    pub async fn start_gateway(&self, grpc_port: u16) -> Gateway {
        let (extproc, envoy) = crate::stack::start_gateway(
            self.dir.path(),
            &self.target,
            grpc_port,
            &[],
            &self.access_log_flush,
        )
        .await;
        Gateway { extproc, envoy }
    }

    /// Lists a control-API address in the extproc control Service's EndpointSlices. A real API
    /// server refuses loopback IPs in IPv4 slices (and one-label names such as `localhost` in
    /// FQDN slices), so there the replica is an FQDN slice naming `127.0.0.1`; the double gets the
    /// IPv4 form a Service's own slices have.
    pub async fn register_replica(&self, name: &str, port: u16) {
        let address_type = match self.target.kind {
            crate::target::Kind::Double => "IPv4",
            _ => "FQDN",
        };
        let address = "127.0.0.1";
        let slice: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": CONTROL_SERVICE}},
            "addressType": address_type,
            "ports": [{"name": "control", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        }))
        .expect("slice");
        self.slices()
            .create(&PostParams::default(), &slice)
            .await
            .expect("create EndpointSlice");
    }

    pub async fn unregister_replica(&self, name: &str) {
        self.slices()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete EndpointSlice");
    }

    fn slices(&self) -> Api<EndpointSlice> {
        self.target.api()
    }

    pub fn pods(&self) -> Api<Pod> {
        self.target.api()
    }

    /// The pods of `pool` in `phase` (the contract's labels); none if the list fails.
    pub async fn pool_pods(&self, pool: &str, phase: &str) -> Vec<Pod> {
        let lp = kube::api::ListParams::default().labels(&format!(
            "sandgate.dev/pool={pool},sandgate.dev/phase={phase}"
        ));
        self.pods()
            .list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// This test's namespace.
    pub fn ns(&self) -> &str {
        &self.target.namespace
    }

    /// Starts a controller with short test timings plus `extra` flags.
    pub fn start_controller(&mut self, identity: &str, extra: &[&str]) {
        let admin_port = free_port();
        let token = write_token(self.dir.path()).expect("token");
        let log = log_file(self.dir.path(), &format!("controller-{identity}.log"));
        let child = Command::new(bin_path("sandgate-controller"))
            .env("KUBECONFIG", &self.controller_kubeconfig)
            .env("RUST_LOG", "info,sandgate_controller=debug")
            // Defaults through the environment, so `extra` flags can override them.
            .env("SANDGATE_INTERVAL", "1s")
            .env("SANDGATE_DEFAULT_IDLE_TIMEOUT", "3s")
            .args(["--namespace", self.ns()])
            .args([
                "--extproc-namespace",
                self.ns(),
                "--extproc-service",
                CONTROL_SERVICE,
            ])
            .args([
                "--lease-namespace",
                self.ns(),
                "--lease-duration",
                "3s",
                "--poll-timeout",
                "1s",
            ])
            .args([
                "--identity",
                identity,
                "--admin-addr",
                &format!("127.0.0.1:{admin_port}"),
            ])
            .arg("--control-token-file")
            .arg(token)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn controller");
        self.controllers.push(Controller {
            identity: identity.into(),
            admin_port,
            child,
        });
    }

    /// Creates a running sandbox pod (serving 8080) and waits until it runs.
    pub async fn sandbox(&self, pod_name: &str, id: &str) -> Pod {
        crate::stack::create_pod(&self.pods(), pod_name, Some(id), "running", 8080).await
    }

    /// GET through gateway `gw`.
    pub async fn get(&self, gw: usize, host: &str) -> Reply {
        get(self.gateways[gw].envoy.addr(), host, "/", &[])
            .await
            .expect("request through envoy")
    }

    /// Asserts every 200 ms, until `until`, that `pod` is still running (`why` says what it
    /// would mean if not).
    pub async fn assert_running_until(&self, pod: &str, until: std::time::Instant, why: &str) {
        while std::time::Instant::now() < until {
            assert_eq!(self.phase(pod).await, "running", "{why}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// The pod's `phase` label.
    pub async fn phase(&self, pod: &str) -> String {
        let p = self.pods().get(pod).await.expect("get pod");
        p.metadata
            .labels
            .unwrap_or_default()
            .get("sandgate.dev/phase")
            .cloned()
            .unwrap_or_default()
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .expect("log file")
}

impl Drop for Cluster {
    /// On a failing test, show the tail of every process log: the temp dir goes away with us.
    fn drop(&mut self) {
        // SANDGATE_TEST_DUMP_LOGS=1 shows them after a passing test too.
        if std::thread::panicking() || std::env::var_os("SANDGATE_TEST_DUMP_LOGS").is_some() {
            for gw in &self.gateways {
                crate::procs::dump_gateway(gw.extproc.admin_port, gw.envoy.ports.admin_port);
            }
            crate::procs::dump_logs(self.dir.path());
            self.target.dump();
        }
    }
}
