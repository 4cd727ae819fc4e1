//! The committed Envoy configs are the rendered template, and real Envoy accepts them.

use sandgate_tests::envoy::{committed, validate};

#[test]
fn committed_configs_match_the_template() {
    for (path, want) in committed() {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} drifted from envoy/bootstrap.yaml.in: run `cargo run -p sandgate-tests --bin sandgate-envoy-render`",
            path.display()
        );
    }
}

#[test]
fn envoy_validates_every_config() {
    for (path, _) in committed() {
        validate(&path).unwrap();
    }
}

/// The ext_proc routes sandgate-extproc puts in every shard (for hosts that are not hot) are the
/// bootstrap's catch-all routes, and the shard's retry policy is the catch-all's: a host behaves
/// the same whichever virtual host Envoy picks for it.
#[test]
fn shards_fall_back_to_the_routes_of_the_catch_all() {
    use envoy_types::pb::envoy::config::route::v3::{
        route::Action, route_action::ClusterSpecifier,
    };
    let yaml = sandgate_tests::envoy::render(&sandgate_tests::envoy::EnvoyPorts::production());
    let cfg: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let rc = &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"];
    let catch_all = &rc["virtual_hosts"][0];
    assert_eq!(catch_all["domains"][0], "*");
    let bootstrap: Vec<(bool, bool, String)> = catch_all["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["match"].get("grpc").is_some(),
                r["match"].get("dynamic_metadata").is_some(),
                r["route"]["cluster"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let template = sandgate_extproc::fastpath::RouteTemplate {
        route_config: rc["name"].as_str().unwrap().into(),
        cluster: "sandbox_pods_fast".into(),
        cluster_h2: "sandbox_pods_fast_h2".into(),
        header: "x-sandgate-destination".into(),
        ext_proc_cluster: "sandbox_pods".into(),
        ext_proc_cluster_h2: "sandbox_pods_h2".into(),
        response_timeout: std::time::Duration::from_secs(300),
    };
    let generated: Vec<(bool, bool, String)> = template
        .ext_proc_routes()
        .iter()
        .map(|r| {
            let m = r.r#match.as_ref().unwrap();
            let Some(Action::Route(a)) = &r.action else {
                panic!("not a route")
            };
            let Some(ClusterSpecifier::Cluster(c)) = &a.cluster_specifier else {
                panic!("no cluster")
            };
            (m.grpc.is_some(), !m.dynamic_metadata.is_empty(), c.clone())
        })
        .collect();
    assert_eq!(generated, bootstrap);
    // The same retry policy.
    let retry = &catch_all["retry_policy"];
    let ours = template.retry_policy();
    assert_eq!(retry["retry_on"], ours.retry_on);
    assert_eq!(retry["num_retries"], ours.num_retries.unwrap().value);
    assert_eq!(
        retry["per_try_timeout"].as_str().unwrap(),
        format!("{}s", ours.per_try_timeout.unwrap().seconds)
    );
    // Every cluster the shards name exists.
    let clusters: Vec<&str> = cfg["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in [
        &template.cluster,
        &template.cluster_h2,
        &template.ext_proc_cluster,
        &template.ext_proc_cluster_h2,
    ] {
        assert!(clusters.contains(&c.as_str()), "{c} not in the bootstrap");
    }
}
