use super::*;
use crate::index::{PodRoute, RouteIndex, RouteState, SandboxKey};
use crate::resolver::{LookupError, PodLookup};
use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use futures::future::BoxFuture;
use std::time::Duration;

struct NoApi;
impl PodLookup for NoApi {
    fn lookup(&self, _: SandboxKey) -> BoxFuture<'static, Result<Option<PodRoute>, LookupError>> {
        Box::pin(async { Ok(None) })
    }
}

fn router() -> Router {
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut reg);
    let index = Arc::new(RouteIndex::new());
    index.apply(
        SandboxKey::new("abc").unwrap(),
        PodRoute {
            ip: Some("10.1.2.3".parse().unwrap()),
            default_port: None,
            h2c: Default::default(),
            state: RouteState::Running,
            pod: 1,
            scope: 0,
        },
    );
    index.apply(
        SandboxKey::new("booting").unwrap(),
        PodRoute {
            ip: None,
            default_port: None,
            h2c: Default::default(),
            state: RouteState::NotReady,
            pod: 2,
            scope: 0,
        },
    );
    let resolver = Arc::new(Resolver::new(
        index,
        Arc::new(NoApi),
        Duration::from_secs(1),
        Duration::from_secs(1),
        metrics.clone(),
    ));
    let activity = Arc::new(crate::activity::ActivityTable::new());
    Router {
        addresses: AddressConfig::new(["sandbox.localhost"]).unwrap(),
        resolver,
        default_port: Some(8080),
        metrics,
        streams: Arc::new(crate::streams::StreamTable::new(
            activity.clone(),
            std::time::Duration::from_secs(120),
        )),
        activity,
        max_streams_per_sandbox: 2,
        envd_port: Some(49983),
        fast: None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        ..Default::default()
    }
}

fn destination(r: &ProcessingResponse) -> Option<String> {
    let lb = r
        .dynamic_metadata
        .as_ref()?
        .fields
        .get(METADATA_NAMESPACE)?;
    let Some(Kind::StructValue(s)) = &lb.kind else {
        return None;
    };
    match &s.fields.get(METADATA_KEY)?.kind {
        Some(Kind::StringValue(v)) => Some(v.clone()),
        _ => None,
    }
}

fn status(r: &ProcessingResponse) -> Option<(i32, String)> {
    match &r.response {
        Some(Resp::ImmediateResponse(i)) => Some((
            i.status.unwrap().code,
            String::from_utf8(i.body.clone()).unwrap(),
        )),
        _ => None,
    }
}

fn mutation(r: &ProcessingResponse) -> HeaderMutation {
    match &r.response {
        Some(Resp::RequestHeaders(h)) => h
            .response
            .clone()
            .unwrap()
            .header_mutation
            .unwrap_or_default(),
        _ => panic!("not a headers response"),
    }
}

#[tokio::test]
async fn routes_host_form_with_metadata_only() {
    let r = router();
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "3000-abc.sandbox.localhost"),
            (":path", "/x"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:3000"));
    assert_eq!(mutation(&reply), HeaderMutation::default());
    // Routed requests are activity; errors are not.
    r.on_request_headers(&headers(&[(":authority", "80-nope.sandbox.localhost")]))
        .await;
    let tracked: Vec<_> = r
        .activity
        .snapshot(0)
        .sandboxes
        .into_iter()
        .map(|s| s.id.as_str().to_string())
        .collect();
    assert_eq!(tracked, ["abc"]);
}

#[tokio::test]
async fn header_form_removes_addressing_headers() {
    let r = router();
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "gw"),
            (":path", "/"),
            ("x-sandbox-id", "abc"),
            ("x-sandbox-port", "81"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:81"));
    assert_eq!(
        mutation(&reply).remove_headers,
        vec!["x-sandbox-id", "x-sandbox-port"]
    );
}

#[tokio::test]
async fn e2b_headers_route_and_are_removed_and_other_headers_pass() {
    let r = router();
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "gw"),
            (":path", "/process.Process/Start"),
            ("e2b-sandbox-id", "abc"),
            ("e2b-sandbox-port", "49983"),
            ("x-access-token", "secret"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:49983"));
    assert_eq!(
        mutation(&reply).remove_headers,
        vec!["e2b-sandbox-id", "e2b-sandbox-port"]
    );
}

