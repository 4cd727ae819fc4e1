//! What real pods and real clients do to the data plane, process level (real Envoy, real
//! sandgate-extproc, the loopback kubelet): pods that die or turn NotReady, thousands of open
//! streams, closed ports, late listeners, resets and hangs, and the E2B SDK's conventions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use sandgate_tests::procs::{eventually, get, websocket, Reply};
use sandgate_tests::stack::Stack;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SEC: Duration = Duration::from_secs(1);

fn pod_ip(p: &Pod) -> String {
    p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap()
}

async fn annotate(s: &Stack, pod: &str, key: &str, value: &str) {
    let patch =
        json!({"metadata": {"annotations": {format!("kubelet.sandgate.dev/{key}"): value}}});
    s.pods()
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

fn assert_json_error(r: &Reply, status: u16, message_contains: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        r.headers
    );
    let body = r.json();
    assert_eq!(body["code"], status, "{}", r.body);
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(message_contains), "{}", r.body);
}

#[tokio::test]
async fn a_dead_pods_ip_given_to_another_pod_is_never_routed_to() {
    let s = Stack::start().await;
    let victim = s.sandbox("pod-dead", "sbx-dead", 8080).await;
    let host = "8080-sbx-dead.sandbox.localhost";
    assert_eq!(
        s.get(host, "/", &[]).await.pod().as_deref(),
        Some("pod-dead")
    );
    annotate(&s, "pod-dead", "exit", "OOMKilled:137").await;
    // Until the gateway sees the kubelet's report, the closed port answers for it.
    let r = eventually(10 * SEC, || async {
        let r = s.get(host, "/", &[]).await;
        if r.json()["error"] == "sandbox not running" {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await;
    assert_json_error(&r, 502, "The sandbox sbx-dead was not found");
    // Kubernetes hands the IP to another pod (the dead one keeps it in its status).
    let mut p = sandgate_tests::stack::sandbox_pod("canary", None, "idle", 8080);
    p.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("kubelet.sandgate.dev/pod-ip".into(), pod_ip(&victim));
    s.pods().create(&Default::default(), &p).await.unwrap();
    let canary = eventually(10 * SEC, || async {
        let p = s.pods().get("canary").await.map_err(|e| e.to_string())?;
        match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Running") => Ok(p),
            other => Err(format!("canary is {other:?}")),
        }
    })
    .await;
    assert_eq!(pod_ip(&canary), pod_ip(&victim));
    let direct: SocketAddr = format!("{}:8080", pod_ip(&canary)).parse().unwrap();
    let name = canary.metadata.name.clone();
    assert_eq!(
        get(direct, "x", "/", &[]).await.unwrap().pod(),
        name,
        "the canary serves"
    );
    for _ in 0..20 {
        let r = s.get(host, "/", &[]).await;
        assert_eq!(
            r.status,
            502,
            "a dead sandbox reached {:?}: {}",
            r.pod(),
            r.body
        );
    }
}

#[tokio::test]
async fn a_running_pod_that_is_not_ready_answers_503_with_retry_after() {
    let s = Stack::start().await;
    s.sandbox("pod-flaky", "sbx-flaky", 8080).await;
    let host = "8080-sbx-flaky.sandbox.localhost";
    assert_eq!(s.get(host, "/", &[]).await.status, 200);
    annotate(&s, "pod-flaky", "ready", "false").await;
    let r = s.until_status(host, 503, 5 * SEC).await;
    assert_json_error(&r, 503, "sbx-flaky");
    assert_eq!(r.headers["retry-after"], "1");
    annotate(&s, "pod-flaky", "ready", "true").await;
    s.until_status(host, 200, 5 * SEC).await;
}

#[tokio::test]
async fn eleven_hundred_open_websockets_leave_room_for_others_and_one_sandbox_hits_its_own_limit() {
    let s = Stack::start_with(&["--max-streams-per-sandbox", "60"]).await;
    for i in 0..21 {
        s.sandbox(&format!("pod-{i}"), &format!("sbx-{i}"), 8080)
            .await;
    }
    let envoy = s.envoy_addr();
    let mut open = Vec::new();
    for round in 0..55 {
        let batch = futures::future::join_all((0..20).map(|i| async move {
            websocket(envoy, &format!("8080-sbx-{i}.sandbox.localhost")).await
        }))
        .await;
        for (i, ws) in batch.into_iter().enumerate() {
            open.push(ws.unwrap_or_else(|code| panic!("round {round} sbx-{i}: {code}")));
        }
    }
    assert_eq!(open.len(), 1100);
    let start = Instant::now();
    let r = s.get("8080-sbx-20.sandbox.localhost", "/", &[]).await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-20")),
        "{}",
        r.body
    );
    assert!(start.elapsed() < SEC, "took {:?}", start.elapsed());
    // sbx-0 has 55 open; 5 more reach its limit of 60, the next is refused at once.
    for _ in 0..5 {
        open.push(
            websocket(envoy, "8080-sbx-0.sandbox.localhost")
                .await
                .unwrap(),
        );
    }
    let start = Instant::now();
    assert_eq!(
        websocket(envoy, "8080-sbx-0.sandbox.localhost").await.err(),
        Some(429)
    );
    assert!(start.elapsed() < SEC);
    let r = s
        .get(
            "gw",
            "/",
            &[
                ("x-sandbox-id", "sbx-0"),
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
            ],
        )
        .await;
    assert_json_error(&r, 429, "sbx-0 has 60 streams open");
    assert_eq!(r.headers["retry-after"], "1");
    // Everyone else is unaffected, on both kinds of request.
    open.push(
        websocket(envoy, "8080-sbx-1.sandbox.localhost")
            .await
            .unwrap(),
    );
    assert_eq!(
        s.get("8080-sbx-0.sandbox.localhost", "/", &[]).await.status,
        200
    );
    // The open sockets still work.
    let ws = &mut open[0];
    ws.send(Message::text("still here")).await.unwrap();
    let reply = tokio::time::timeout(5 * SEC, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "pod-0:still here");
}

#[tokio::test]
async fn upstream_failures_answer_in_json() {
    let s = Stack::start().await;
    let pod = s.sandbox("pod-up", "sbx-up", 8080).await;
    let ip = pod_ip(&pod);
    // A closed port, after the short grace for late listeners.
    let r = s.get("9999-sbx-up.sandbox.localhost", "/", &[]).await;
    assert_json_error(
        &r,
        502,
        "The sandbox sbx-up is running but port 9999 is not open",
    );
    // A listener that resets every connection.
    let reset = tokio::net::TcpListener::bind((ip.as_str(), 7001))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((c, _)) = reset.accept().await {
            let _ = c.set_zero_linger();
            drop(c);
        }
    });
    let r = s.get("7001-sbx-up.sandbox.localhost", "/", &[]).await;
    assert_json_error(&r, 502, "sbx-up");
    // A listener that never answers: 504 after the per-try timeout (3 s in tests).
    let hang = tokio::net::TcpListener::bind((ip.as_str(), 7002))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hang.accept().await {
            held.push(c);
        }
    });
    let r = s.get("7002-sbx-up.sandbox.localhost", "/", &[]).await;
    assert_json_error(&r, 504, "sbx-up did not answer");
}

