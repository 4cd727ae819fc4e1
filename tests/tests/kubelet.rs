//! The loopback kubelet behaves like a node's kubelet where the scenarios depend on it, on every
//! target (the in-process double here; kube-apiserver in `tests/scenarios.sh`): it schedules and
//! runs pods, reports their status, simulates what a test asks for, and finishes deletions.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sandgate_tests::procs::{eventually, get};
use sandgate_tests::stack::sandbox_pod;
use sandgate_tests::target::Target;
use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

async fn create(pods: &Api<Pod>, name: &str, annotations: serde_json::Value) {
    let mut pod = serde_json::to_value(sandbox_pod(name, None, "idle", 8080)).unwrap();
    json_patch::merge(&mut pod, &json!({"metadata": {"annotations": annotations}}));
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
}

/// Waits until `check` holds for the pod's status; returns the pod.
async fn until(pods: &Api<Pod>, name: &str, what: &str, check: impl Fn(&Pod) -> bool) -> Pod {
    eventually(10 * SEC, || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        if check(&p) {
            Ok(p)
        } else {
            Err(format!("{name}: not {what}: {:?}", p.status))
        }
    })
    .await
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}
fn ready(p: &Pod) -> bool {
    p.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}
fn ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}
async fn serves(p: &Pod) -> bool {
    let addr = format!("{}:8080", ip(p)).parse().unwrap();
    get(addr, "x", "/", &[])
        .await
        .is_ok_and(|r| r.pod() == p.metadata.name)
}
async fn annotate(pods: &Api<Pod>, name: &str, key: &str, value: Option<&str>) {
    let patch =
        json!({"metadata": {"annotations": {format!("kubelet.sandgate.dev/{key}"): value}}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn pods_are_scheduled_run_and_report_running_and_ready() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    let pods: Api<Pod> = t.api();
    create(&pods, "p", json!({})).await;
    let p = until(&pods, "p", "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let spec = p.spec.clone().unwrap();
    assert_eq!(
        spec.node_name.as_deref(),
        Some(format!("{}-node", t.namespace).as_str())
    );
    let cs = &p.status.clone().unwrap().container_statuses.unwrap()[0];
    assert!(cs.ready && cs.state.as_ref().unwrap().running.is_some());
    assert!(ip(&p).starts_with("127."), "{}", ip(&p));
    assert!(serves(&p).await);
}

#[tokio::test]
async fn an_exited_container_fails_its_pod_closes_its_ports_and_keeps_its_ip() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    let pods: Api<Pod> = t.api();
    create(&pods, "p", json!({})).await;
    let p = until(&pods, "p", "Running", ready).await;
    assert!(serves(&p).await);
    annotate(&pods, "p", "exit", Some("OOMKilled:137")).await;
    let dead = until(&pods, "p", "Failed", |p| phase(p) == "Failed").await;
    let t_state = dead.status.clone().unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (t_state.exit_code, t_state.reason.as_deref()),
        (137, Some("OOMKilled"))
    );
    assert!(!ready(&dead));
    assert_eq!(ip(&dead), ip(&p), "a terminated pod keeps its IP");
    assert!(!serves(&dead).await, "a dead container still serves");
    // The IP is free for another pod, as Kubernetes would hand it out.
    create(
        &pods,
        "canary",
        json!({"kubelet.sandgate.dev/pod-ip": ip(&p)}),
    )
    .await;
    let canary = until(&pods, "canary", "Running", ready).await;
    assert_eq!(ip(&canary), ip(&p));
    assert!(serves(&canary).await);
}

#[tokio::test]
async fn not_ready_waiting_evicted_and_slow_pods_are_reported_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    let pods: Api<Pod> = t.api();
    create(&pods, "flaky", json!({})).await;
    until(&pods, "flaky", "Ready", ready).await;
    annotate(&pods, "flaky", "ready", Some("false")).await;
    let p = until(&pods, "flaky", "NotReady", |p| !ready(p)).await;
    assert_eq!(phase(&p), "Running");
    assert!(serves(&p).await, "a NotReady container still runs");
    annotate(&pods, "flaky", "ready", None).await;
    until(&pods, "flaky", "Ready again", ready).await;

    create(
        &pods,
        "pull",
        json!({"kubelet.sandgate.dev/waiting": "ErrImagePull: manifest unknown"}),
    )
    .await;
    let p = until(&pods, "pull", "waiting", |p| !ip(p).is_empty()).await;
    assert_eq!(phase(&p), "Pending");
    let w = p.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap();
    assert_eq!(w.reason.as_deref(), Some("ErrImagePull"));
    assert_eq!(w.message.as_deref(), Some("manifest unknown"));

    create(
        &pods,
        "evicted",
        json!({"kubelet.sandgate.dev/evict": "low on memory"}),
    )
    .await;
    let p = until(&pods, "evicted", "Failed", |p| phase(p) == "Failed").await;
    assert_eq!(p.status.unwrap().reason.as_deref(), Some("Evicted"));

    let start = Instant::now();
    create(
        &pods,
        "slow",
        json!({"kubelet.sandgate.dev/start-delay": "1500ms"}),
    )
    .await;
    until(&pods, "slow", "Running", ready).await;
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "started early"
    );

    create(
        &pods,
        "nowhere",
        json!({"kubelet.sandgate.dev/unschedulable": "0/1 nodes are available"}),
    )
    .await;
    let p = until(&pods, "nowhere", "Unschedulable", |p| {
        p.status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .any(|c| c.reason.as_deref() == Some("Unschedulable"))
    })
    .await;
    assert!(p.spec.unwrap().node_name.is_none());
}

#[tokio::test]
async fn deleted_pods_stop_serving_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::start(dir.path()).await;
    let pods: Api<Pod> = t.api();
    create(&pods, "p", json!({})).await;
    let p = until(&pods, "p", "Running", ready).await;
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    // A real API server only marks a bound pod for deletion; the kubelet finishes it.
    eventually(10 * SEC, || async {
        match pods.get_opt("p").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(p) => Err(format!("still there: {:?}", p.metadata.deletion_timestamp)),
        }
    })
    .await;
    assert!(!serves(&p).await, "a deleted pod still serves");
}
