//! Idle release, process level: real Envoys, sandgate-extproc replicas, sandgate-controller and the
//! API double. Timings: controller interval 1 s, idle timeout 3 s, Envoy access-log flush 1 s.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sandgate_tests::cluster::Cluster;
use sandgate_tests::procs::{eventually, get};
use sandgate_tests::stack::{fast_path, until_hot};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SEC: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout + one interval + a margin for a loaded 2-core machine.
const RELEASE_WITHIN: Duration = Duration::from_secs(3 + 1 + 4);

fn host(id: &str) -> String {
    format!("8080-{id}.sandbox.localhost")
}

/// Sends a request through `gw` every 300 ms for `d`, asserting each reaches the sandbox.
async fn keep_busy(c: &Cluster, gw: usize, id: &str, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let r = c.get(gw, &host(id)).await;
        assert_eq!(r.status, 200, "{id} stopped routing while busy: {}", r.body);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn until_phase(c: &Cluster, pod: &str, phase: &str, within: Duration) {
    eventually(within, || async {
        let p = c.phase(pod).await;
        if p == phase {
            Ok(())
        } else {
            Err(format!("{pod} is {p}"))
        }
    })
    .await
}

#[tokio::test]
async fn busy_sandboxes_stay_and_idle_ones_go_on_time() {
    let mut c = Cluster::start(1).await;
    c.sandbox("pod-busy", "busy").await;
    // The idle time counts from the pod's creation: on a real node that is a second or two
    // before it has an address and its sandbox ID (as in failsafe.rs).
    let created = Instant::now();
    c.sandbox("pod-idle", "idle").await;
    c.start_controller("ctrl-a", &[]);
    // Busy for well over twice the timeout.
    let busy = async { keep_busy(&c, 0, "busy", 3 * TIMEOUT).await };
    let idle = async {
        until_phase(&c, "pod-idle", "stopping", RELEASE_WITHIN).await;
        created.elapsed()
    };
    let ((), took) = tokio::join!(busy, idle);
    assert!(
        took >= TIMEOUT - SEC,
        "released after {took:?}, before its timeout"
    );
    assert_eq!(c.phase("pod-busy").await, "running");
    // The released sandbox's route answers 502 at once.
    let r = c.get(0, &host("idle")).await;
    assert_eq!(r.status, 502, "{}", r.body);
    let pod = c.pods().get("pod-idle").await.unwrap();
    let ann = pod.metadata.annotations.unwrap();
    assert_eq!(ann["sandgate.dev/stop-reason"], "IdleTimeout");
    assert!(ann.contains_key("sandgate.dev/stopped-at"));
    // The busy sandbox's activity was written back as an annotation.
    let busy = c.pods().get("pod-busy").await.unwrap();
    assert!(busy
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("sandgate.dev/last-active"));
    assert!(
        c.controllers[0]
            .metric("sandgate_controller_releases_total")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn an_open_websocket_keeps_its_sandbox_until_it_closes() {
    // The shipped Envoy config: open streams are reported only every 30 s, ten times the idle
    // timeout; the WebSocket counts as open from its upgrade.
    let mut c = Cluster::start_with_flush(1, "30s").await;
    c.sandbox("pod-ws", "ws").await;
    c.sandbox("pod-canary", "canary-idle").await;
    let url = format!("ws://{}/socket", c.gateways[0].envoy.addr());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("host", host("ws").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket through envoy");
    ws.send(Message::text("hello")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    c.start_controller("ctrl-a", &[]);
    // The other sandbox shows the controller is releasing meanwhile.
    until_phase(&c, "pod-canary", "stopping", RELEASE_WITHIN).await;
    // Silent but open for 3× the timeout.
    c.assert_running_until(
        "pod-ws",
        Instant::now() + 3 * TIMEOUT,
        "released with an open WebSocket",
    )
    .await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "pod-ws:still here"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    until_phase(&c, "pod-ws", "stopping", RELEASE_WITHIN).await;
}

#[tokio::test]
async fn a_long_silent_request_keeps_its_sandbox_until_it_ends() {
    let mut c = Cluster::start(1).await;
    c.sandbox("pod-long", "long").await;
    c.sandbox("pod-other", "other-idle").await;
    let gw = &c.gateways[0];
    if fast_path() {
        // On Envoy's own route: no ext_proc call sees it start.
        until_hot(&gw.extproc, &gw.envoy, &host("long"), 5 * SEC).await;
    }
    let envoy = gw.envoy.addr();
    let started = Instant::now();
    // Answered at once, then silent for 10 s: longer than Envoy's per-try timeout allows a
    // sandbox to wait before answering, so this is a stream, not a slow answer.
    let long = tokio::spawn(async move { get(envoy, &host("long"), "/stream/10000", &[]).await });
    c.start_controller("ctrl-a", &[]);
    until_phase(&c, "pod-other", "stopping", RELEASE_WITHIN).await;
    // Nothing else reaches the sandbox for over three times its timeout.
    c.assert_running_until(
        "pod-long",
        started + Duration::from_millis(9500),
        "released during a request",
    )
    .await;
    let r = long.await.unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "data: pod-long\n\n"));
    until_phase(&c, "pod-long", "stopping", RELEASE_WITHIN).await;
}

#[tokio::test]
async fn traffic_on_one_replica_of_two_keeps_the_sandbox() {
    let mut c = Cluster::start(2).await;
    c.sandbox("pod-busy", "busy").await;
    c.sandbox("pod-idle", "idle").await;
    c.start_controller("ctrl-a", &[]);
    let busy = keep_busy(&c, 1, "busy", 3 * TIMEOUT);
    let idle = until_phase(&c, "pod-idle", "stopping", RELEASE_WITHIN);
    tokio::join!(busy, idle);
    assert_eq!(c.phase("pod-busy").await, "running");
}

#[tokio::test]
async fn a_refusing_or_hung_replica_blocks_releases_but_not_ticks() {
    let mut c = Cluster::start(1).await;
    // One address nothing listens on, one that accepts and never answers.
    let refused = sandgate_tests::procs::free_port();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    for (name, port) in [("refused", refused), ("hung", hung_port)] {
        c.register_replica(name, port).await;
        c.sandbox(&format!("pod-{name}"), name).await;
        c.start_controller(&format!("ctrl-{name}"), &["--leader-election", "false"]);
        let ctrl = c.controllers.last().unwrap();
        // Ticks go on (each bounded by the 1 s poll timeout) and are all partial.
        let start = Instant::now();
        eventually(10 * SEC, || async {
            let partial = ctrl
                .metric("sandgate_controller_ticks_total{label=\"skipped_partial\"}")
                .await;
            if partial >= 4.0 {
                Ok(())
            } else {
                Err(format!("{partial} partial ticks"))
            }
        })
        .await;
        assert!(start.elapsed() < 10 * SEC);
        assert!(start.elapsed() > TIMEOUT, "four ticks cannot be this fast");
        assert_eq!(
            c.phase(&format!("pod-{name}")).await,
            "running",
            "released on a partial view"
        );
        assert_eq!(ctrl.metric("sandgate_controller_releases_total").await, 0.0);
        // Annotations still move forward from the replicas that answered.
        assert!(
            ctrl.metric("sandgate_controller_replicas_polled_total")
                .await
                >= 8.0
        );
        // Once the bad replica leaves the Service, the idle sandbox goes.
        c.unregister_replica(name).await;
        until_phase(&c, &format!("pod-{name}"), "stopping", RELEASE_WITHIN).await;
        c.controllers.pop().unwrap().kill().await;
    }
}

#[tokio::test]
async fn a_restarted_extproc_recovers_activity_and_releases_nothing_early() {
    let mut c = Cluster::start(1).await;
    c.sandbox("pod-a", "sbx-a").await;
    c.start_controller("ctrl-a", &["--default-idle-timeout", "6s"]);
    keep_busy(&c, 0, "sbx-a", 4 * SEC).await;
    let last_traffic = Instant::now();
    // The controller wrote the activity down before the restart.
    eventually(5 * SEC, || async {
        let p = c.pods().get("pod-a").await.map_err(|e| e.to_string())?;
        if p.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("sandgate.dev/last-active")
        {
            Ok(())
        } else {
            Err("no last-active yet".into())
        }
    })
    .await;
    restart_then_released_on_time(&mut c, last_traffic, "released early after the restart").await;
}

/// Kills the only gateway and starts a new one (same ext_proc port, new control address). Then
/// `pod-a` (idle timeout 6 s) must not be released before 6 s after `last_traffic` (`early` says
/// what that would mean), and must be released once truly idle.
async fn restart_then_released_on_time(c: &mut Cluster, last_traffic: Instant, early: &str) {
    let port = c.gateways[0].extproc.grpc_port;
    c.gateways[0].extproc.kill().await;
    let old = c.gateways.remove(0);
    drop(old);
    let gw = c.start_gateway(port).await;
    c.unregister_replica("gw-0").await;
    c.register_replica("gw-0b", gw.extproc.control_port).await;
    c.gateways.push(gw);
    c.assert_running_until("pod-a", last_traffic + 5 * SEC, early)
        .await;
    until_phase(c, "pod-a", "stopping", RELEASE_WITHIN).await;
}

#[tokio::test]
async fn activity_a_restarted_replica_forgot_still_counts() {
    let mut c = Cluster::start(1).await;
    c.sandbox("pod-a", "sbx-a").await;
    // last-active is written once, and then not again for an hour: the restarted replica is
    // seeded with activity from the first second only.
    c.start_controller(
        "ctrl-a",
        &["--default-idle-timeout", "6s", "--refresh-interval", "1h"],
    );
    keep_busy(&c, 0, "sbx-a", 4 * SEC).await;
    let last_traffic = Instant::now();
    // The controller saw the traffic before the restart: nothing goes before 6 s after it, and
    // it goes once truly idle.
    restart_then_released_on_time(
        &mut c,
        last_traffic,
        "released on the restarted replica's word alone",
    )
    .await;
}

#[tokio::test]
async fn a_pod_reclaimed_between_decision_and_patch_is_not_released_on_double() {
    let mut c = Cluster::start(1).await;
    c.sandbox("pod-a", "old-id").await;
    let api = c
        .target
        .double()
        .expect("staging this race needs the in-process API double (scenarios skip *_on_double)");
    // Just before the controller's release patch lands, the pod is claimed again.
    let ns = c.ns().to_string();
    api.before_next_json_patch(move |store| {
        let relabel = json!({"metadata": {"labels": {"sandgate.dev/sandbox-id": "new-id"}}});
        store
            .patch(
                "pods",
                &ns,
                "pod-a",
                sandgate_tests::apidouble::store::PatchKind::Merge,
                &relabel,
                false,
            )
            .unwrap();
    });
    c.start_controller("ctrl-a", &[]);
    let ctrl = &c.controllers[0];
    eventually(RELEASE_WITHIN, || async {
        let skipped = ctrl
            .metric("sandgate_controller_releases_skipped_total{label=\"conflict\"}")
            .await;
        if skipped >= 1.0 {
            Ok(())
        } else {
            Err("no conflict yet".into())
        }
    })
    .await;
    let pod = c.pods().get("pod-a").await.unwrap();
    let labels = pod.metadata.labels.unwrap();
    assert_eq!(labels["sandgate.dev/phase"], "running");
    assert_eq!(labels["sandgate.dev/sandbox-id"], "new-id");
    assert!(!pod
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("sandgate.dev/stop-reason"));
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies() {
    let mut c = Cluster::start(1).await;
    c.start_controller("ctrl-a", &[]);
    c.start_controller("ctrl-b", &[]);
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = c.target.api();
    let leader = eventually(10 * SEC, || async {
        let l = leases
            .get("sandgate-controller")
            .await
            .map_err(|e| e.to_string())?;
        l.spec
            .and_then(|s| s.holder_identity)
            .ok_or("no holder".to_string())
    })
    .await;
    let i = c
        .controllers
        .iter()
        .position(|x| x.identity == leader)
        .unwrap();
    let mut dead = c.controllers.remove(i);
    eventually(5 * SEC, || async {
        let l = dead.metric("sandgate_controller_leader").await;
        let s = c.controllers[0].metric("sandgate_controller_leader").await;
        if (l, s) == (1.0, 0.0) {
            Ok(())
        } else {
            Err(format!("leader gauge {l}, standby gauge {s}"))
        }
    })
    .await;
    dead.kill().await;
    let killed = std::time::Instant::now();
    // The standby takes over between 1 and 5/3 lease durations (3 s) after the last renewal.
    eventually(5 * SEC + SEC, || async {
        let g = c.controllers[0].metric("sandgate_controller_leader").await;
        if g == 1.0 {
            Ok(())
        } else {
            Err(format!("standby gauge {g}"))
        }
    })
    .await;
    println!(
        "standby took over {:?} after the leader died",
        killed.elapsed()
    );
    c.sandbox("pod-idle", "idle").await;
    // Lease duration 3 s, then the idle timeout and a tick.
    until_phase(&c, "pod-idle", "stopping", RELEASE_WITHIN + 3 * SEC).await;
    assert_eq!(
        c.controllers[0].metric("sandgate_controller_leader").await,
        1.0
    );
    let holder = leases
        .get("sandgate-controller")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    assert_eq!(holder, c.controllers[0].identity);
}