#[tokio::test]
async fn an_app_that_listens_a_second_late_still_gets_its_request() {
    let s = Stack::start().await;
    let pod = s.sandbox("pod-late", "sbx-late", 8080).await;
    let ip: std::net::IpAddr = pod_ip(&pod).parse().unwrap();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(900)).await;
        sandgate_tests::echo::bind(ip, 7100, "late-app".into())
            .await
            .unwrap()
    });
    let r = s.get("7100-sbx-late.sandbox.localhost", "/", &[]).await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("late-app")),
        "{}",
        r.body
    );
    drop(late.await.unwrap());
}

#[tokio::test]
async fn e2b_headers_route_and_only_they_are_stripped() {
    let s = Stack::start().await;
    s.sandbox("pod-e2b", "sbx-e2b", 49983).await;
    let r = s
        .get(
            "gateway.example",
            "/health",
            &[
                ("E2b-Sandbox-Id", "sbx-e2b"),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", "tok"),
                ("User-Agent", "e2b-python-sdk/2.63.0"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-e2b")),
        "{}",
        r.body
    );
    let seen = &r.json()["headers"];
    assert!(
        seen.get("e2b-sandbox-id").is_none() && seen.get("e2b-sandbox-port").is_none(),
        "{seen}"
    );
    assert_eq!(seen["x-access-token"], "tok");
    assert_eq!(seen["user-agent"], "e2b-python-sdk/2.63.0");
    let r = s
        .get(
            "gateway.example",
            "/",
            &[
                ("E2b-Sandbox-Id", "sbx-gone"),
                ("E2b-Sandbox-Port", "49983"),
            ],
        )
        .await;
    assert_json_error(&r, 502, "The sandbox sbx-gone was not found");
    // envd's internal routes are the control plane's: refused whatever the address form or
    // encoding, and never made hot (the host form is asked twice, as a hot host would be).
    for (host, path, headers) in [
        (
            "gateway.example",
            "/init",
            vec![("E2b-Sandbox-Id", "sbx-e2b"), ("E2b-Sandbox-Port", "49983")],
        ),
        (
            "49983-sbx-e2b.sandbox.localhost",
            "/files/%2e%2e/init",
            vec![],
        ),
        (
            "49983-sbx-e2b.sandbox.localhost",
            "/files/%2e%2e/init",
            vec![],
        ),
        ("gateway.example", "/sandboxes/sbx-e2b/49983/envs", vec![]),
    ] {
        let r = s.get(host, path, &headers).await;
        assert_json_error(&r, 403, "is for the control plane only");
    }
}

#[tokio::test]
async fn a_draining_gateway_finishes_what_it_has_and_fails_nothing_before() {
    let mut s = Stack::start_with(&["--drain-delay", "1500ms", "--drain-timeout", "4s"]).await;
    s.sandbox("pod-d", "sbx-d", 8080).await;
    let host = "8080-sbx-d.sandbox.localhost";
    let envoy = s.envoy_addr();
    let mut ws = websocket(envoy, host).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let ready = |path: &'static str| {
        let s = &s;
        async move {
            s.extproc
                .admin_get(path)
                .await
                .map(|r| r.status)
                .unwrap_or(0)
        }
    };
    assert_eq!(
        (ready("/readyz").await, ready("/ready/envoy").await),
        (200, 200)
    );
    // The kubelet's preStop hook.
    let admin = s.extproc.admin_port;
    let drain = tokio::spawn(async move {
        let r = get(([127, 0, 0, 1], admin).into(), "localhost", "/drain", &[]).await;
        (r.map(|r| r.body), Instant::now())
    });
    eventually(SEC, || async {
        match (ready("/readyz").await, ready("/ready/envoy").await) {
            (503, 503) => Ok(()),
            other => Err(format!("still ready: {other:?}")),
        }
    })
    .await;
    // Until the endpoints drop the pod (the drain delay), new requests keep succeeding, and one
    // started now outlives the delay.
    let slow = tokio::spawn(async move { get(envoy, host, "/slow/2500", &[]).await });
    let until = Instant::now() + Duration::from_millis(1200);
    let mut served = 0;
    while Instant::now() < until {
        let r = get(envoy, host, "/", &[])
            .await
            .expect("request during the drain delay");
        assert_eq!(r.status, 200, "{}", r.body);
        served += 1;
    }
    assert!(served > 5, "{served}");
    let r = slow.await.unwrap().expect("the in-flight request");
    assert_eq!((r.status, r.pod().as_deref()), (200, Some("pod-d")));
    // The open WebSocket holds the drain to its timeout; then Envoy is stopped and the socket
    // ends with the connection (no reset), after working to the last moment.
    ws.send(Message::text("during the drain")).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(
        reply.into_text().unwrap().as_str(),
        "pod-d:during the drain"
    );
    let (body, drained_at) = drain.await.unwrap();
    let body = body.expect("/drain answers");
    assert!(body.contains("1 connections left"), "{body}");
    // A second preStop hook (the other container's) returns at once.
    let again = get(([127, 0, 0, 1], admin).into(), "localhost", "/drain", &[])
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    assert!(drained_at.elapsed() < SEC);
    s.envoy.terminate().await.unwrap();
    match tokio::time::timeout(5 * SEC, ws.next())
        .await
        .expect("the socket ends")
    {
        None
        | Some(Ok(Message::Close(_)))
        | Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )))
        | Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => {}
        other => panic!("the WebSocket did not end cleanly: {other:?}"),
    }
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_calls_reach_a_sandbox_over_h2c() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_health::ServingStatus as Status;
    let s = Stack::start().await;
    let pod = s.sandbox("pod-grpc", "sbx-grpc", 8080).await;
    // The sandbox's gRPC server (grpc.health.v1: unary Check, server-streaming Watch).
    let listener = tokio::net::TcpListener::bind((pod_ip(&pod).as_str(), 50051))
        .await
        .unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("sandbox", Status::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // HTTP/2 with prior knowledge to Envoy; the sandbox is named by the authority.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.envoy_addr()))
        .unwrap()
        .origin("http://50051-sbx-grpc.sandbox.localhost".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let request = || HealthCheckRequest {
        service: "sandbox".into(),
    };
    let status = client
        .check(request())
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);
    let mut watch = client
        .watch(request())
        .await
        .expect("streaming call")
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    reporter
        .set_service_status("sandbox", Status::NotServing)
        .await;
    let second = tokio::time::timeout(5 * SEC, watch.message())
        .await
        .expect("a streamed message")
        .unwrap()
        .unwrap();
    assert_eq!(second.status(), ServingStatus::NotServing);
}
