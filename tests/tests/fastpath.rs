//! The fast path, process level: hot sandbox hosts routed by Envoy itself, from virtual hosts and
//! a validity flag sandgate-extproc serves it over ADS (real Envoy, real sandgate-extproc, the
//! API and the loopback kubelet). These name `--fast-path` themselves, so they test it whatever
//! `SANDGATE_TEST_FAST_PATH` says.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use sandgate_tests::procs::{eventually, get, holds, websocket, Reply};
use sandgate_tests::stack::Stack;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SEC: Duration = Duration::from_secs(1);
const ON: &[&str] = &["--fast-path=true"];

fn host(id: &str) -> String {
    format!("8080-{id}.sandbox.localhost")
}

fn pod_ip(p: &Pod) -> std::net::IpAddr {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .unwrap()
        .parse()
        .unwrap()
}

/// An echo server that counts what reaches it, on `addr` as soon as it is free.
async fn canary(addr: SocketAddr) -> Arc<AtomicUsize> {
    let listener = eventually(10 * SEC, || async {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))
    })
    .await;
    let hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(sandgate_tests::echo::serve(
        listener,
        "canary".into(),
        hits.clone(),
    ));
    hits
}

fn served_by(r: &Reply) -> (u16, Option<String>) {
    (r.status, r.pod())
}

#[tokio::test]
async fn a_hot_host_is_routed_by_envoy_alone_to_its_own_pod() {
    let s = Stack::start_with(ON).await;
    s.sandbox("pod-a", "sbx-a", 8080).await;
    s.sandbox("pod-b", "sbx-b", 8080).await;
    s.sandbox("pod-c", "sbx-c", 3000).await;
    let a = host("sbx-a");
    s.until_hot(&a, 5 * SEC).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap = listener.local_addr().unwrap().to_string();
    let hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(sandgate_tests::echo::serve(
        listener,
        "trap".into(),
        hits.clone(),
    ));

    let routed = s.routed_by_ext_proc().await;
    let spoof = [
        ("x-sandgate-destination", trap.as_str()),
        ("x-envoy-original-dst-host", trap.as_str()),
        ("x-sandbox-destination", trap.as_str()),
        ("x-sandbox-id", "sbx-b"),
        ("e2b-sandbox-id", "sbx-b"),
    ];
    for _ in 0..20 {
        let r = s.get(&a, "/x", &spoof).await;
        assert_eq!(served_by(&r), (200, Some("pod-a".into())), "{}", r.body);
        let seen = &r.json()["headers"];
        assert!(
            seen.get("x-sandbox-id").is_none() && seen.get("e2b-sandbox-id").is_none(),
            "addressing headers reached the pod: {seen}"
        );
    }
    assert_eq!(s.routed_by_ext_proc().await, routed, "ext_proc was asked");
    // The host with a port and in capitals is the same sandbox; the default-port form too.
    let r = s
        .get("8080-SBX-A.sandbox.localhost:10000", "/", &spoof)
        .await;
    assert_eq!(served_by(&r), (200, Some("pod-a".into())), "{}", r.body);
    s.until_hot("sbx-c.sandbox.localhost", 5 * SEC).await;
    let r = s.get("sbx-c.sandbox.localhost", "/", &spoof).await;
    assert_eq!(served_by(&r), (200, Some("pod-c".into())), "{}", r.body);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a client chose the destination"
    );
    // Not hot: still ext_proc, still the right pod.
    let r = s.get(&host("sbx-b"), "/", &spoof).await;
    assert_eq!(served_by(&r), (200, Some("pod-b".into())), "{}", r.body);
}

#[tokio::test]
async fn released_or_deleted_hot_sandboxes_stop_routing_within_a_second() {
    let s = Stack::start_with(ON).await;
    s.sandbox("pod-rel", "sbx-rel", 8080).await;
    s.sandbox("pod-del", "sbx-del", 8080).await;
    for id in ["sbx-rel", "sbx-del"] {
        s.until_hot(&host(id), 5 * SEC).await;
    }
    s.set_labels("pod-rel", json!({"sandgate.dev/phase": "stopping"}))
        .await;
    s.delete("pod-del").await;
    for id in ["sbx-rel", "sbx-del"] {
        s.until_status(&host(id), 502, SEC).await;
        // Gone from Envoy's own table too, not only refused by a fallback.
        eventually(SEC, || async {
            let held = s.envoy.hot_hosts().await;
            if held.contains(&host(id)) {
                Err(format!("envoy still holds {id}: {held:?}"))
            } else {
                Ok(())
            }
        })
        .await;
    }
}

