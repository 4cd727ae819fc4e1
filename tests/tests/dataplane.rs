//! Data plane, process level: real Envoy, real sandgate-extproc, the API double over HTTP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sandgate_tests::procs::{eventually, get};
use sandgate_tests::stack::{fast_path, Stack};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

#[tokio::test]
async fn every_address_form_routes_to_the_right_pod() {
    let s = Stack::start().await;
    s.sandbox("pod-a", "sbx-a", 8080).await;
    s.sandbox("pod-b", "sbx-b", 8080).await;
    s.sandbox("pod-c", "sbx-c", 3000).await;

    let r = s.get("8080-sbx-b.sandbox.localhost", "/hello", &[]).await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-b")),
        "{}",
        r.body
    );

    // Default port from the pod's `port` annotation.
    let r = s.get("sbx-c.sandbox.localhost", "/", &[]).await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-c")),
        "{}",
        r.body
    );

    // Headers: routed, and stripped before reaching the pod.
    let r = s
        .get(
            "gateway.example",
            "/x",
            &[("x-sandbox-id", "sbx-a"), ("x-sandbox-port", "8080")],
        )
        .await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-a")),
        "{}",
        r.body
    );
    let seen = &r.json()["headers"];
    assert!(
        seen.get("x-sandbox-id").is_none() && seen.get("x-sandbox-port").is_none(),
        "{seen}"
    );

    // Path: prefix stripped, query kept.
    let r = s
        .get("gateway.example", "/sandboxes/sbx-c/3000/api/v1?q=1", &[])
        .await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-c")),
        "{}",
        r.body
    );
    assert_eq!(r.json()["path"], "/api/v1?q=1");
}

#[tokio::test]
async fn websocket_round_trips_through_envoy() {
    let s = Stack::start().await;
    s.sandbox("pod-ws", "sbx-ws", 8080).await;
    s.sandbox("pod-other", "sbx-other", 8080).await;
    let url = format!("ws://{}/socket", s.envoy_addr());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("host", "8080-sbx-ws.sandbox.localhost".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket upgrade through envoy");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let reply = tokio::time::timeout(5 * SEC, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            reply.into_text().unwrap().as_str(),
            format!("pod-ws:ping {i}")
        );
    }
}

