use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

const T0: u64 = 1_800_000_000;
fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

/// `pod().running("abc").annotated("last-active", at(..))` and so on.
struct P(Pod);
fn pod() -> P {
    let mut p = Pod::default();
    p.metadata.name = Some("p".into());
    p.metadata.namespace = Some("default".into());
    p.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(T0 as i64).unwrap()));
    P(p)
}
impl P {
    fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(format!("sandgate.dev/{k}"), v.into());
        self
    }
    fn running(self, id: &str) -> Self {
        self.label("phase", "running").label("sandbox-id", id)
    }
    fn ann(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(format!("sandgate.dev/{k}"), v.into());
        self
    }
    fn plan(&self, reports: Vec<SystemTime>, now: SystemTime) -> Option<PodPlan> {
        let ten_min = IdleTimeout::After(Duration::from_secs(600));
        plan_pod(
            &self.0,
            &Contract::default(),
            Some(&reports),
            ten_min,
            None,
            now,
        )
    }
}

#[test]
fn a_sandbox_idle_past_its_timeout_is_released() {
    let p = pod().running("abc").plan(vec![at(100)], at(701)).unwrap();
    assert_eq!(
        p.verdict,
        Verdict::Release {
            idle: Duration::from_secs(601)
        }
    );
}

#[test]
fn any_replica_reporting_activity_keeps_it() {
    let p = pod()
        .running("abc")
        .plan(vec![at(100), at(650)], at(701))
        .unwrap();
    assert!(matches!(p.verdict, Verdict::Keep { .. }));
}

#[test]
fn annotation_and_claim_time_count_as_activity() {
    let p = pod()
        .running("abc")
        .ann("last-active", &idle::format_time(at(500)))
        .plan(vec![], at(701))
        .unwrap();
    assert!(matches!(p.verdict, Verdict::Keep { .. }));
    let p = pod()
        .running("abc")
        .ann("claimed-at", &idle::format_time(at(400)))
        .plan(vec![], at(701))
        .unwrap();
    assert!(matches!(p.verdict, Verdict::Keep { .. }));
}

#[test]
fn never_and_per_pod_timeouts() {
    let p = pod()
        .running("abc")
        .ann("idle-timeout", "never")
        .plan(vec![at(0)], at(99_999))
        .unwrap();
    assert_eq!(p.verdict, Verdict::Keep { release_in: None });
    let p = pod()
        .running("abc")
        .ann("idle-timeout", "1m")
        .plan(vec![at(0)], at(61))
        .unwrap();
    assert!(matches!(p.verdict, Verdict::Release { .. }));
}

#[test]
fn only_running_sandboxes_are_planned() {
    assert!(pod().label("phase", "idle").plan(vec![], at(0)).is_none());
    assert!(pod()
        .label("phase", "stopping")
        .label("sandbox-id", "a")
        .plan(vec![], at(0))
        .is_none());
    assert!(pod()
        .label("phase", "running")
        .plan(vec![], at(0))
        .is_none());
}

#[test]
fn annotations_are_written_only_when_they_move_forward_enough() {
    // Refresh is min(60 s, 600 s / 4) = 60 s.
    let p = pod()
        .running("a")
        .ann("last-active", &idle::format_time(at(100)))
        .plan(vec![at(150)], at(160))
        .unwrap();
    assert_eq!(p.annotate, None);
    let p = pod()
        .running("a")
        .ann("last-active", &idle::format_time(at(100)))
        .plan(vec![at(161)], at(170))
        .unwrap();
    assert_eq!(p.annotate, Some(at(161)));
    let p = pod().running("a").plan(vec![], at(170)).unwrap();
    assert_eq!(p.annotate, None, "no report, nothing to write");
}

#[test]
fn the_release_patch_is_guarded() {
    let p = pod()
        .running("abc")
        .ann("claimed-at", "2027-01-15T08:00:00Z")
        .plan(vec![at(0)], at(9999))
        .unwrap();
    let patch = release_patch(&Contract::default(), &p, at(9999));
    let ops = patch.as_array().unwrap();
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/metadata/labels/sandgate.dev~1phase", "value": "running"})
    );
    assert_eq!(
        ops[1],
        json!({"op": "test", "path": "/metadata/labels/sandgate.dev~1sandbox-id", "value": "abc"})
    );
    assert_eq!(
        ops[2]["path"],
        "/metadata/annotations/sandgate.dev~1claimed-at"
    );
    assert!(ops
        .iter()
        .any(|o| o["op"] == "replace" && o["value"] == "stopping"));
    assert!(ops.iter().any(|o| o["value"] == "IdleTimeout"));
}