/// What a controller's EvictRoute (after a release, or a deleted claim) promises: when it
/// answers, this replica's Envoy already holds no hot route to the sandbox, so whoever waited for
/// it (the E2B kill) never sees the sandbox answer again. An Envoy too slow to confirm makes it
/// wait, a bounded time, then say so.
#[tokio::test]
async fn an_eviction_answers_once_envoy_holds_no_hot_route_to_the_sandbox() {
    use sandgate_shared::control::{control_client::ControlClient, EvictRouteRequest};
    let s = Stack::start_with(ON).await;
    for (pod, id) in [("pod-slow", "sbx-slow"), ("pod-stuck", "sbx-stuck")] {
        s.sandbox(pod, id, 8080).await;
        s.until_hot(&host(id), 5 * SEC).await;
    }
    let control = ControlClient::new(
        tonic::transport::Channel::from_shared(format!(
            "http://127.0.0.1:{}",
            s.extproc.control_port
        ))
        .unwrap()
        .connect()
        .await
        .unwrap(),
    );
    let evict = |id: &str| {
        let mut control = control.clone();
        let mut req = tonic::Request::new(EvictRouteRequest {
            sandbox_id: id.into(),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", sandgate_tests::procs::TEST_TOKEN)
                .parse()
                .unwrap(),
        );
        tokio::spawn(async move { control.evict_route(req).await.unwrap().into_inner() })
    };

    // Envoy frozen for a moment: the answer waits for it.
    s.envoy.signal("STOP");
    let mut pending = evict("sbx-slow");
    let early = tokio::time::timeout(SEC / 2, &mut pending).await;
    s.envoy.signal("CONT");
    assert!(early.is_err(), "answered before envoy confirmed: {early:?}");
    let answer = pending.await.unwrap();
    assert!(answer.evicted && answer.hot_routes_withdrawn, "{answer:?}");
    let held = s.envoy.hot_hosts().await;
    assert!(
        !held.contains(&host("sbx-slow")),
        "envoy still holds the evicted sandbox: {held:?}"
    );

    // Frozen past the bound: the answer comes anyway, saying Envoy has not confirmed.
    s.envoy.signal("STOP");
    let started = Instant::now();
    let answer = evict("sbx-stuck").await.unwrap();
    let took = started.elapsed();
    s.envoy.signal("CONT");
    assert!(answer.evicted && !answer.hot_routes_withdrawn, "{answer:?}");
    assert!(took < 3 * SEC, "the wait is bounded: {took:?}");
    eventually(SEC, || async {
        let held = s.envoy.hot_hosts().await;
        if held.contains(&host("sbx-stuck")) {
            Err(format!("envoy still holds sbx-stuck: {held:?}"))
        } else {
            Ok(())
        }
    })
    .await;
}

/// Stops the extproc (`signal`: KILL, or STOP which leaves its connections open), releases and
/// deletes a hot sandbox's pod, and gives the pod's address to a canary once Envoy's validity
/// flag has lapsed (asserted within the TTL plus a margin): nothing may reach the canary.
async fn stopped_extproc_never_routes_to_a_reused_address(signal: &str) {
    let s = Stack::start_with(ON).await;
    let pod = s.sandbox("pod-old", "sbx-old", 8080).await;
    let addr = SocketAddr::new(pod_ip(&pod), 8080);
    let h = host("sbx-old");
    s.until_hot(&h, 5 * SEC).await;
    eventually(SEC, || async {
        if s.envoy.hot_routes_valid().await {
            Ok(())
        } else {
            Err("flag not set".to_string())
        }
    })
    .await;
    let stopped = Instant::now();
    s.extproc.signal(signal);
    s.set_labels("pod-old", json!({"sandgate.dev/phase": "stopping"}))
        .await;
    s.delete("pod-old").await;
    // The flag is confirmed every quarter of its 1 s TTL: without sandgate it lapses within 1 s.
    eventually(2 * SEC, || async {
        if s.envoy.hot_routes_valid().await {
            Err(format!(
                "still valid {:?} after the stop",
                stopped.elapsed()
            ))
        } else {
            Ok(())
        }
    })
    .await;
    assert!(stopped.elapsed() < 1500 * Duration::from_millis(1));
    let hits = canary(addr).await;
    let spoof = [("x-sandgate-destination", addr.to_string())];
    let tries = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (h, envoy, tries, spoof) =
                (h.clone(), s.envoy_addr(), tries.clone(), spoof.clone());
            tokio::spawn(async move {
                let end = Instant::now() + 3 * SEC;
                while Instant::now() < end {
                    let headers = [(spoof[0].0, spoof[0].1.as_str())];
                    if let Ok(r) = get(envoy, &h, "/", &headers).await {
                        assert_ne!(r.pod().as_deref(), Some("canary"), "{}", r.body);
                    }
                    tries.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for l in load {
        l.await.unwrap();
    }
    assert!(tries.load(Ordering::SeqCst) >= 8);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the canary was reached");
    s.extproc.signal("CONT");
}

#[tokio::test]
async fn a_killed_extproc_never_routes_to_a_reused_address() {
    stopped_extproc_never_routes_to_a_reused_address("KILL").await;
}

#[tokio::test]
async fn a_hung_extproc_never_routes_to_a_reused_address() {
    stopped_extproc_never_routes_to_a_reused_address("STOP").await;
}

#[tokio::test]
async fn a_restarted_extproc_withdraws_what_envoy_held_from_before() {
    let mut s = Stack::start_with(ON).await;
    s.sandbox("pod-gone", "sbx-gone", 8080).await;
    s.sandbox("pod-stay", "sbx-stay", 8080).await;
    for id in ["sbx-gone", "sbx-stay"] {
        s.until_hot(&host(id), 5 * SEC).await;
    }
    s.extproc.kill().await;
    // Released while no extproc could tell Envoy; the new one starts with an empty table.
    s.set_labels("pod-gone", json!({"sandgate.dev/phase": "stopping"}))
        .await;
    s.respawn_extproc(ON).await;
    s.extproc.wait_ready(10 * SEC).await;
    eventually(5 * SEC, || async {
        let held = s.envoy.hot_hosts().await;
        if held.is_empty() {
            Ok(())
        } else {
            Err(format!("envoy still holds {held:?}"))
        }
    })
    .await;
    s.until_status(&host("sbx-gone"), 502, SEC).await;
    s.until_hot(&host("sbx-stay"), 5 * SEC).await;
}

#[tokio::test]
async fn without_the_validity_flag_hot_hosts_answer_503_until_it_returns() {
    let s = Stack::start_with(ON).await;
    s.sandbox("pod-a", "sbx-a", 8080).await;
    let a = host("sbx-a");
    s.until_hot(&a, 5 * SEC).await;
    // What the flag's TTL does when sandgate goes: here an admin override takes it away.
    let r = s
        .envoy
        .admin("POST", "/runtime_modify?sandgate.fast_path.valid=0")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.get(&a, "/", &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("8080-sbx-a.sandbox.localhost")),
        "{}",
        r.body
    );
    // Hosts that are not hot still route through ext_proc.
    s.sandbox("pod-b", "sbx-b", 8080).await;
    let r = s.get(&host("sbx-b"), "/", &[]).await;
    assert_eq!(served_by(&r), (200, Some("pod-b".into())), "{}", r.body);
    let r = s
        .envoy
        .admin("POST", "/runtime_modify?sandgate.fast_path.valid")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    s.until_hot(&a, 5 * SEC).await;
}

#[tokio::test]
async fn websocket_upgrades_on_a_hot_host_are_counted_and_capped_by_ext_proc() {
    let s = Stack::start_with(&["--fast-path=true", "--max-streams-per-sandbox", "2"]).await;
    s.sandbox("pod-ws", "sbx-ws", 8080).await;
    let h = host("sbx-ws");
    s.until_hot(&h, 5 * SEC).await;
    let open = |n: usize| {
        let (envoy, h) = (s.envoy_addr(), h.clone());
        async move {
            let mut ws = websocket(envoy, &h).await?;
            ws.send(Message::text(format!("hi {n}"))).await.unwrap();
            let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
            assert_eq!(reply.as_str(), format!("pod-ws:hi {n}"));
            Ok::<_, u16>(ws)
        }
    };
    let before = s.routed_by_ext_proc().await;
    let first = open(1).await.expect("first websocket");
    let second = open(2).await.expect("second websocket");
    assert_eq!(
        s.routed_by_ext_proc().await,
        before + 2.0,
        "upgrades skipped ext_proc"
    );
    assert_eq!(open(3).await.err(), Some(429));
    drop((first, second));
}

#[tokio::test]
async fn the_hot_table_stays_within_its_bound() {
    let s = Stack::start_with(&["--fast-path=true", "--fast-path-max-routes", "2"]).await;
    for i in 0..4 {
        s.sandbox(&format!("pod-{i}"), &format!("sbx-{i}"), 8080)
            .await;
    }
    for i in 0..4 {
        let r = s.get(&host(&format!("sbx-{i}")), "/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The most recently used stay; the rest go back to ext_proc, and every sandbox still routes.
    s.until_hot(&host("sbx-3"), 5 * SEC).await;
    holds(2 * SEC, || async {
        let held = s.envoy.hot_hosts().await;
        if held.len() <= 2 {
            Ok(())
        } else {
            Err(format!("{} hot hosts: {held:?}", held.len()))
        }
    })
    .await;
    for i in 0..4 {
        let r = s.get(&host(&format!("sbx-{i}")), "/", &[]).await;
        assert_eq!(served_by(&r), (200, Some(format!("pod-{i}"))), "{}", r.body);
    }
    assert!(
        s.extproc
            .metric("sandgate_extproc_fast_path_evicted_total")
            .await
            >= 2.0
    );
}

/// An answer to `host` that Envoy gave on its own hot route (ext_proc not asked).
async fn hot_answer(s: &Stack, host: &str) -> Reply {
    hot_answer_within(s, host, 5 * SEC).await
}

async fn hot_answer_within(s: &Stack, host: &str, within: Duration) -> Reply {
    eventually(within, || async {
        let before = s.routed_by_ext_proc().await;
        let r = s.get(host, "/", &[]).await;
        let held = s.envoy.hot_hosts().await.iter().any(|h| h == host);
        if held && s.routed_by_ext_proc().await == before {
            Ok(r)
        } else {
            Err(format!("{host} not answered on a hot route yet"))
        }
    })
    .await
}

#[tokio::test]
async fn failures_on_a_hot_route_answer_in_json_naming_the_sandbox() {
    let s = Stack::start_with(ON).await;
    let pod = s.sandbox("pod-up", "sbx-up", 8080).await;
    let reset = tokio::net::TcpListener::bind((pod_ip(&pod), 7001))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((c, _)) = reset.accept().await {
            let _ = c.set_zero_linger();
            drop(c);
        }
    });
    for (host, message) in [
        (
            "9999-sbx-up.sandbox.localhost",
            "The sandbox sbx-up is running but the port 9999-sbx-up.sandbox.localhost names is not open",
        ),
        (
            "7001-sbx-up.sandbox.localhost",
            "The sandbox sbx-up closed or reset the connection before answering",
        ),
    ] {
        let r = hot_answer(&s, host).await;
        assert_eq!(r.status, 502, "{}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
        let body = r.json();
        assert_eq!(
            (body["code"].as_i64(), body["message"].as_str(), body["sandbox_id"].as_str()),
            (Some(502), Some(message), Some("sbx-up")),
            "{}",
            r.body
        );
    }
    // A port that accepts and never answers: a 504 within the per-try timeout (3 s here), as on
    // the ext_proc path, not the stream idle timeout of an hour.
    let hang = tokio::net::TcpListener::bind((pod_ip(&pod), 7002))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hang.accept().await {
            held.push(c);
        }
    });
    let host = "7002-sbx-up.sandbox.localhost";
    let started = Instant::now();
    let r = hot_answer_within(&s, host, 30 * SEC).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.json();
    assert_eq!(
        (
            body["code"].as_i64(),
            body["error"].as_str(),
            body["sandbox_id"].as_str()
        ),
        (Some(504), Some("upstream timeout"), Some("sbx-up")),
        "{}",
        r.body
    );
    assert!(took < 20 * SEC, "the hot route waited {took:?}");
}

#[tokio::test]
async fn a_routing_header_given_twice_on_a_hot_host_is_a_400() {
    let s = Stack::start_with(ON).await;
    s.sandbox("pod-dup", "sbx-dup", 8080).await;
    let h = host("sbx-dup");
    s.until_hot(&h, 5 * SEC).await;
    let routed = s.routed_by_ext_proc().await;
    for header in [
        "x-sandbox-id",
        "x-sandbox-port",
        "e2b-sandbox-id",
        "e2b-sandbox-port",
    ] {
        let r = s.get(&h, "/", &[(header, "8080"), (header, "80")]).await;
        assert_eq!(r.status, 400, "{header}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
        let body = r.json();
        assert_eq!(body["code"], 400, "{}", r.body);
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains(header),
            "{}",
            r.body
        );
    }
    assert_eq!(
        s.routed_by_ext_proc().await,
        routed,
        "answered by Envoy alone"
    );
    // Once is fine on the hot route.
    let r = s.get(&h, "/", &[("x-sandbox-port", "80")]).await;
    assert_eq!(served_by(&r), (200, Some("pod-dup".into())), "{}", r.body);
    // Two Host headers (Envoy joins them): ext_proc answers 400.
    let mut c = tokio::net::TcpStream::connect(s.envoy_addr())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(
        format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: 8080-sbx-other.sandbox.localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.contains("duplicate") || out.contains("more than once"),
        "{out}"
    );
}
