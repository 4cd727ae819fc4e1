use super::*;
use crate::index::SandboxKey;
use envoy_types::pb::envoy::service::runtime::v3::Runtime;
use prost::Message;

pub(crate) fn template() -> RouteTemplate {
    RouteTemplate {
        route_config: "sandboxes".into(),
        cluster: "sandbox_pods_fast".into(),
        cluster_h2: "sandbox_pods_fast_h2".into(),
        header: "x-sandgate-destination".into(),
        ext_proc_cluster: "sandbox_pods".into(),
        ext_proc_cluster_h2: "sandbox_pods_h2".into(),
        response_timeout: Duration::from_secs(300),
    }
}

fn hot(sandbox: &str, dest: &str, h2: bool) -> HotRoute {
    HotRoute {
        sandbox: SandboxKey::new(sandbox).unwrap(),
        dest: dest.parse().unwrap(),
        h2,
    }
}

fn decode<M: Message + Default>(t: &TypedExtensionConfig) -> M {
    M::decode(t.typed_config.as_ref().unwrap().value.as_slice()).unwrap()
}

fn route_action(r: &Route) -> &RouteAction {
    match &r.action {
        Some(Action::Route(a)) => a,
        other => panic!("not a route action: {other:?}"),
    }
}

fn cluster(r: &Route) -> &str {
    match &route_action(r).cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => c,
        other => panic!("{other:?}"),
    }
}

fn on_action(m: &OnMatch) -> &TypedExtensionConfig {
    match &m.on_match {
        Some(on_match::OnMatch::Action(a)) => a,
        other => panic!("not an action: {other:?}"),
    }
}

#[test]
fn a_shard_is_one_vhost_with_an_exact_authority_map_and_an_ext_proc_fallback() {
    let t = template();
    let hosts = [
        (
            "8080-sbx-ac.sandbox.example.com",
            hot("sbx-ac", "10.1.2.3:8080", false),
        ),
        (
            "50051-sbx-bc.sandbox.example.com",
            hot("sbx-bc", "10.1.2.4:50051", true),
        ),
    ];
    let r = t.shard("*c.sandbox.example.com", hosts);
    assert_eq!(r.name, "sandboxes/*c.sandbox.example.com");
    assert_eq!(t.shard_of_resource(&r.name), Some("*c.sandbox.example.com"));
    assert_eq!(t.shard_of_resource("other/x"), None);
    let any = r.resource.as_ref().unwrap();
    assert_eq!(any.type_url, VIRTUAL_HOST_TYPE);
    let vh = VirtualHost::decode(any.value.as_slice()).unwrap();
    // VHDS removes by resource name and keys vhosts by their own name: the two must agree.
    assert_eq!(vh.name, r.name);
    assert_eq!(vh.domains, ["*c.sandbox.example.com"]);
    assert!(vh.routes.is_empty(), "a matcher, not routes");
    // One retry policy for the whole shard: connect failures, and a 504 for a hung sandbox.
    let retry = vh.retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "connect-failure");
    assert_eq!(retry.per_try_timeout.unwrap().seconds, 300);

    let top = vh.matcher.as_ref().unwrap();
    let Some(MatcherType::MatcherList(list)) = &top.matcher_type else {
        panic!("a matcher list first")
    };
    // Four duplicated-header checks (400), then gRPC (ext_proc).
    assert_eq!(list.matchers.len(), 5);
    for m in &list.matchers[..4] {
        let route: Route = decode(on_action(m.on_match.as_ref().unwrap()));
        let Some(Action::DirectResponse(d)) = route.action else {
            panic!("not a direct response")
        };
        assert_eq!(d.status, 400);
    }
    let grpc: RouteList = decode(on_action(list.matchers[4].on_match.as_ref().unwrap()));
    assert_eq!(grpc.routes.len(), 3, "the ext_proc routes");
    // Then the map.
    let Some(on_match::OnMatch::Matcher(by_authority)) =
        &top.on_no_match.as_ref().unwrap().on_match
    else {
        panic!("then a nested matcher")
    };
    let Some(MatcherType::MatcherTree(tree)) = &by_authority.matcher_type else {
        panic!("a tree")
    };
    let input: HttpRequestHeaderMatchInput = decode(tree.input.as_ref().unwrap());
    assert_eq!(input.header_name, ":authority");
    let Some(TreeType::ExactMatchMap(map)) = &tree.tree_type else {
        panic!("an exact map")
    };
    assert_eq!(map.map.len(), 2);
    let h1: Route = decode(on_action(&map.map["8080-sbx-ac.sandbox.example.com"]));
    assert_eq!(
        h1.name, "sbx-ac",
        "the access logs read the sandbox from it"
    );
    assert_eq!(cluster(&h1), "sandbox_pods_fast");
    let add = &h1.request_headers_to_add[0];
    assert_eq!(
        add.append_action,
        HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    let h = add.header.as_ref().unwrap();
    assert_eq!(
        (h.key.as_str(), h.value.as_str()),
        ("x-sandgate-destination", "10.1.2.3:8080")
    );
    // No per-route filter config (about 1.2 KB each in Envoy), no per-route retry policy.
    assert!(h1.typed_per_filter_config.is_empty());
    assert!(route_action(&h1).retry_policy.is_none());
    let gate = h1
        .r#match
        .as_ref()
        .unwrap()
        .runtime_fraction
        .as_ref()
        .unwrap();
    assert_eq!(gate.runtime_key, VALID_KEY);
    assert_eq!(
        gate.default_value.unwrap().numerator,
        0,
        "off without the flag"
    );
    let h2: Route = decode(on_action(&map.map["50051-sbx-bc.sandbox.example.com"]));
    assert_eq!(cluster(&h2), "sandbox_pods_fast_h2", "a declared h2c port");
    // A miss goes through ext_proc.
    let miss: RouteList = decode(on_action(by_authority.on_no_match.as_ref().unwrap()));
    assert_eq!(miss.routes.len(), 3);
}

