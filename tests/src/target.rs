//! Where a scenario runs.
//!
//! By default every test starts its own API double in-process. With `SANDGATE_TEST_KUBECONFIG`
//! set, the same scenarios run against that API server instead: a real cluster, or a standalone
//! double (`sandgate-apidouble`). Either way each test works in a namespace of its own, and the
//! binaries and the scenarios reach the API only through the kubeconfig.
//!
//! Against a real cluster:
//! - install the CRDs first (`kubectl apply -f deploy/crds/`);
//! - pods run `SANDGATE_TEST_ECHO_IMAGE` (the Dockerfile's `echo` target), and Envoy, running on
//!   the test machine, must reach pod IPs (run the tests in the cluster, or use kind on Linux);
//! - scenarios that stage races through the double's test hooks are skipped, and say so.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::apidouble::ApiDouble;
use crate::stack::client_for;

/// Names an external API server's kubeconfig.
pub const KUBECONFIG_ENV: &str = "SANDGATE_TEST_KUBECONFIG";
/// The sandbox image pods run on an external cluster.
pub const IMAGE_ENV: &str = "SANDGATE_TEST_ECHO_IMAGE";
/// Labels every namespace a test creates, so leftovers can be found:
/// `kubectl delete ns -l sandgate.dev/test`.
pub const TEST_LABEL: &str = "sandgate.dev/test";

/// The API server a test talks to, and its namespace there.
pub struct Target {
    double: Option<ApiDouble>,
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    pub namespace: String,
}

impl Target {
    /// Connects to `SANDGATE_TEST_KUBECONFIG`'s server, or starts a double, and creates this test's
    /// namespace.
    pub async fn start(dir: &Path) -> Target {
        let (double, kubeconfig) = match std::env::var_os(KUBECONFIG_ENV) {
            Some(path) => (None, PathBuf::from(path)),
            None => {
                let api = ApiDouble::start().await.expect("api double");
                let kubeconfig = api.write_kubeconfig(dir).expect("kubeconfig");
                (Some(api), kubeconfig)
            }
        };
        let client = client_for(&kubeconfig).await;
        let namespace = format!("sgt-{}", crate::apidouble::random_suffix());
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {TEST_LABEL: "true"}},
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        Target {
            double,
            kubeconfig,
            client,
            namespace,
        }
    }

    /// The in-process double, for scenarios that stage races through its hooks. `None` when the
    /// tests run against an external API server.
    pub fn double(&self) -> Option<&ApiDouble> {
        self.double.as_ref()
    }

    /// Prints what the API double holds and the last requests it served (for a failing test).
    pub fn dump(&self) {
        let Some(api) = self.double() else {
            return;
        };
        let all = crate::apidouble::selector::Selector::default();
        for resource in [
            "sandgate.dev/sandboxpools",
            "sandgate.dev/sandboxclaims",
            "pods",
        ] {
            eprintln!("----- API double: {resource} -----");
            for o in api.store.list(resource, None, &all).0 {
                let m = &o["metadata"];
                eprintln!(
                    "{}/{} rv={} labels={} finalizers={} deleting={} status={}",
                    m["namespace"].as_str().unwrap_or_default(),
                    m["name"].as_str().unwrap_or_default(),
                    m["resourceVersion"],
                    m["labels"],
                    m["finalizers"],
                    m["deletionTimestamp"].is_string(),
                    o["status"],
                );
            }
        }
        // Reads of one object are mostly the test's own polling: leave them out.
        let requests: Vec<String> = api
            .hooks
            .recent_requests()
            .into_iter()
            .filter(|r| !r.contains(" GET ") || r.contains('?'))
            .filter(|r| !r.contains("phase%3Didle"))
            .collect();
        eprintln!("----- API double: last {} requests -----", requests.len());
        for r in &requests[requests.len().saturating_sub(300)..] {
            eprintln!("{r}");
        }
    }

    /// An API for a namespaced resource in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

impl Drop for Target {
    /// On an external server, the test's namespace goes (in the background) with the test.
    fn drop(&mut self) {
        if self.double.is_none() {
            let _ = std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["delete", "namespace", &self.namespace, "--wait=false"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The image pods run: our echo server on an external cluster, a placeholder for the double's
/// kubelet (which runs the echo server in-process whatever the image).
pub fn echo_image() -> String {
    std::env::var(IMAGE_ENV).unwrap_or_else(|_| "sandgate/echo:test".into())
}

/// The echo container for a pod serving `ports`: the image, and its pod name from the downward API
/// so every reply names the pod.
pub fn echo_container(ports: &[u16]) -> serde_json::Value {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    json!({
        "name": "sandbox",
        "image": echo_image(),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "ECHO_PORTS", "value": list.join(",")},
        ],
        "ports": ports.iter().map(|p| json!({"containerPort": p})).collect::<Vec<_>>(),
    })
}
