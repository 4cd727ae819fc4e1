//! The E2B test bed: a [`Cluster`] (gateway, controller) plus sandgate-api, a pool `base` whose
//! pods serve 8080 and envd's 49983, and two API keys of two teams in Secrets. The pinned E2B SDKs
//! (Python old and new, JS) are installed by `make e2b-sdks` under `.tools/e2b/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use sandgate_controller::crd::SandboxPool;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::cluster::Cluster;
use crate::procs::{bin_path, eventually, free_port, get, workspace_root};
use crate::target::echo_container;

/// The pinned SDKs: the last Python SDK on the v1 create/connect paths, a current one on the v2
/// paths, and the current JS SDK.
pub const PY_OLD: &str = "2.50.0";
pub const PY_NEW: &str = "2.63.0";
pub const JS: &str = "2.51.0";

pub struct E2b {
    pub cluster: Cluster,
    pub api_port: u16,
    pub admin_port: u16,
    /// Team `a`'s key, and team `b`'s.
    pub key: String,
    pub other_key: String,
    _api: Child,
}

impl E2b {
    /// Starts everything with a warm pool of `warm` pods, and waits until the API has its keys.
    pub async fn start(warm: i32, extra_api_flags: &[&str]) -> E2b {
        let mut cluster = Cluster::start(1).await;
        cluster.start_controller(
            "ctrl",
            &[
                "--sandbox-domain",
                crate::stack::DOMAIN,
                "--leader-election",
                "false",
            ],
        );
        let pool: SandboxPool = serde_json::from_value(json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
            "metadata": {"name": "base", "annotations": {"sandgate.dev/e2b-aliases": "code-interpreter-v1"}},
            "spec": {"replicas": warm, "port": 8080, "defaultIdleTimeout": "1h",
                     "template": {"spec": {"containers": [echo_container(&[8080, 49983])]}}},
        }))
        .expect("pool");
        cluster
            .target
            .api::<SandboxPool>()
            .create(&PostParams::default(), &pool)
            .await
            .expect("create pool base");
        let (key, other_key) = (
            sandgate_api::keys::generate(),
            sandgate_api::keys::generate(),
        );
        for (team, k) in [("team-a", &key), ("team-b", &other_key)] {
            let secret: Secret = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("key-{team}"),
                             "labels": {sandgate_api::keys::SECRET_LABEL: "true"}},
                "stringData": {"team": team, "sha256": sandgate_api::keys::hash(k)},
            }))
            .expect("secret");
            cluster
                .target
                .api::<Secret>()
                .create(&PostParams::default(), &secret)
                .await
                .expect("create key Secret");
        }
        let (api_port, admin_port) = (free_port(), free_port());
        let kubeconfig = cluster
            .target
            .kubeconfig_for(cluster.dir.path(), "sandgate-api")
            .await;
        let log = std::fs::File::create(cluster.dir.path().join("api.log")).expect("log");
        let api = Command::new(bin_path("sandgate-api"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,sandgate_api=debug")
            .args(["--namespace", cluster.ns()])
            .args(["--sandbox-domain", crate::stack::DOMAIN])
            .args(["--listen-addr", &format!("127.0.0.1:{api_port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(extra_api_flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sandgate-api");
        let e = E2b {
            cluster,
            api_port,
            admin_port,
            key,
            other_key,
            _api: api,
        };
        eventually(Duration::from_secs(30), || async {
            let m = get(
                ([127, 0, 0, 1], e.admin_port).into(),
                "localhost",
                "/metrics",
                &[],
            )
            .await
            .map_err(|x| x.to_string())?;
            let ready = get(
                ([127, 0, 0, 1], e.admin_port).into(),
                "localhost",
                "/readyz",
                &[],
            )
            .await
            .map_err(|x| x.to_string())?;
            let keys = crate::cluster::metric_value(&m.body, "sandgate_api_api_keys");
            if ready.status == 200 && keys == 2.0 {
                Ok(())
            } else {
                Err(format!("api ready {} keys {keys}", ready.status))
            }
        })
        .await;
        e
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// The environment an SDK run gets.
    pub fn sdk_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("E2B_API_URL", self.api_url()),
            ("E2B_API_KEY", self.key.clone()),
            ("E2B_DOMAIN", crate::stack::DOMAIN.to_string()),
            ("SANDGATE_OTHER_KEY", self.other_key.clone()),
            (
                "SANDGATE_GATEWAY",
                self.cluster.gateways[0].envoy.addr().to_string(),
            ),
        ]
    }

    /// Adds pool `envd`, whose pods run sandgate-envd on 49983 (image `sandgate-envd`, which the
    /// loopback kubelet runs as the real binary) and an echo server on 8080, `warm` of them.
    pub async fn add_envd_pool(&self, warm: i32) {
        let mut container = echo_container(&[8080, 49983]);
        container["image"] = json!("sandgate-envd");
        let pool: SandboxPool = serde_json::from_value(json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
            "metadata": {"name": "envd", "annotations": {sandgate_api::envd::ANN_ENVD: "sandgate"}},
            "spec": {"replicas": warm, "port": 8080, "defaultIdleTimeout": "1h",
                     "template": {"spec": {"containers": [container]}}},
        }))
        .expect("pool");
        self.cluster
            .target
            .api::<SandboxPool>()
            .create(&PostParams::default(), &pool)
            .await
            .expect("create pool envd");
    }

    /// Runs `tests/e2b/<script> <args>` with the Python SDK `version` and `env` beside the
    /// SDK environment; panics with its output unless it passes.
    pub async fn python_script(
        &self,
        version: &str,
        script: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) {
        let python = sdk_dir().join(format!("py-{version}/bin/python"));
        assert!(
            python.exists(),
            "{} missing: run `make e2b-sdks`",
            python.display()
        );
        let out = Command::new(python)
            .arg(workspace_root().join("tests/e2b").join(script))
            .args(args)
            .envs(self.sdk_env())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .await
            .expect("run the Python SDK");
        report(&format!("python e2b {version} {script} {args:?}"), out);
    }

    /// Runs `tests/e2b/scenario.py <scenario>` with the Python SDK `version`; panics with its
    /// output unless it passes.
    pub async fn python(&self, version: &str, scenario: &str) {
        let python = sdk_dir().join(format!("py-{version}/bin/python"));
        assert!(
            python.exists(),
            "{} missing: run `make e2b-sdks`",
            python.display()
        );
        let script = workspace_root().join("tests/e2b/scenario.py");
        let out = Command::new(python)
            .arg(script)
            .arg(scenario)
            .envs(self.sdk_env())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .await
            .expect("run the Python SDK");
        report(&format!("python e2b {version} {scenario}"), out);
    }

    /// Runs `tests/e2b/scenario.mjs` with the JS SDK.
    pub async fn node(&self) {
        let dir = sdk_dir().join(format!("js-{JS}"));
        assert!(
            dir.join("node_modules/e2b").exists(),
            "{} missing: run `make e2b-sdks`",
            dir.display()
        );
        // ES modules resolve packages from the script's own folder: run a copy beside them.
        let script = dir.join("scenario.mjs");
        std::fs::copy(workspace_root().join("tests/e2b/scenario.mjs"), &script)
            .expect("copy scenario.mjs");
        let out = Command::new("node")
            .arg(&script)
            .envs(self.sdk_env())
            .current_dir(&dir)
            .output()
            .await
            .expect("run node");
        report(&format!("js e2b {JS}"), out);
    }
}

/// Where `make e2b-sdks` installs the SDKs.
pub fn sdk_dir() -> PathBuf {
    workspace_root().join(".tools/e2b")
}

fn report(what: &str, out: std::process::Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("----- {what} -----\n{text}");
    assert!(out.status.success(), "{what} failed:\n{text}");
}
