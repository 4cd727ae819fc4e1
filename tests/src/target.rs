//! Where a scenario runs.
//!
//! By default every test starts its own API double in-process. With `SANDGATE_TEST_KUBECONFIG`
//! set, the same scenarios run against that API server instead, of the kind
//! `SANDGATE_TEST_TARGET` names:
//! - `realapi`: a kube-apiserver + etcd with no controller-manager, scheduler or kubelet
//!   (`tests/controlplane/`). The harness fills the gaps: the loopback kubelet runs the pods,
//!   and a finished test's namespace is finalized by hand (no namespace controller runs).
//! - `double`: a standalone API double (`sandgate-apidouble`), with the loopback kubelet.
//! - `cluster`: a real cluster; its kubelets run the pods (`SANDGATE_TEST_ECHO_IMAGE`, the
//!   Dockerfile's `echo` target), and Envoy on the test machine must reach pod IPs.
//!
//! Each test works in a namespace of its own. On `realapi` and `cluster` the binaries run with
//! tokens of their own ServiceAccounts, bound to the roles in `deploy/rbac.yaml`, never as admin,
//! so a verb missing there fails a scenario. Scenarios that stage races through the double's
//! hooks are named `*_on_double` and run only on a double.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::apidouble::ApiDouble;
use crate::kubelet::Kubelet;
use crate::stack::client_for;

/// Names an external API server's kubeconfig.
pub const KUBECONFIG_ENV: &str = "SANDGATE_TEST_KUBECONFIG";
/// What kind of server `SANDGATE_TEST_KUBECONFIG` points at: `realapi`, `double` or `cluster`.
pub const TARGET_ENV: &str = "SANDGATE_TEST_TARGET";
/// The sandbox image pods run on an external cluster.
pub const IMAGE_ENV: &str = "SANDGATE_TEST_ECHO_IMAGE";
/// Labels every namespace a test creates, so leftovers can be found:
/// `kubectl delete ns -l sandgate.dev/test`.
pub const TEST_LABEL: &str = "sandgate.dev/test";

/// The kind of API server a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The API double, in this process or standalone.
    Double,
    /// kube-apiserver + etcd and nothing else.
    RealApi,
    /// A whole cluster.
    Cluster,
}

impl Kind {
    /// The kind this test process runs against.
    pub fn current() -> Kind {
        match std::env::var(TARGET_ENV).as_deref() {
            Ok("realapi") => Kind::RealApi,
            Ok("cluster") => Kind::Cluster,
            _ if std::env::var_os(KUBECONFIG_ENV).is_none() => Kind::Double,
            Ok("double") => Kind::Double,
            other => panic!("{TARGET_ENV} must be realapi, double or cluster (got {other:?})"),
        }
    }
    /// Whether the binaries run as their own ServiceAccounts (a real authorizer is there).
    pub fn has_rbac(self) -> bool {
        self != Kind::Double
    }
}

/// The API server a test talks to, and its namespace there.
pub struct Target {
    double: Option<ApiDouble>,
    kubelet: Option<Kubelet>,
    pub kind: Kind,
    /// The harness's own (admin) credential.
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    pub namespace: String,
}