#[tokio::test]
async fn error_answers_are_clear() {
    let s = Stack::start().await;
    s.create_pod("pod-boot", Some("sbx-boot"), "starting", 8080)
        .await;

    let r = s.get("8080-nobody.sandbox.localhost", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.json(),
        json!({"code": 502, "error": "sandbox not found", "sandbox_id": "nobody",
               "message": "The sandbox nobody was not found"})
    );
    assert_eq!(r.headers["content-type"], "application/json");

    let r = s.get("8080-sbx-boot.sandbox.localhost", "/", &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");

    for (host, path, headers) in [
        ("a.b.sandbox.localhost", "/", vec![]),
        ("99999-abc.sandbox.localhost", "/", vec![]),
        ("8080-UP_per.sandbox.localhost", "/", vec![]),
        ("gateway.example", "/sandboxes/abc/", vec![]),
        ("gateway.example", "/sandboxes/abc/notaport/x", vec![]),
        (
            "gateway.example",
            "/",
            vec![("x-sandbox-id", "abc"), ("x-sandbox-port", "0")],
        ),
        ("gateway.example", "/", vec![]),
    ] {
        let r = s.get(host, path, &headers).await;
        assert_eq!(r.status, 400, "{host}{path} {headers:?}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{}", r.body);
    }
}

#[tokio::test]
async fn a_pod_marked_running_just_before_its_first_request_routes() {
    let s = Stack::start().await;
    // An idle warm pod (no sandbox id) that is claimed right before the request.
    s.create_pod("pod-warm", None, "idle", 8080).await;
    s.set_labels(
        "pod-warm",
        json!({"sandgate.dev/sandbox-id": "sbx-new", "sandgate.dev/phase": "running"}),
    )
    .await;
    let r = s.get("8080-sbx-new.sandbox.localhost", "/", &[]).await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-warm")),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_claim_after_a_negative_answer_routes_within_a_second() {
    let s = Stack::start_with(&["--negative-ttl", "30s"]).await;
    s.create_pod("pod-late", None, "idle", 8080).await;
    let r = s.get("8080-sbx-late.sandbox.localhost", "/", &[]).await;
    assert_eq!(r.status, 502);
    s.set_labels(
        "pod-late",
        json!({"sandgate.dev/sandbox-id": "sbx-late", "sandgate.dev/phase": "running"}),
    )
    .await;
    // The watch clears the negative entry long before its TTL.
    s.until_status("8080-sbx-late.sandbox.localhost", 200, SEC)
        .await;
}

#[tokio::test]
async fn released_or_deleted_pods_stop_routing_within_a_second() {
    let s = Stack::start().await;
    s.sandbox("pod-rel", "sbx-rel", 8080).await;
    s.sandbox("pod-del", "sbx-del", 8080).await;
    s.until_status("8080-sbx-rel.sandbox.localhost", 200, SEC)
        .await;
    s.until_status("8080-sbx-del.sandbox.localhost", 200, SEC)
        .await;

    s.set_labels("pod-rel", json!({"sandgate.dev/phase": "stopping"}))
        .await;
    s.until_status("8080-sbx-rel.sandbox.localhost", 502, SEC)
        .await;

    s.delete("pod-del").await;
    s.until_status("8080-sbx-del.sandbox.localhost", 502, SEC)
        .await;
}

#[tokio::test]
async fn spoofed_destinations_never_reach_another_address() {
    let s = Stack::start().await;
    let pod = s.sandbox("pod-mine", "sbx-mine", 8080).await;
    let (canary_addr, hits) = canary().await;
    let target = canary_addr.to_string();
    let spoof = [
        ("x-sandbox-destination", target.as_str()),
        ("x-envoy-original-dst-host", target.as_str()),
    ];

    // With a valid address: the client's own pod, whatever it claims.
    let r = s.get("8080-sbx-mine.sandbox.localhost", "/", &spoof).await;
    assert_eq!(
        (r.status, r.pod().as_deref()),
        (200, Some("pod-mine")),
        "{}",
        r.body
    );
    // Forged paths: never leave the named sandbox's pod.
    for path in [
        "/sandboxes/sbx-mine/8080/../../sandboxes/other/1/",
        "/sandboxes/sbx-mine/8080/%2e%2e/%2e%2e/x",
        &format!("/sandboxes/sbx-mine/8080/http://{target}/"),
    ] {
        let r = s.get("gateway.example", path, &spoof).await;
        assert!(
            r.status != 200 || r.pod().as_deref() == Some("pod-mine"),
            "{path}: {}",
            r.body
        );
    }
    // Without a valid address: rejected, never passed through.
    for host in [
        "gateway.example",
        target.as_str(),
        "8080-nobody.sandbox.localhost",
    ] {
        let r = s.get(host, "/", &spoof).await;
        assert!(
            r.status == 400 || r.status == 502,
            "{host}: {} {}",
            r.status,
            r.body
        );
    }
    let ip = pod.status.unwrap().pod_ip.unwrap();
    let r = s.get(&format!("{ip}:8080"), "/", &spoof).await;
    assert_eq!(r.status, 400);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the canary was reached");
}

#[tokio::test]
async fn extproc_down_means_503_never_a_fall_through() {
    let mut s = Stack::start().await;
    s.sandbox("pod-x", "sbx-x", 8080).await;
    let host = "8080-sbx-x.sandbox.localhost";
    s.until_status(host, 200, SEC).await;
    if fast_path() {
        s.until_hot(host, 5 * SEC).await;
    }
    let (canary, hits) = canary().await;
    let target = canary.to_string();
    let spoof = [
        ("x-envoy-original-dst-host", target.as_str()),
        ("x-sandbox-destination", target.as_str()),
        ("x-sandgate-destination", target.as_str()),
    ];
    let killed = Instant::now();
    s.extproc.kill().await;
    // A hot route keeps reaching its own pod for at most the validity TTL (1 s) after sandgate
    // is gone; then, as on the ext_proc path at once, every request is a 503.
    let grace = if fast_path() {
        1500 * MS
    } else {
        Duration::ZERO
    };
    eventually(grace + SEC, || async {
        let r = s.get(host, "/", &spoof).await;
        match (r.status, r.pod()) {
            (503, None) => Ok(()),
            (200, Some(pod)) if pod == "pod-x" && killed.elapsed() < grace => {
                Err("still routed by envoy".to_string())
            }
            (status, pod) => panic!(
                "{:?} after the kill: {status} from {pod:?}: {}",
                killed.elapsed(),
                r.body
            ),
        }
    })
    .await;
    for _ in 0..5 {
        let r = s.get(host, "/", &spoof).await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.pod().is_none());
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a request fell through to the canary"
    );
}