#[tokio::test]
async fn envds_internal_routes_are_refused_on_every_address_form() {
    let r = router();
    for (path, authority, extra) in [
        (
            "/init",
            "gw",
            vec![("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "49983")],
        ),
        ("/files/%2e%2e/init", "49983-abc.sandbox.localhost", vec![]),
        ("/sandboxes/abc/49983/init", "gw", vec![]),
        (
            "/envs",
            "gw",
            vec![("x-sandbox-id", "abc"), ("x-sandbox-port", "49983")],
        ),
    ] {
        let mut h = vec![
            (":authority", authority),
            (":path", path),
            (":method", "POST"),
        ];
        h.extend(extra);
        let reply = r.on_request_headers(&headers(&h)).await;
        let (code, body) = status(&reply).expect("an immediate answer");
        assert_eq!(code, 403, "{path} on {authority}: {body}");
        assert!(body.contains("control plane"), "{body}");
    }
    // The SDK's own calls pass, and other ports are not affected.
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "49983-abc.sandbox.localhost"),
            (":path", "/files?path=/tmp/x"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:49983"));
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "8080-abc.sandbox.localhost"),
            (":path", "/init"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:8080"));
}

#[tokio::test]
async fn upgrades_count_as_open_streams_up_to_the_limit() {
    let r = router();
    let ws = |id: &'static str| {
        headers(&[
            (":authority", "8080-abc.sandbox.localhost"),
            (":path", "/ws"),
            ("upgrade", "websocket"),
            ("x-request-id", id),
        ])
    };
    for id in ["r1", "r2"] {
        assert!(destination(&r.on_request_headers(&ws(id)).await).is_some());
    }
    assert_eq!(r.activity.open_streams("abc"), 2);
    let (code, body) = status(&r.on_request_headers(&ws("r3")).await).unwrap();
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("\"code\":429"), "{body}");
    // Plain requests to the same sandbox still route; the end of a stream makes room.
    let plain = headers(&[(":authority", "8080-abc.sandbox.localhost"), (":path", "/")]);
    assert!(destination(&r.on_request_headers(&plain).await).is_some());
    r.streams.ended(SandboxKey::new("abc").unwrap(), "r1");
    assert!(destination(&r.on_request_headers(&ws("r3")).await).is_some());
}

#[tokio::test]
async fn path_form_rewrites_path() {
    let r = router();
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "gw"),
            (":path", "/sandboxes/abc/9000/api?q=1"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:9000"));
    let m = mutation(&reply);
    assert_eq!(
        m.set_headers[0].header.as_ref().unwrap().raw_value,
        b"/api?q=1"
    );
}

#[tokio::test]
async fn error_answers() {
    let r = router();
    let (code, body) = status(
        &r.on_request_headers(&headers(&[(":authority", "80-nope.sandbox.localhost")]))
            .await,
    )
    .unwrap();
    assert_eq!(code, 502);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"code": 502, "error": "sandbox not found", "sandbox_id": "nope",
                           "message": "The sandbox nope was not found"})
    );
    let (code, _) = status(
        &r.on_request_headers(&headers(&[(":authority", "80-booting.sandbox.localhost")]))
            .await,
    )
    .unwrap();
    assert_eq!(code, 503);
    let (code, body) = status(
        &r.on_request_headers(&headers(&[(":authority", "99999-abc.sandbox.localhost")]))
            .await,
    )
    .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("invalid_port"), "{body}");
}

