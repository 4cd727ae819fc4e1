//! Each patch applied to a pod document, as the API server would: it lands on the pod it was
//! built for and is refused (a failed `test`) on one that changed since.

use super::*;
use serde_json::json;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

fn ts(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(secs).unwrap()
}

/// A pod document in `phase`, running `id` if any.
fn pod_doc(phase: &str, id: Option<&str>, annotations: Option<Value>) -> Value {
    let mut labels = json!({"sandgate.dev/phase": phase, "sandgate.dev/pool": "p"});
    if let Some(id) = id {
        labels["sandgate.dev/sandbox-id"] = json!(id);
    }
    let mut meta = json!({"name": "p-1", "namespace": "ns", "labels": labels});
    if let Some(a) = annotations {
        meta["annotations"] = a;
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta})
}

/// `doc` with `patch` applied, or the refusal.
fn apply(doc: &Value, patch: Value) -> Result<Value, String> {
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| e.to_string())?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &patch).map_err(|e| e.to_string())?;
    Ok(out)
}

fn claim(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> SandboxClaim {
    serde_json::from_value(json!({
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
        "metadata": {"name": "c", "namespace": "ns", "uid": "uid-1", "generation": 3,
                     "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"poolName": "p", "timeout": "300s",
                 "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                 "annotations": annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()},
    }))
    .unwrap()
}

fn as_pod(doc: &Value) -> Pod {
    serde_json::from_value(doc.clone()).unwrap()
}

#[test]
fn mark_idle_moves_only_a_starting_pod() {
    let c = Contract::default();
    let out = apply(&pod_doc("starting", None, None), mark_idle(&c)).unwrap();
    assert_eq!(out["metadata"]["labels"]["sandgate.dev/phase"], "idle");
    for phase in ["idle", "running", "stopping"] {
        assert!(
            apply(&pod_doc(phase, None, None), mark_idle(&c)).is_err(),
            "{phase} pod marked idle"
        );
    }
}

#[test]
fn bind_claims_only_an_idle_pod_and_carries_the_claim() {
    let c = Contract::default();
    let claim = claim(
        &[("team", "a"), ("sandgate.dev/sandbox-id", "spoofed")],
        &[("note", "x")],
    );
    let idle = pod_doc("idle", None, None);
    let patch = bind(&c, &claim, &as_pod(&idle), "sbx-1", Some("90s"), at(60));
    let out = apply(&idle, patch.clone()).unwrap();
    let (labels, ann) = (&out["metadata"]["labels"], &out["metadata"]["annotations"]);
    assert_eq!(labels["sandgate.dev/phase"], "running");
    assert_eq!(
        labels["sandgate.dev/sandbox-id"], "sbx-1",
        "a claim label cannot set the ID"
    );
    assert_eq!(labels["team"], "a");
    assert_eq!(ann["sandgate.dev/claim"], "ns/c");
    assert_eq!(ann["sandgate.dev/claim-uid"], "uid-1");
    assert_eq!(ann["sandgate.dev/idle-timeout"], "90s");
    assert_eq!(ann["sandgate.dev/claimed-at"], "1970-01-01T00:01:00Z");
    assert_eq!(ann["note"], "x");
    // Another claim got there first: the second bind is refused, whatever the pod now holds.
    assert!(apply(&out, patch).is_err(), "a claimed pod bound twice");
    // A pod that already has annotations keeps them.
    let annotated = pod_doc("idle", None, Some(json!({"keep": "me"})));
    let out = apply(
        &annotated,
        bind(&c, &claim, &as_pod(&annotated), "sbx-2", None, at(0)),
    )
    .unwrap();
    assert_eq!(out["metadata"]["annotations"]["keep"], "me");
    assert!(out["metadata"]["annotations"]
        .get("sandgate.dev/idle-timeout")
        .is_none());
}

#[test]
fn a_release_touches_only_the_sandbox_it_names() {
    let c = Contract::default();
    let running = pod_doc("running", Some("sbx-1"), Some(json!({})));
    let out = apply(&running, release(&c, "sbx-1", "Timeout", at(5))).unwrap();
    assert_eq!(out["metadata"]["labels"]["sandgate.dev/phase"], "stopping");
    assert_eq!(
        out["metadata"]["annotations"]["sandgate.dev/stop-reason"],
        "Timeout"
    );
    assert!(
        apply(&running, release(&c, "sbx-2", "Timeout", at(5))).is_err(),
        "released a pod re-claimed by another sandbox"
    );
    assert!(apply(&out, release(&c, "sbx-1", "Timeout", at(6))).is_err());
}

#[test]
fn the_idle_release_is_pinned_to_the_claim_it_judged() {
    let c = Contract::default();
    let claimed = "2026-12-01T00:00:00Z";
    let doc = pod_doc(
        "running",
        Some("sbx-1"),
        Some(json!({"sandgate.dev/claimed-at": claimed})),
    );
    let p = IdlePod {
        sandbox_id: "sbx-1",
        claimed_at: Some(claimed),
        has_annotations: true,
        last_active: at(100),
    };
    let out = apply(&doc, idle_release(&c, &p, at(200))).unwrap();
    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["sandgate.dev/stop-reason"], "IdleTimeout");
    assert_eq!(ann["sandgate.dev/last-active"], "1970-01-01T00:01:40Z");
    assert_eq!(ann["sandgate.dev/stopped-at"], "1970-01-01T00:03:20Z");
    // Released and claimed again (same ID is impossible, but a new claim time is not).
    let reclaimed = pod_doc(
        "running",
        Some("sbx-1"),
        Some(json!({"sandgate.dev/claimed-at": "2026-12-01T00:05:00Z"})),
    );
    assert!(apply(&reclaimed, idle_release(&c, &p, at(200))).is_err());
    // A pod without annotations gets the map first.
    let bare = pod_doc("running", Some("sbx-1"), None);
    let p = IdlePod {
        claimed_at: None,
        has_annotations: false,
        ..p
    };
    assert!(apply(&bare, idle_release(&c, &p, at(200))).is_ok());
}

#[test]
fn a_pool_status_patch_removes_phases_that_have_no_pods() {
    let mut before = SandboxPoolStatus::default();
    before.replicas.insert("idle".into(), 3);
    before.replicas.insert("starting".into(), 1);
    let mut now = SandboxPoolStatus::default();
    now.replicas.insert("idle".into(), 4);
    let patch = pool_status(Some(&before), &now);
    assert_eq!(
        patch["status"]["replicas"],
        json!({"idle": 4, "starting": null})
    );
    let patch = pool_status(None, &now);
    assert_eq!(patch["status"]["replicas"], json!({"idle": 4}));
}

#[test]
fn claim_statuses() {
    let claim = claim(&[], &[]);
    let b = bound(
        &claim,
        "p-1",
        Some("10.0.0.7"),
        "sbx-1",
        Some("sandbox.example.com"),
        ts(10),
    );
    assert_eq!(b.phase, ClaimPhase::Bound);
    assert_eq!(b.url.as_deref(), Some("sbx-1.sandbox.example.com"));
    assert_eq!(b.pod_ip.as_deref(), Some("10.0.0.7"));
    assert_eq!(
        b.expires_at.map(|t| t.0.to_string()).as_deref(),
        Some("2026-12-01T00:05:00Z"),
        "creation + spec.timeout"
    );
    assert_eq!(b.conditions[0].status, "True");
    assert_eq!(b.conditions[0].observed_generation, Some(3));
    let p = pending(&claim, "NoIdlePod", "waiting".into(), ts(10));
    assert_eq!(
        (p.phase, p.conditions[0].status.as_str()),
        (ClaimPhase::Pending, "False")
    );
    let r = refused(&claim, "spec.labels: bad".into(), ts(10));
    assert_eq!(r.phase, ClaimPhase::Failed);
    assert_eq!(r.conditions[0].reason, "InvalidSpec");
    assert_eq!(
        claim_status(&r)["status"]["phase"],
        "Failed",
        "a merge patch of the status"
    );
}

#[test]
fn death_records() {
    let oom: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p-1"},
        "spec": {"containers": [{"name": "a", "image": "img:1"}, {"name": "b", "image": "img:1"}, {"name": "c", "image": "side:2"}]},
        "status": {"phase": "Failed", "containerStatuses": [
            {"name": "a", "image": "img:1", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-12-01T00:00:07Z"}}}]},
    }))
    .unwrap();
    let r = death_record(&oom, ts(100));
    assert_eq!(r.reason, "OOMKilled");
    assert_eq!(r.exit_code, Some(137));
    assert_eq!(r.stopped_at.0.to_string(), "2026-12-01T00:00:07Z");
    assert_eq!(r.images, ["img:1", "side:2"]);
    let evicted: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p-1"},
        "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"},
    }))
    .unwrap();
    let r = death_record(&evicted, ts(100));
    assert_eq!(
        (r.reason.as_str(), r.message.as_deref(), r.exit_code),
        ("Evicted", Some("low on memory"), None)
    );
    assert_eq!(r.stopped_at.0, ts(100), "no finish time: now");
}

#[test]
fn release_records_read_the_pod() {
    let c = Contract::default();
    let doc = pod_doc(
        "stopping",
        Some("sbx-1"),
        Some(json!({
            "sandgate.dev/stop-reason": "IdleTimeout",
            "sandgate.dev/stopped-at": "2026-12-01T00:10:00Z",
            "sandgate.dev/last-active": "2026-12-01T00:00:00Z",
        })),
    );
    let r = release_record(&c, Some(&as_pod(&doc)), ts(0));
    assert_eq!(r.reason, "IdleTimeout");
    assert_eq!(r.stopped_at.0.to_string(), "2026-12-01T00:10:00Z");
    assert_eq!(r.last_active.as_deref(), Some("2026-12-01T00:00:00Z"));
    let r = release_record(&c, None, ts(0));
    assert_eq!((r.reason.as_str(), r.stopped_at.0), ("PodGone", ts(0)));
}
