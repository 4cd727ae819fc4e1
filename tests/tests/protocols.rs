//! The protocol to a sandbox is the sandbox's, not the client's, on both paths (ext_proc and hot
//! routes): HTTP/1.1 and HTTP/2 clients reach an HTTP/1.1-only server; a port the sandbox
//! declares h2c gets HTTP/2; gRPC always gets HTTP/2; WebSockets from HTTP/1.1 (upgrade) and
//! HTTP/2 (extended CONNECT) clients reach an HTTP/1.1 server. Real Envoy, real sandgate-extproc,
//! the loopback kubelet, servers that speak one protocol only.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use sandgate_tests::echo::{bind_speaking, Protocol};
use sandgate_tests::procs::{get, get_h2, websocket, websocket_h2, Reply};
use sandgate_tests::stack::{fast_path, Stack};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SEC: Duration = Duration::from_secs(1);
/// Served by an HTTP/1.1-only server (undeclared: HTTP/1.1).
const H1_PORT: u16 = 9100;
/// Served by an h2c-only server the pod declares in its `h2c-ports` annotation.
const H2C_PORT: u16 = 9200;
/// An h2c-only gRPC server on a port nobody declares (content type decides).
const GRPC_PORT: u16 = 50051;

fn pod_ip(p: &Pod) -> std::net::IpAddr {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .unwrap()
        .parse()
        .unwrap()
}

fn host(port: u16) -> String {
    format!("{port}-sbx-proto.sandbox.localhost")
}

fn served(r: &Reply) -> (u16, Option<String>, String) {
    (
        r.status,
        r.pod(),
        r.json()["version"].as_str().unwrap_or_default().to_string(),
    )
}

/// How a round addresses the sandbox.
#[derive(Clone, Copy, PartialEq)]
enum By {
    /// `x-sandbox-id` / `x-sandbox-port`: never a hot route, always ext_proc.
    Headers,
    /// `<port>-<id>.<domain>`: ext_proc without the fast path, a hot route once hot with it.
    Host,
}

/// One GET to `port` from an HTTP/1.1 client and one from an HTTP/2 client.
async fn both_clients(s: &Stack, by: By, port: u16) -> [(&'static str, Reply); 2] {
    let envoy = s.envoy_addr();
    let port_s = port.to_string();
    let (authority, headers) = match by {
        By::Headers => (
            "gateway.localhost".to_string(),
            vec![
                ("x-sandbox-id", "sbx-proto"),
                ("x-sandbox-port", port_s.as_str()),
            ],
        ),
        By::Host => (host(port), vec![]),
    };
    [
        (
            "h1 client",
            get(envoy, &authority, "/", &headers).await.unwrap(),
        ),
        (
            "h2 client",
            get_h2(envoy, &authority, "/", &headers).await.unwrap(),
        ),
    ]
}

async fn check_http(s: &Stack, round: &str, by: By) {
    for (client, reply) in both_clients(s, by, H1_PORT).await {
        assert_eq!(
            served(&reply),
            (200, Some("h1-only".into()), "HTTP/1.1".into()),
            "{round}: {client} to an HTTP/1.1 server: {}",
            reply.body
        );
    }
    for (client, reply) in both_clients(s, by, H2C_PORT).await {
        assert_eq!(
            served(&reply),
            (200, Some("h2c-only".into()), "HTTP/2.0".into()),
            "{round}: {client} to a declared h2c port: {}",
            reply.body
        );
    }
}

async fn check_websockets(s: &Stack, round: &str) {
    let envoy = s.envoy_addr();
    let mut ws = websocket(envoy, &host(H1_PORT))
        .await
        .expect("h1 websocket");
    ws.send(Message::text("one")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert_eq!(echo.as_str(), "h1-only:one", "{round}: h1 websocket");
    let mut ws = websocket_h2(envoy, &host(H1_PORT))
        .await
        .unwrap()
        .unwrap_or_else(|status| panic!("{round}: h2 websocket refused with {status}"));
    ws.send(Message::text("two")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert_eq!(echo.as_str(), "h1-only:two", "{round}: h2 websocket");
}

async fn check_grpc(s: &Stack, round: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.envoy_addr()))
        .unwrap()
        .origin(format!("http://{}", host(GRPC_PORT)).parse().unwrap())
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "sandbox".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{round}: grpc: {e}"))
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving, "{round}");
}

#[tokio::test]
async fn each_client_protocol_reaches_each_sandbox_protocol_on_both_paths() {
    let s = Stack::start().await;
    let pod = s.sandbox("pod-proto", "sbx-proto", 8080).await;
    let ip = pod_ip(&pod);
    let _h1 = bind_speaking(ip, H1_PORT, "h1-only".into(), Protocol::Http1)
        .await
        .unwrap();
    let _h2 = bind_speaking(ip, H2C_PORT, "h2c-only".into(), Protocol::H2c)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind((ip, GRPC_PORT))
        .await
        .unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("sandbox", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let patch =
        json!({"metadata": {"annotations": {"sandgate.dev/h2c-ports": H2C_PORT.to_string()}}});
    s.pods()
        .patch("pod-proto", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    // The gateway's watch sees the annotation.
    sandgate_tests::procs::eventually(10 * SEC, || async {
        match &both_clients(&s, By::Headers, H2C_PORT).await[0].1 {
            r if r.status == 200 => Ok(()),
            r => Err(format!("{}: {}", r.status, r.body)),
        }
    })
    .await;

    let routed = s.routed_by_ext_proc().await;
    check_http(&s, "by headers", By::Headers).await;
    assert_eq!(
        s.routed_by_ext_proc().await,
        routed + 4.0,
        "all through ext_proc"
    );
    check_websockets(&s, "ext_proc").await;
    check_grpc(&s, "ext_proc").await;
    if !fast_path() {
        // By host, through ext_proc too (its answer carries no other header change).
        check_http(&s, "by host", By::Host).await;
        return;
    }
    for port in [H1_PORT, H2C_PORT] {
        s.until_hot(&host(port), 5 * SEC).await;
    }
    // Requests on hot routes no longer reach ext_proc (WebSocket upgrades always do).
    let routed = s.routed_by_ext_proc().await;
    check_http(&s, "hot route", By::Host).await;
    assert_eq!(s.routed_by_ext_proc().await, routed, "not on hot routes");
    check_websockets(&s, "hot route").await;
    check_grpc(&s, "hot route").await;
}
