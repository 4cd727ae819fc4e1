//! Envoy configs: rendering the bootstrap template and running a real Envoy.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::procs::{wait_for_tcp, workspace_root};

/// Values substituted into `envoy/bootstrap.yaml.in`.
#[derive(Debug, Clone)]
pub struct EnvoyPorts {
    pub listen_addr: String,
    pub listen_port: u16,
    pub extproc_port: u16,
    pub admin_port: u16,
    /// Envoy's `access_log_flush_interval`: how often open streams are reported.
    pub access_log_flush: String,
    /// How long a sandbox may take to start its response (the route's per-try timeout).
    pub upstream_headers_timeout: String,
    /// Whether the node metadata names Envoy's admin address for sandgate-extproc (the shipped
    /// configs do); without it the extproc falls back to its `--envoy-admin`.
    pub advertise_admin: bool,
}

impl EnvoyPorts {
    /// The production sidecar layout.
    pub fn production() -> Self {
        EnvoyPorts {
            listen_addr: "0.0.0.0".into(),
            listen_port: 8080,
            extproc_port: 9001,
            admin_port: 9901,
            access_log_flush: "30s".into(),
            upstream_headers_timeout: "300s".into(),
            advertise_admin: true,
        }
    }
    /// `make run`: everything on loopback.
    pub fn local() -> Self {
        EnvoyPorts {
            listen_addr: "127.0.0.1".into(),
            listen_port: 10000,
            extproc_port: 9001,
            admin_port: 9901,
            access_log_flush: "30s".into(),
            upstream_headers_timeout: "300s".into(),
            advertise_admin: true,
        }
    }
}

pub fn template() -> String {
    std::fs::read_to_string(workspace_root().join("envoy/bootstrap.yaml.in"))
        .expect("envoy/bootstrap.yaml.in")
}

pub fn render(p: &EnvoyPorts) -> String {
    let mut t = template();
    if !p.advertise_admin {
        let line = t
            .lines()
            .find(|l| l.contains("sandgate.envoy_admin"))
            .expect("the bootstrap advertises its admin address")
            .to_string();
        t = t.replace(&format!("{line}\n"), "");
    }
    t.replace("{{LISTEN_ADDR}}", &p.listen_addr)
        .replace("{{LISTEN_PORT}}", &p.listen_port.to_string())
        .replace("{{EXTPROC_PORT}}", &p.extproc_port.to_string())
        .replace("{{ADMIN_PORT}}", &p.admin_port.to_string())
        .replace("{{ACCESS_LOG_FLUSH_INTERVAL}}", &p.access_log_flush)
        .replace("{{UPSTREAM_HEADERS_TIMEOUT}}", &p.upstream_headers_timeout)
}

/// The committed configs and what they must equal.
pub fn committed() -> [(PathBuf, String); 3] {
    let root = workspace_root();
    [
        (
            root.join("envoy/production.yaml"),
            render(&EnvoyPorts::production()),
        ),
        (root.join("envoy/local.yaml"), render(&EnvoyPorts::local())),
        // What the kustomize base mounts into the gateway pods.
        (
            root.join("deploy/envoy.yaml"),
            render(&EnvoyPorts::production()),
        ),
    ]
}

/// The Envoy binary: `$ENVOY_BIN`, else the one `make` installs under `.tools/`.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return p.into();
    }
    let p = workspace_root().join(".tools/envoy/envoy/_bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}: run `make envoy` (or set ENVOY_BIN)",
        p.display()
    );
    p
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    pub ports: EnvoyPorts,
    child: Child,
}

impl Envoy {
    /// Starts Envoy with `config` written to `dir`, and waits until its listener accepts.
    pub async fn start(dir: &Path, ports: EnvoyPorts) -> anyhow::Result<Envoy> {
        let cfg = dir.join(format!("envoy-{}.yaml", ports.listen_port));
        std::fs::write(&cfg, render(&ports))?;
        let log = std::fs::File::create(dir.join(format!("envoy-{}.log", ports.listen_port)))?;
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        wait_for_tcp(
            ("127.0.0.1", ports.listen_port),
            std::time::Duration::from_secs(20),
        )
        .await?;
        Ok(Envoy { ports, child })
    }

