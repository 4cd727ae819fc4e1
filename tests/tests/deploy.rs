//! The manifests in deploy/ are correct the first time: they render, parse into the Kubernetes types
//! with no unknown field, grant exactly the API calls the binaries make, and pass only real flags.

use std::collections::BTreeSet;

use clap::CommandFactory;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn render() -> Vec<Value> {
    let root = sandgate_tests::procs::workspace_root();
    let out = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(root.join("deploy"))
        .output()
        .expect("kubectl on PATH (`make test` builds it: tests/controlplane/build.sh)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docs(&String::from_utf8_lossy(&out.stdout))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

/// Fields of `orig` that the typed round trip dropped (i.e. unknown to the type).
fn lost_fields(orig: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn check<T: DeserializeOwned + Serialize>(doc: &Value) -> Vec<String> {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", doc["metadata"]["name"]));
    let back = serde_json::to_value(typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    lost
}

#[test]
fn every_manifest_parses_into_its_type_with_no_unknown_field() {
    use k8s_openapi::api::{
        apps::v1 as apps, core::v1 as core, networking::v1 as net, policy::v1 as policy,
        rbac::v1 as rbac,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let docs = all_workloads();
    assert!(docs.len() >= 15, "only {} objects rendered", docs.len());
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let lost = match kind {
            "Namespace" => check::<core::Namespace>(d),
            "ServiceAccount" => check::<core::ServiceAccount>(d),
            "Service" => check::<core::Service>(d),
            "ConfigMap" => check::<core::ConfigMap>(d),
            "Deployment" => check::<apps::Deployment>(d),
            "PodDisruptionBudget" => check::<policy::PodDisruptionBudget>(d),
            "NetworkPolicy" => check::<net::NetworkPolicy>(d),
            "ClusterRole" => check::<rbac::ClusterRole>(d),
            "ClusterRoleBinding" => check::<rbac::ClusterRoleBinding>(d),
            "Role" => check::<rbac::Role>(d),
            "RoleBinding" => check::<rbac::RoleBinding>(d),
            "CustomResourceDefinition" => check::<CustomResourceDefinition>(d),
            other => panic!("no type check for kind {other}"),
        };
        assert!(
            lost.is_empty(),
            "{kind} {}: unknown fields {lost:?}",
            d["metadata"]["name"]
        );
    }
}

/// (group, resource, verb) granted to a service account by the rendered RBAC.
fn grants(docs: &[Value], sa: &str) -> BTreeSet<(String, String, String)> {
    let roles: Vec<String> = docs
        .iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ClusterRoleBinding" | "RoleBinding")
            )
        })
        .filter(|d| {
            d["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == sa)
        })
        .map(|d| {
            format!(
                "{}/{}",
                d["roleRef"]["kind"].as_str().unwrap(),
                d["roleRef"]["name"].as_str().unwrap()
            )
        })
        .collect();
    let mut out = BTreeSet::new();
    for d in docs.iter().filter(|d| {
        roles.contains(&format!(
            "{}/{}",
            d["kind"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap_or("")
        ))
    }) {
        for rule in d["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().into_iter().flatten() {
                for r in rule["resources"].as_array().into_iter().flatten() {
                    for v in rule["verbs"].as_array().into_iter().flatten() {
                        out.insert((
                            g.as_str().unwrap().into(),
                            r.as_str().unwrap().into(),
                            v.as_str().unwrap().into(),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn calls(list: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    list.iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect()
}

#[test]
fn rbac_grants_exactly_the_calls_the_binaries_make() {
    let docs = render();
    assert_eq!(
        grants(&docs, "sandgate-extproc"),
        calls(sandgate_extproc::kube::API_CALLS)
    );
    assert_eq!(
        grants(&docs, "sandgate-controller"),
        calls(sandgate_controller::API_CALLS)
    );
    assert_eq!(
        grants(&docs, "sandgate-api"),
        calls(sandgate_api::API_CALLS)
    );
}

/// The rendered base plus the Envoy Gateway example's own workloads.
fn all_workloads() -> Vec<Value> {
    let root = sandgate_tests::procs::workspace_root();
    let example =
        std::fs::read_to_string(root.join("deploy/examples/envoy-gateway/extproc.yaml")).unwrap();
    render().into_iter().chain(docs(&example)).collect()
}

#[test]
fn every_flag_in_the_manifests_exists_in_its_binary() {
    let docs = all_workloads();
    let mut checked = 0;
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            let cmd = match c["command"][0].as_str() {
                Some("/sandgate-extproc") => sandgate_extproc::Config::command(),
                Some("/sandgate-controller") => sandgate_controller::Config::command(),
                _ => continue,
            };
            let longs: BTreeSet<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
            let args: Vec<String> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            for a in &args {
                let flag = a.trim_start_matches("--").split('=').next().unwrap();
                assert!(
                    longs.contains(flag),
                    "{}: --{flag} is not a flag of {}",
                    d["metadata"]["name"],
                    cmd.get_name()
                );
                checked += 1;
            }
            // And the whole argument list parses.
            let argv = std::iter::once(cmd.get_name().to_string()).chain(args.iter().cloned());
            cmd.clone()
                .try_get_matches_from(argv)
                .unwrap_or_else(|e| panic!("{}: {e}", d["metadata"]["name"]));
        }
    }
    assert!(checked >= 16, "only {checked} flags checked");
}

#[test]
fn the_optional_pod_monitor_is_valid_yaml_for_both_metrics_ports() {
    let root = sandgate_tests::procs::workspace_root();
    let text = std::fs::read_to_string(root.join("deploy/optional/servicemonitor.yaml")).unwrap();
    let d = &docs(&text)[0];
    assert_eq!(d["kind"], "PodMonitor");
    assert_eq!(d["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
}

#[test]
fn every_flag_is_documented_in_operating_md() {
    let root = sandgate_tests::procs::workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/operating.md")).unwrap();
    for cmd in [
        sandgate_extproc::Config::command(),
        sandgate_controller::Config::command(),
        sandgate_api::Cli::command(),
    ] {
        for a in cmd.get_arguments() {
            if let Some(long) = a.get_long() {
                if ["help", "version"].contains(&long) {
                    continue;
                }
                assert!(
                    doc.contains(&format!("`--{long}`")),
                    "docs/operating.md does not document --{long} of {}",
                    cmd.get_name()
                );
            }
        }
    }
}
