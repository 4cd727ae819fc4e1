//! What only a real API server can prove (run by `tests/scenarios.sh` against kube-apiserver, or a
//! cluster; every test here is named `*_on_real_api` and skipped on the double):
//! - least privilege, by the real authorizer: each ServiceAccount, bound as deploy/rbac.yaml binds
//!   it, may make every call its binary makes and is refused calls it must never make;
//! - the CRD schemas: the server refuses what they forbid with its own 422;
//! - kubectl shows the CRDs' printer columns.

use std::path::Path;

use kube::api::Api;
use sandgate_controller::crd::{SandboxClaim, SandboxPool};
use sandgate_tests::stack::client_for;
use sandgate_tests::target::{echo_container, Kind, Target};
use serde_json::{json, Value};

/// One request and whether the authorizer must allow it.
struct Call {
    method: &'static str,
    /// Relative to the test namespace: `pods`, `pods/x`, … or absolute when it starts with `/`.
    path: &'static str,
    body: Option<Value>,
    allowed: bool,
}

const fn allow(method: &'static str, path: &'static str) -> Call {
    Call {
        method,
        path,
        body: None,
        allowed: true,
    }
}
const fn deny(method: &'static str, path: &'static str) -> Call {
    Call {
        method,
        path,
        body: None,
        allowed: false,
    }
}

fn url(ns: &str, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    let (group, rest) = match path.split_once(':') {
        Some((g, r)) => (format!("/apis/{g}"), r),
        None => ("/api/v1".to_string(), path),
    };
    format!("{group}/namespaces/{ns}/{rest}")
}

/// Sends `call` as `client`; returns the HTTP status.
async fn status(client: &kube::Client, ns: &str, call: &Call) -> u16 {
    let body = call
        .body
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let content_type = if call.method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let req = http::Request::builder()
        .method(call.method)
        .uri(url(ns, call.path))
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body.into_bytes())
        .expect("request");
    match client.request_text(req).await {
        Ok(_) => 200,
        Err(kube::Error::Api(e)) => e.code,
        Err(e) => panic!("{} {}: {e}", call.method, call.path),
    }
}

async fn client_as(t: &Target, dir: &Path, component: &str) -> kube::Client {
    client_for(&t.kubeconfig_for(dir, component).await).await
}

fn report(name: &str, value: usize) {
    if let Some(dir) = std::env::var_os("SANDGATE_TEST_REPORT") {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).expect("report dir");
        std::fs::write(dir.join(name), value.to_string()).expect("report");
    }
}

#[tokio::test]
async fn each_service_account_is_refused_what_it_must_not_do_on_real_api() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    assert!(
        t.kind != Kind::Double,
        "needs a real authorizer: run tests/scenarios.sh"
    );
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
                     "spec": {"containers": [echo_container(&[8080])]}});
    let label = json!({"metadata": {"labels": {"x": "y"}}});
    let extproc = [
        // What the binary does (deploy/rbac.yaml grants it).
        allow("GET", "pods?labelSelector=sandgate.dev%2Fphase"),
        allow("GET", "pods?watch=true&timeoutSeconds=1"),
        // What it must never do: a data plane that can write pods or read Secrets could be
        // turned against the sandboxes it routes to.
        deny("GET", "pods/probe"),
        Call {
            body: Some(label.clone()),
            ..deny("PATCH", "pods/probe")
        },
        Call {
            body: Some(pod.clone()),
            ..deny("POST", "pods")
        },
        deny("DELETE", "pods/probe"),
        Call {
            body: Some(json!({})),
            ..deny("POST", "pods/probe/exec?command=true")
        },
        deny("GET", "secrets"),
        deny("GET", "secrets/sandgate-control-token"),
        deny("GET", "configmaps"),
        deny("GET", "sandgate.dev/v1alpha1:sandboxclaims"),
        deny("GET", "sandgate.dev/v1alpha1:sandboxpools"),
        deny("GET", "discovery.k8s.io/v1:endpointslices"),
        deny("GET", "/api/v1/nodes"),
    ];
    let controller = [
        allow("GET", "pods"),
        allow("GET", "pods/probe"),
        Call {
            body: Some(label.clone()),
            ..allow("PATCH", "pods/probe")
        },
        allow("GET", "sandgate.dev/v1alpha1:sandboxpools"),
        allow("GET", "sandgate.dev/v1alpha1:sandboxclaims"),
        allow("GET", "discovery.k8s.io/v1:endpointslices"),
        // Secrets, other kinds and cluster-wide objects are none of its business; pools and
        // claims are the user's to create, replace and delete.
        deny("GET", "secrets"),
        deny("GET", "secrets/sandgate-control-token"),
        deny("GET", "configmaps"),
        Call {
            body: Some(pod.clone()),
            ..deny("PUT", "pods/probe")
        },
        Call {
            body: Some(json!({})),
            ..deny("POST", "pods/probe/exec?command=true")
        },
        deny("GET", "pods/probe/log"),
        Call {
            body: Some(
                json!({"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
                              "metadata": {"name": "p"}, "spec": {}}),
            ),
            ..deny("POST", "sandgate.dev/v1alpha1:sandboxpools")
        },
        deny("DELETE", "sandgate.dev/v1alpha1:sandboxpools/p"),
        Call {
            body: Some(
                json!({"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
                              "metadata": {"name": "c"}, "spec": {"poolName": "p"}}),
            ),
            ..deny("POST", "sandgate.dev/v1alpha1:sandboxclaims")
        },
        deny(
            "DELETE",
            "coordination.k8s.io/v1:leases/sandgate-controller",
        ),
        deny("GET", "/api/v1/nodes"),
        deny("GET", "/api/v1/namespaces"),
        Call {
            body: Some(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                              "metadata": {"name": "escalate"},
                              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                              "subjects": [{"kind": "ServiceAccount", "name": "sandgate-controller", "namespace": t.namespace}]}),
            ),
            ..deny("POST", "rbac.authorization.k8s.io/v1:rolebindings")
        },
    ];
    // A pod for the calls to act on.
    let admin = t.client.clone();
    let _ = status(
        &admin,
        &t.namespace,
        &Call {
            body: Some(pod.clone()),
            ..allow("POST", "pods")
        },
    )
    .await;
    let mut denials = 0;
    for (component, calls) in [
        ("sandgate-extproc", &extproc[..]),
        ("sandgate-controller", &controller[..]),
    ] {
        let client = client_as(&t, dir.path(), component).await;
        for call in calls {
            let got = status(&client, &t.namespace, call).await;
            if call.allowed {
                assert_ne!(
                    got, 403,
                    "{component} was refused {} {}, which it needs",
                    call.method, call.path
                );
            } else {
                assert_eq!(
                    got, 403,
                    "{component} must be refused {} {}",
                    call.method, call.path
                );
                denials += 1;
            }
        }
    }
    report("rbac_denials", denials);
}