    /// Sends a signal by name (`STOP` freezes it with its connections open, `CONT` resumes it).
    pub fn signal(&self, name: &str) {
        crate::procs::signal(&self.child, name);
    }

    /// SIGTERM (what the kubelet sends after the preStop hook), then wait for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        Ok(tokio::time::timeout(std::time::Duration::from_secs(20), self.child.wait()).await??)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.ports.listen_port).into()
    }

    /// One call to Envoy's admin API.
    pub async fn admin(&self, method: &str, path: &str) -> anyhow::Result<crate::procs::Reply> {
        crate::procs::request(
            ([127, 0, 0, 1], self.ports.admin_port).into(),
            method,
            path,
            &[],
            None,
        )
        .await
    }

    /// The hosts Envoy routes by itself: the virtual hosts sandgate-extproc sent it (named
    /// `sandboxes/<host>`), from its config dump.
    pub async fn hot_hosts(&self) -> Vec<String> {
        let Ok(r) = self
            .admin("GET", "/config_dump?resource=static_route_configs")
            .await
        else {
            return Vec::new();
        };
        let dump = r.json();
        let mut hosts = Vec::new();
        for c in dump["configs"].as_array().into_iter().flatten() {
            for vh in c["route_config"]["virtual_hosts"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if vh["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sandboxes/"))
                {
                    collect_map_keys(&vh["matcher"], &mut hosts);
                }
            }
        }
        hosts.sort();
        hosts
    }

    /// Whether Envoy currently holds sandgate's validity flag for its hot routes.
    pub async fn hot_routes_valid(&self) -> bool {
        self.admin("GET", "/runtime")
            .await
            .is_ok_and(|r| r.json()["entries"]["sandgate.fast_path.valid"]["final_value"] == "100")
    }
}

/// Runs `envoy --mode validate` on a config file.
pub fn validate(config: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(envoy_bin())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "error",
            "-c",
        ])
        .arg(config)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "envoy --mode validate {} failed:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The same config without the fast path: no ADS stream, no VHDS, no validity flag, no fast
/// cluster, ext_proc on for every route. Envoy with only the ext_proc path (the benchmark's null and ext_proc
/// variants).
pub fn without_fast_path(yaml: &str) -> String {
    let mut cfg: serde_json::Value = serde_yaml::from_str(yaml).expect("envoy yaml");
    let root = cfg.as_object_mut().expect("bootstrap");
    root.remove("dynamic_resources");
    root.remove("layered_runtime");
    let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    let rc = hcm["route_config"].as_object_mut().expect("route_config");
    rc.remove("vhds");
    for vh in rc["virtual_hosts"].as_array_mut().expect("virtual_hosts") {
        vh.as_object_mut()
            .expect("virtual host")
            .remove("typed_per_filter_config");
    }
    let filters = hcm["http_filters"].as_array_mut().expect("http_filters");
    for f in filters {
        f.as_object_mut().expect("filter").remove("disabled");
    }
    cfg["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .retain(|c| {
            !c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("sandbox_pods_fast"))
        });
    serde_yaml::to_string(&cfg).expect("yaml")
}

/// Envoy alone: no ext_proc and no fast path; the ORIGINAL_DST cluster takes the destination from
/// the `x-envoy-original-dst-host` header (the benchmark's direct variant: trusted load only).
pub fn direct(yaml: &str) -> String {
    let mut cfg: serde_json::Value =
        serde_yaml::from_str(&without_fast_path(yaml)).expect("envoy yaml");
    let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    hcm["http_filters"]
        .as_array_mut()
        .expect("http_filters")
        .retain(|f| f["name"] != "envoy.filters.http.ext_proc");
    hcm["upgrade_configs"] = serde_json::json!([{"upgrade_type": "websocket"}]);
    for c in cfg["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters")
    {
        if c["name"] == "sandbox_pods" {
            c["original_dst_lb_config"] = serde_json::json!({"use_http_header": true});
        }
    }
    serde_yaml::to_string(&cfg).expect("yaml")
}

/// The keys of every `exact_match_map` in a matcher tree (a shard's hot hosts).
fn collect_map_keys(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                if k == "exact_match_map" {
                    if let Some(map) = v["map"].as_object() {
                        out.extend(map.keys().cloned());
                    }
                } else {
                    collect_map_keys(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_map_keys(v, out)),
        _ => {}
    }
}