impl Target {
    /// Connects to `SANDGATE_TEST_KUBECONFIG`'s server, or starts a double; creates this test's
    /// namespace and, unless a cluster's kubelets are there, starts the loopback kubelet for it.
    pub async fn start(dir: &Path) -> Target {
        let kind = Kind::current();
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
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": namespace, "labels": {TEST_LABEL: "true"}}}),
        )
        .await;
        // A cluster's ServiceAccount controller makes `default`; without one, pods need it made.
        create(
            &Api::<ServiceAccount>::namespaced(client.clone(), &namespace),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        )
        .await;
        let kubelet = match kind {
            Kind::Cluster => None,
            Kind::Double | Kind::RealApi => Some(
                Kubelet::start(
                    client.clone(),
                    Some(&namespace),
                    &format!("{namespace}-node"),
                    rand::random_range(10..250),
                )
                .await
                .expect("start the loopback kubelet"),
            ),
        };
        Target {
            double,
            kubelet,
            kind,
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

    /// A kubeconfig for `component` (`sandgate-extproc`, `sandgate-controller`): where a real
    /// authorizer runs, a token of the component's own ServiceAccount in this namespace, bound to
    /// its roles from `deploy/rbac.yaml`; on the double, the harness's own.
    pub async fn kubeconfig_for(&self, dir: &Path, component: &str) -> PathBuf {
        if !self.kind.has_rbac() {
            return self.kubeconfig.clone();
        }
        let token = self.service_account_token(component).await;
        let path = dir.join(format!("kubeconfig-{component}"));
        std::fs::write(&path, token_kubeconfig(&self.kubeconfig, &token)).expect("kubeconfig");
        path
    }

    /// Creates `name`'s ServiceAccount here, binds it as deploy/rbac.yaml binds it (cluster roles
    /// through a RoleBinding in this namespace, namespaced roles copied here), and returns a
    /// token for it from the TokenRequest API.
    pub async fn service_account_token(&self, name: &str) -> String {
        let ns = &self.namespace;
        create(
            &Api::<ServiceAccount>::namespaced(self.client.clone(), ns),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
        )
        .await;
        let subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}]);
        for doc in rbac_documents() {
            if doc["metadata"]["name"] != name {
                continue;
            }
            let role_ref = match doc["kind"].as_str() {
                Some("ClusterRole") => json!({"apiGroup": "rbac.authorization.k8s.io",
                                              "kind": "ClusterRole", "name": name}),
                Some("Role") => {
                    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                      "metadata": {"name": name}, "rules": doc["rules"]});
                    create(&Api::<Role>::namespaced(self.client.clone(), ns), role).await;
                    json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name})
                }
                _ => continue,
            };
            let kind = role_ref["kind"].as_str().unwrap_or_default().to_lowercase();
            let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                 "metadata": {"name": format!("{name}-{kind}")},
                                 "roleRef": role_ref, "subjects": subject});
            create(
                &Api::<RoleBinding>::namespaced(self.client.clone(), ns),
                binding,
            )
            .await;
        }
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"expirationSeconds": 7200}});
        let req = http::Request::post(format!(
            "/api/v1/namespaces/{ns}/serviceaccounts/{name}/token"
        ))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&request).expect("json"))
        .expect("request");
        let answer: Value = self
            .client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {name}: {e}"));
        answer["status"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("TokenRequest for {name} returned no token: {answer}"))
            .to_string()
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
    /// On an external server, the test's namespace goes with the test. Without a namespace
    /// controller (`realapi`) nothing would ever finish deleting it, so the harness removes its
    /// finalizer itself, and the loopback kubelet's Node too.
    fn drop(&mut self) {
        self.kubelet.take();
        if self.double.is_some() {
            return;
        }
        let (kind, kubeconfig, ns) = (self.kind, self.kubeconfig.clone(), self.namespace.clone());
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let client = client_for(&kubeconfig).await;
                let namespaces: Api<Namespace> = Api::all(client.clone());
                let _ = namespaces.delete(&ns, &Default::default()).await;
                if kind == Kind::RealApi {
                    let finalize = json!({"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": ns}, "spec": {"finalizers": []}});
                    let req = http::Request::put(format!("/api/v1/namespaces/{ns}/finalize"))
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(serde_json::to_vec(&finalize).expect("json"))
                        .expect("request");
                    let _ = client.request_text(req).await;
                    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
                    let _ = nodes
                        .delete(&format!("{ns}-node"), &Default::default())
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Creates an object, accepting one that already exists.
async fn create<K>(api: &Api<K>, object: Value)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let what = format!("{} {}", object["kind"], object["metadata"]["name"]);
    let object: K = serde_json::from_value(object).expect("object");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create {what}: {e}"),
    }
}

/// The documents of deploy/rbac.yaml.
pub fn rbac_documents() -> Vec<Value> {
    let path = crate::procs::workspace_root().join("deploy/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/rbac.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).expect("yaml")))
        .filter_map(Result::ok)
        .filter(|d| !d.is_null())
        .collect()
}

/// `admin`'s kubeconfig with its user's credential replaced by `token`.
pub fn token_kubeconfig(admin: &Path, token: &str) -> String {
    let text = std::fs::read_to_string(admin).expect("read kubeconfig");
    let mut kc: Value = serde_yaml::from_str(&text).expect("kubeconfig yaml");
    for user in kc["users"].as_array_mut().into_iter().flatten() {
        user["user"] = json!({ "token": token });
    }
    serde_yaml::to_string(&kc).expect("kubeconfig")
}

/// The image pods run: our echo server on an external cluster, a placeholder for the loopback
/// kubelet (which serves the echo server itself whatever the image).
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