#[tokio::test]
async fn a_spoofed_destination_header_is_ignored() {
    let r = router();
    let reply = r
        .on_request_headers(&headers(&[
            (":authority", "80-abc.sandbox.localhost"),
            ("x-sandbox-destination", "127.0.0.1:22"),
            ("x-envoy-original-dst-host", "127.0.0.1:22"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:80"));
}

#[tokio::test]
async fn a_routing_header_given_twice_is_a_400_naming_it() {
    let r = router();
    for (pairs, name) in [
        (
            vec![
                ("x-sandbox-id", "abc"),
                ("x-sandbox-port", "8080"),
                ("x-sandbox-port", "80"),
            ],
            "x-sandbox-port",
        ),
        (
            vec![("x-sandbox-id", "abc"), ("x-sandbox-id", "abc")],
            "x-sandbox-id",
        ),
        (
            vec![
                ("e2b-sandbox-id", "abc"),
                ("e2b-sandbox-port", "8080"),
                ("e2b-sandbox-port", "8080"),
            ],
            "e2b-sandbox-port",
        ),
        // Ambiguous even beside a host that would route, and even when it is the other form's.
        (
            vec![
                (":authority", "8080-abc.sandbox.localhost"),
                ("x-sandbox-port", "1"),
                ("x-sandbox-port", "2"),
            ],
            "x-sandbox-port",
        ),
        // Envoy joins a repeated Host into one value with a comma.
        (
            vec![(
                ":authority",
                "8080-abc.sandbox.localhost,80-abc.sandbox.localhost",
            )],
            "host",
        ),
        (
            vec![("x-sandbox-id", "abc"), ("x-sandbox-port", "8080, 80")],
            "x-sandbox-port",
        ),
    ] {
        let mut all = vec![(":path", "/")];
        all.extend(pairs.iter().copied());
        let reply = r.on_request_headers(&headers(&all)).await;
        assert_eq!(destination(&reply), None, "{pairs:?} was routed");
        let (code, body) = status(&reply).expect("an immediate answer");
        assert_eq!(code, 400, "{pairs:?}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["reason"], "duplicate", "{pairs:?}: {body}");
        assert!(body["message"].as_str().unwrap().contains(name), "{body}");
    }
    // Once each is fine.
    let reply = r
        .on_request_headers(&headers(&[
            (":path", "/"),
            ("x-sandbox-id", "abc"),
            ("x-sandbox-port", "8080"),
        ]))
        .await;
    assert_eq!(destination(&reply).as_deref(), Some("10.1.2.3:8080"));
}

#[tokio::test]
async fn an_http2_websocket_without_a_key_gets_one_for_its_http1_upgrade() {
    let r = router();
    let set = |reply: &ProcessingResponse| -> Vec<(String, Vec<u8>)> {
        mutation(reply)
            .set_headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.clone(), h.raw_value.clone())
            })
            .collect()
    };
    // As Envoy's codec hands an extended CONNECT on: an upgrade with no key.
    let h2 = headers(&[
        (":authority", "8080-abc.sandbox.localhost"),
        (":method", "GET"),
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-version", "13"),
        (":path", "/ws"),
        ("x-request-id", "h2-ws"),
    ]);
    let keys = set(&r.on_request_headers(&h2).await);
    let key = &keys
        .iter()
        .find(|(k, _)| k == "sec-websocket-key")
        .expect("a key")
        .1;
    assert_eq!(key.len(), 24);
    assert!(key.ends_with(b"=="));
    // An HTTP/1.1 client's upgrade (with its key) is left alone, as is an upgrade to another
    // protocol.
    let h1 = headers(&[
        (":authority", "8080-abc.sandbox.localhost"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("x-request-id", "h1-ws"),
    ]);
    assert!(set(&r.on_request_headers(&h1).await).is_empty());
    let other = headers(&[
        (":authority", "8080-abc.sandbox.localhost"),
        ("upgrade", "h2c"),
        ("x-request-id", "other"),
    ]);
    // (A fresh router: this one already holds its two streams.)
    assert!(set(&router().on_request_headers(&other).await).is_empty());
    assert_ne!(super::websocket_key(), super::websocket_key(), "random");
}

#[tokio::test]
async fn a_declared_h2c_port_asks_envoy_to_route_again_with_http2() {
    let r = router();
    let key = SandboxKey::new("abc").unwrap();
    let mut route = r.resolver.index().get("abc").unwrap();
    route.h2c.insert(50051);
    r.resolver.index().apply(key, route);
    let upstream = |reply: &ProcessingResponse| {
        let ns = &reply.dynamic_metadata.as_ref().unwrap().fields[METADATA_NAMESPACE];
        let Some(Kind::StructValue(lb)) = &ns.kind else {
            panic!("no envoy.lb")
        };
        lb.fields
            .get(METADATA_UPSTREAM)
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
    };
    let clears = |reply: &ProcessingResponse| match &reply.response {
        Some(Resp::RequestHeaders(h)) => h.response.as_ref().unwrap().clear_route_cache,
        _ => panic!("not a headers answer"),
    };
    let h2 = r
        .on_request_headers(&headers(&[(":authority", "50051-abc.sandbox.localhost")]))
        .await;
    assert_eq!(upstream(&h2).as_deref(), Some(UPSTREAM_H2));
    assert!(clears(&h2));
    let h1 = r
        .on_request_headers(&headers(&[(":authority", "8080-abc.sandbox.localhost")]))
        .await;
    assert_eq!(upstream(&h1), None);
    assert!(!clears(&h1), "the route chosen before stays");
}