#[tokio::test]
async fn the_server_refuses_what_the_crd_schemas_forbid_on_real_api() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    assert!(t.kind != Kind::Double, "needs a real API server");
    let pools: Api<SandboxPool> = t.api();
    let claims: Api<SandboxClaim> = t.api();
    let create = |api_version: &str, kind: &str, name: &str, spec: Value| {
        let body = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec});
        let plural = if kind == "SandboxPool" {
            "sandboxpools"
        } else {
            "sandboxclaims"
        };
        let req = http::Request::post(format!(
            "/apis/sandgate.dev/v1alpha1/namespaces/{}/{plural}",
            t.namespace
        ))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.to_string().into_bytes())
        .unwrap();
        let client = t.client.clone();
        async move { client.request_text(req).await }
    };
    let av = "sandgate.dev/v1alpha1";
    let template = json!({"spec": {"containers": [echo_container(&[8080])]}});
    for (kind, spec, why) in [
        ("SandboxPool", json!({"replicas": 1}), "no template"),
        (
            "SandboxPool",
            json!({"replicas": "three", "template": template}),
            "replicas is not an integer",
        ),
        (
            "SandboxPool",
            json!({"replicas": 1, "port": "http", "template": template}),
            "port is not an integer",
        ),
        ("SandboxClaim", json!({}), "no poolName"),
        (
            "SandboxClaim",
            json!({"poolName": "p", "labels": ["a"]}),
            "labels is not a map",
        ),
    ] {
        match create(av, kind, "bad", spec.clone()).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{kind} with {why}: {e:?}");
                assert_eq!(e.reason, "Invalid", "{kind} with {why}: {e:?}");
            }
            other => panic!("{kind} with {why} ({spec}) was not refused: {other:?}"),
        }
    }
    // What the schema allows is accepted, so the refusals above are the schema's doing.
    create(
        av,
        "SandboxPool",
        "good",
        json!({"replicas": 0, "template": template}),
    )
    .await
    .expect("a valid pool");
    create(av, "SandboxClaim", "good", json!({"poolName": "good"}))
        .await
        .expect("a valid claim");
    assert!(pools.get("good").await.is_ok() && claims.get("good").await.is_ok());
}

#[tokio::test]
async fn kubectl_shows_the_printer_columns_on_real_api() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    assert!(t.kind != Kind::Double, "needs a real API server");
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&t.kubeconfig)
            .args(["-n", &t.namespace])
            .args(args)
            .output()
            .expect(
                "kubectl (tests/controlplane/build.sh builds it; scenarios.sh puts it on PATH)",
            );
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pool = json!({"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
                      "metadata": {"name": "cols"},
                      "spec": {"replicas": 0, "template": {"spec": {"containers": [echo_container(&[8080])]}}}});
    let file = dir.path().join("pool.json");
    std::fs::write(&file, pool.to_string()).unwrap();
    kubectl(&["create", "-f", file.to_str().unwrap()]);
    let pools = kubectl(&["get", "sandboxpools"]);
    let header: Vec<&str> = pools
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "REPLICAS", "AVAILABLE", "CLAIMED", "READY", "AGE"],
        "{pools}"
    );
    let claim = json!({"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
                       "metadata": {"name": "cols"}, "spec": {"poolName": "cols"}});
    std::fs::write(&file, claim.to_string()).unwrap();
    kubectl(&["create", "-f", file.to_str().unwrap()]);
    let claims = kubectl(&["get", "sandboxclaims"]);
    let header: Vec<&str> = claims
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "POOL", "PHASE", "SANDBOX", "AGE"],
        "{claims}"
    );
    assert!(
        claims
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("cols ")),
        "{claims}"
    );
    let wide = kubectl(&["get", "sandboxclaims", "-o", "wide"]);
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "POOL", "PHASE", "SANDBOX", "URL", "EXPIRES", "AGE"],
        "{wide}"
    );
}