#[test]
fn a_shards_version_follows_its_contents() {
    let t = template();
    let a = ("80-xa.d", hot("xa", "10.0.0.1:80", false));
    let b = ("80-ya.d", hot("ya", "10.0.0.2:80", false));
    let v = |hosts: Vec<(&str, HotRoute)>| t.shard("*a.d", hosts).version;
    assert_eq!(v(vec![a, b]), v(vec![a, b]), "stable");
    assert_ne!(v(vec![a, b]), v(vec![a]));
    assert_ne!(
        v(vec![a]),
        v(vec![("80-xa.d", hot("xa", "10.0.0.9:80", false))])
    );
    assert_ne!(
        v(vec![a]),
        v(vec![("80-xa.d", hot("xa", "10.0.0.1:80", true))])
    );
}

#[test]
fn the_ext_proc_routes_pick_http2_for_grpc_and_marked_ports_with_the_filter_on() {
    let routes = template().ext_proc_routes();
    let summary: Vec<(bool, bool, &str)> = routes
        .iter()
        .map(|r| {
            let m = r.r#match.as_ref().unwrap();
            (m.grpc.is_some(), !m.dynamic_metadata.is_empty(), cluster(r))
        })
        .collect();
    assert_eq!(
        summary,
        [
            (true, false, "sandbox_pods_h2"),
            (false, true, "sandbox_pods_h2"),
            (false, false, "sandbox_pods"),
        ]
    );
    for r in &routes {
        assert!(r
            .typed_per_filter_config
            .contains_key("envoy.filters.http.ext_proc"));
        assert_eq!(
            route_action(r).timeout.unwrap().seconds,
            0,
            "no overall timeout"
        );
    }
}

#[test]
fn the_runtime_layer_carries_its_ttl_the_flag_and_the_stream_token() {
    for (valid, flag) in [(true, 100.0), (false, 0.0)] {
        let r = runtime_layer(Duration::from_millis(1500), 7, valid, "tok");
        assert_eq!((r.name.as_str(), r.version.as_str()), (RUNTIME_LAYER, "7"));
        let ttl = r.ttl.unwrap();
        assert_eq!((ttl.seconds, ttl.nanos), (1, 500_000_000));
        let rt = Runtime::decode(r.resource.unwrap().value.as_slice()).unwrap();
        let fields = rt.layer.unwrap().fields;
        assert_eq!(fields[VALID_KEY].kind, Some(Kind::NumberValue(flag)));
        assert_eq!(
            fields[super::super::observe::STREAM_KEY].kind,
            Some(Kind::StringValue("tok".into()))
        );
    }
}