/// An echo server on another loopback address that no request may ever reach.
async fn canary() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(sandgate_tests::echo::serve(
        listener,
        "canary".into(),
        hits.clone(),
    ));
    (addr, hits)
}

#[tokio::test]
async fn restarted_extproc_is_not_ready_until_synced_then_never_502s() {
    let mut s = Stack::start().await;
    for i in 0..5 {
        s.sandbox(&format!("pod-{i}"), &format!("sbx-{i}"), 8080)
            .await;
    }
    s.extproc.kill().await;
    // The API is slow to list: the new process must stay unready meanwhile. (Only the double can
    // be made slow; on a cluster the restart and the no-502 part still run.)
    let slow_list = s.target.double().is_some();
    if let Some(api) = s.target.double() {
        api.set_list_delay(Some(Duration::from_millis(1500)));
    }
    s.respawn_extproc(&[]).await;
    eventually(5 * SEC, || async {
        match s.extproc.admin_get("/healthz").await {
            Ok(r) if r.status == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    if slow_list {
        assert!(
            !s.extproc.is_ready().await,
            "ready before the first list completed"
        );
    }
    if let Some(api) = s.target.double() {
        api.set_list_delay(None);
    }
    s.extproc.wait_ready(10 * SEC).await;
    for i in 0..5 {
        let r = s
            .get(&format!("8080-sbx-{i}.sandbox.localhost"), "/", &[])
            .await;
        assert_eq!(r.status, 200, "sbx-{i}: {}", r.body);
    }
}

#[tokio::test]
async fn metrics_and_graceful_shutdown() {
    let mut s = Stack::start().await;
    s.sandbox("pod-m", "sbx-m", 8080).await;
    s.get("8080-sbx-m.sandbox.localhost", "/", &[]).await;
    s.get("8080-nobody.sandbox.localhost", "/", &[]).await;
    let m = s.extproc.admin_get("/metrics").await.unwrap().body;
    for want in [
        "sandgate_extproc_requests_total{outcome=\"routed\"} 1",
        "sandgate_extproc_requests_total{outcome=\"not_found\"} 1",
        "sandgate_extproc_indexed_sandboxes 1",
        "sandgate_extproc_api_lookups_total{result=\"absent\"} 1",
        "sandgate_extproc_decision_duration_seconds_count 2",
    ] {
        assert!(m.contains(want), "missing {want:?} in\n{m}");
    }
    let status = s.extproc.terminate().await.unwrap();
    assert!(status.success(), "{status:?}");
    let _ = get(s.envoy_addr(), "x", "/", &[]).await;
}

#[tokio::test]
async fn bad_flags_fail_with_a_message_naming_the_flag() {
    let bin = sandgate_tests::procs::bin_path("sandgate-extproc");
    let dir = tempfile::tempdir().unwrap();
    let token = sandgate_tests::procs::write_token(dir.path()).unwrap();
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    for (args, flag) in [
        (vec!["--domain", "bad domain"], "--domain"),
        (vec!["--label-prefix", "NoSlash"], "--label-prefix"),
        (vec!["--negative-ttl", "soon"], "--negative-ttl"),
        (vec!["--default-port", "0"], "--default-port"),
        (vec!["--grpc-addr", "nowhere"], "--grpc-addr"),
        (vec!["--fast-path", "maybe"], "--fast-path"),
        (vec!["--fast-path-ttl", "100ms"], "--fast-path-ttl"),
        (vec!["--fast-path-batch", "600ms"], "--fast-path-batch"),
        (
            vec!["--fast-path-max-routes", "0"],
            "--fast-path-max-routes",
        ),
        (vec!["--fast-path-header", "X Bad"], "--fast-path-header"),
        (vec!["--fast-path-cluster", "a/b"], "--fast-path-cluster"),
        (
            vec!["--control-token-file", "/nonexistent/token"],
            "--control-token-file",
        ),
        (
            vec!["--control-token-file", empty.to_str().unwrap()],
            "--control-token-file",
        ),
    ] {
        let mut cmd = std::process::Command::new(&bin);
        if !args.contains(&"--control-token-file") {
            cmd.arg("--control-token-file").arg(&token);
        }
        let out = cmd
            .args(&args)
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag),
            "{args:?}: error does not name {flag}:\n{err}"
        );
    }
}
