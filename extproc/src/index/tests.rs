use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

/// Fixture builder: `pod("p1").sandbox("abc").running("10.0.0.1")`.
struct PodBuilder(Pod);

fn pod(name: &str) -> PodBuilder {
    PodBuilder(Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(Default::default()),
            annotations: Some(Default::default()),
            ..Default::default()
        },
        ..Default::default()
    })
}

impl PodBuilder {
    fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(format!("sandgate.dev/{k}"), v.into());
        self
    }
    fn sandbox(self, id: &str) -> Self {
        self.label("sandbox-id", id)
    }
    fn phase(self, p: &str) -> Self {
        self.label("phase", p)
    }
    /// As the kubelet reports a pod with `ip` whose containers run, Ready or not.
    fn status(mut self, ip: &str, phase: &str, ready: bool) -> Self {
        self.0.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some(ip.into()),
            phase: Some(phase.into()),
            conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        self
    }
    fn ip(self, ip: &str) -> Self {
        self.status(ip, "Running", true)
    }
    fn running(self, ip: &str) -> Self {
        self.phase("running").ip(ip)
    }
    fn port(mut self, p: &str) -> Self {
        self.0
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("sandgate.dev/port".into(), p.into());
        self
    }
    fn deleting(mut self) -> Self {
        self.0.metadata.deletion_timestamp = Some(Time(Default::default()));
        self
    }
    fn route(&self) -> (SandboxKey, PodRoute) {
        route_from_pod(&self.0, &Contract::default(), 0).expect("pod has a sandbox id")
    }
}

#[test]
fn pod_states_map_to_routes() {
    let (k, r) = pod("p")
        .sandbox("abc")
        .running("10.0.0.1")
        .port("8080")
        .route();
    assert_eq!(k.as_str(), "abc");
    assert!(r.is_routable());
    assert_eq!(r.default_port, Some(8080));
    assert_eq!(
        pod("p").sandbox("a").phase("running").route().1.state,
        RouteState::NotReady
    );
    assert_eq!(
        pod("p").sandbox("a").phase("starting").route().1.state,
        RouteState::NotReady
    );
    assert_eq!(
        pod("p")
            .sandbox("a")
            .phase("stopping")
            .ip("1.2.3.4")
            .route()
            .1
            .state,
        RouteState::Gone
    );
    assert_eq!(
        pod("p")
            .sandbox("a")
            .running("1.2.3.4")
            .deleting()
            .route()
            .1
            .state,
        RouteState::Gone
    );
    assert_eq!(
        pod("p").sandbox("a").running("bad-ip").route().1.state,
        RouteState::NotReady
    );
    assert!(route_from_pod(&pod("p").running("1.2.3.4").0, &Contract::default(), 0).is_none());
}

#[test]
fn only_a_running_ready_pod_is_routable() {
    let state = |phase: &str, ready: bool| {
        pod("p")
            .sandbox("a")
            .phase("running")
            .status("10.0.0.1", phase, ready)
            .route()
            .1
            .state
    };
    let cases = [
        ("Running", true, RouteState::Running),
        ("Running", false, RouteState::NotReady),
        ("Pending", false, RouteState::NotReady),
        ("Pending", true, RouteState::NotReady),
        ("Unknown", true, RouteState::NotReady),
        // Exited containers keep the pod's IP, which may already belong to another pod.
        ("Failed", true, RouteState::Terminated),
        ("Failed", false, RouteState::Terminated),
        ("Succeeded", false, RouteState::Terminated),
    ];
    for (phase, ready, want) in cases {
        assert_eq!(state(phase, ready), want, "{phase} ready={ready}");
    }
    let (_, r) = pod("p")
        .sandbox("a")
        .phase("running")
        .status("10.0.0.1", "Failed", false)
        .route();
    assert!(!r.is_routable());
    assert!(route_from_pod(&pod("p").sandbox("Bad_ID").0, &Contract::default(), 0).is_none());
}

#[test]
fn apply_get_delete() {
    let idx = RouteIndex::new();
    let (k, r) = pod("p1").sandbox("abc").running("10.0.0.1").route();
    idx.apply(k, r);
    assert_eq!(idx.get("abc"), Some(r));
    // A delete for another pod does not remove it.
    idx.delete(&k, pod_hash("default", "other"));
    assert!(idx.get("abc").is_some());
    idx.delete(&k, r.pod);
    assert_eq!(idx.get("abc"), None);
}

#[test]
fn another_pods_stale_state_never_displaces_a_routable_one() {
    let idx = RouteIndex::new();
    let (k, live) = pod("p1").sandbox("abc").running("10.0.0.1").route();
    idx.apply(k, live);
    let (_, other) = pod("p2").sandbox("abc").phase("stopping").route();
    idx.apply(k, other);
    assert_eq!(idx.get("abc"), Some(live));
    // The same pod going away does.
    let (_, gone) = pod("p1").sandbox("abc").phase("stopping").route();
    idx.apply(k, gone);
    assert!(!idx.get("abc").unwrap().is_routable());
}

#[test]
fn reset_drops_unseen_entries_of_its_scope_only() {
    let idx = RouteIndex::new();
    let (ka, ra) = pod("a").sandbox("a").running("10.0.0.1").route();
    let (kb, rb) = pod("b").sandbox("b").running("10.0.0.2").route();
    let (kc, mut rc) = pod("c").sandbox("c").running("10.0.0.3").route();
    rc.scope = 1;
    idx.apply(ka, ra);
    idx.apply(kb, rb);
    idx.apply(kc, rc);
    idx.reset(0, &[ka].into_iter().collect());
    assert!(idx.get("a").is_some());
    assert!(idx.get("b").is_none());
    assert!(idx.get("c").is_some(), "other scope untouched");
    assert_eq!(idx.len(), 2);
}

#[test]
fn lookup_racing_a_removal_is_discarded() {
    let idx = RouteIndex::new();
    let (k, r) = pod("p1").sandbox("abc").running("10.0.0.1").route();
    let epoch = idx.epoch();
    idx.apply(k, r);
    idx.delete(&k, r.pod); // the watch removed it while the lookup was in flight
    assert!(!idx.insert_looked_up(k, r, epoch));
    assert_eq!(idx.get("abc"), None);
    // A lookup that saw no removal inserts, but never over a watch entry.
    let epoch = idx.epoch();
    let (_, newer) = pod("p1").sandbox("abc").running("10.0.0.9").route();
    idx.apply(k, newer);
    assert!(idx.insert_looked_up(k, r, epoch));
    assert_eq!(idx.get("abc"), Some(newer));
}

#[test]
fn key_rejects_invalid_ids() {
    assert!(SandboxKey::new("").is_none());
    assert!(SandboxKey::new(&"a".repeat(51)).is_none());
    assert_eq!(SandboxKey::new(&"a".repeat(50)).unwrap().as_str().len(), 50);
}
