//! The API double behaves like the API server where the binaries depend on it, checked through a
//! real kube client over HTTP.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use sandgate_tests::apidouble::ApiDouble;
use sandgate_tests::kubelet::Kubelet;
use sandgate_tests::stack::{client_for, sandbox_pod};
use serde_json::json;

/// The double, with the loopback kubelet running the `default` namespace's pods.
async fn setup() -> ((ApiDouble, Kubelet), tempfile::TempDir, Api<Pod>) {
    let api = ApiDouble::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&api.write_kubeconfig(dir.path()).unwrap()).await;
    let kubelet = Kubelet::start(client.clone(), Some("default"), "node", 201)
        .await
        .unwrap();
    ((api, kubelet), dir, Api::namespaced(client, "default"))
}

fn status_code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn merge_patch_with_a_stale_resource_version_is_a_409() {
    let (_api, _d, pods) = setup().await;
    pods.create(
        &PostParams::default(),
        &sandbox_pod("p", Some("a"), "running", 8080),
    )
    .await
    .unwrap();
    // Let the kubelet's status write land first: it moves the resourceVersion too.
    let p = sandgate_tests::procs::eventually(std::time::Duration::from_secs(5), || async {
        let p = pods.get("p").await.map_err(|e| e.to_string())?;
        if p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some() {
            Ok(p)
        } else {
            Err("no ip yet".into())
        }
    })
    .await;
    let rv = p.metadata.resource_version.clone().unwrap();
    let ok = json!({"metadata": {"resourceVersion": rv, "labels": {"x": "1"}}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&ok))
        .await
        .unwrap();
    let stale = json!({"metadata": {"resourceVersion": rv, "labels": {"x": "2"}}});
    let err = pods
        .patch("p", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert_eq!(status_code(err), 409);
    assert_eq!(
        pods.get("p").await.unwrap().metadata.labels.unwrap()["x"],
        "1",
        "a rejected patch changed state"
    );
}

#[tokio::test]
async fn json_patch_test_operations_guard_the_write() {
    let (_api, _d, pods) = setup().await;
    pods.create(
        &PostParams::default(),
        &sandbox_pod("p", Some("a"), "running", 8080),
    )
    .await
    .unwrap();
    let guarded = |id: &str| -> json_patch::Patch {
        serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/labels/sandgate.dev~1sandbox-id", "value": id},
            {"op": "replace", "path": "/metadata/labels/sandgate.dev~1phase", "value": "stopping"},
        ]))
        .unwrap()
    };
    let err = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Json::<()>(guarded("other")),
        )
        .await
        .unwrap_err();
    assert_eq!(status_code(err), 422);
    assert_eq!(
        pods.get("p").await.unwrap().metadata.labels.unwrap()["sandgate.dev/phase"],
        "running"
    );
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Json::<()>(guarded("a")),
    )
    .await
    .unwrap();
    assert_eq!(
        pods.get("p").await.unwrap().metadata.labels.unwrap()["sandgate.dev/phase"],
        "stopping"
    );
}

#[tokio::test]
async fn watch_with_a_selector_sees_objects_enter_and_leave_it() {
    let (_api, _d, pods) = setup().await;
    let mut events = watcher(
        pods.clone(),
        watcher::Config::default().labels("sandgate.dev/sandbox-id"),
    )
    .boxed();
    assert!(matches!(events.next().await.unwrap().unwrap(), Event::Init));
    assert!(matches!(
        events.next().await.unwrap().unwrap(),
        Event::InitDone
    ));
    pods.create(
        &PostParams::default(),
        &sandbox_pod("p", None, "idle", 8080),
    )
    .await
    .unwrap();
    let claim = json!({"metadata": {"labels": {"sandgate.dev/sandbox-id": "abc"}}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&claim))
        .await
        .unwrap();
    let Event::Apply(p) = events.next().await.unwrap().unwrap() else {
        panic!("expected the claimed pod")
    };
    assert_eq!(p.metadata.name.as_deref(), Some("p"));
    let unclaim = json!({"metadata": {"labels": {"sandgate.dev/sandbox-id": null}}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&unclaim))
        .await
        .unwrap();
    // Leaving the selector is a delete for this watcher (skipping the kubelet's status update).
    loop {
        match events.next().await.unwrap().unwrap() {
            Event::Delete(p) => break assert_eq!(p.metadata.name.as_deref(), Some("p")),
            Event::Apply(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_api, _d, pods) = setup().await;
    let mut pod = sandbox_pod("p", Some("a"), "running", 8080);
    pod.metadata.finalizers = Some(vec!["sandgate.dev/test".into()]);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    let p = pods.get("p").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    let clear = json!({"metadata": {"finalizers": null}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .unwrap();
    assert_eq!(status_code(pods.get("p").await.unwrap_err()), 404);
}

#[tokio::test]
async fn the_kubelet_runs_pods_on_loopback() {
    let (_api, _d, pods) = setup().await;
    pods.create(
        &PostParams::default(),
        &sandbox_pod("p", Some("a"), "running", 8080),
    )
    .await
    .unwrap();
    let ip = sandgate_tests::procs::eventually(std::time::Duration::from_secs(5), || async {
        let p = pods.get("p").await.map_err(|e| e.to_string())?;
        p.status.and_then(|s| s.pod_ip).ok_or("no ip".to_string())
    })
    .await;
    let addr = format!("{ip}:8080").parse().unwrap();
    let r = sandgate_tests::procs::get(addr, "x", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.pod().as_deref(), Some("p"));
}

#[tokio::test]
async fn delete_with_a_stale_resource_version_is_a_409() {
    let (_api, _d, pods) = setup().await;
    let p = pods
        .create(
            &PostParams::default(),
            &sandbox_pod("p", Some("a"), "idle", 8080),
        )
        .await
        .unwrap();
    let old_rv = p.metadata.resource_version.clone();
    // Claimed (changed) after the caller looked.
    let claim = json!({"metadata": {"labels": {"sandgate.dev/phase": "running"}}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&claim))
        .await
        .unwrap();
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: old_rv,
            uid: None,
        }),
        ..Default::default()
    };
    assert_eq!(status_code(pods.delete("p", &dp).await.unwrap_err()), 409);
    assert!(
        pods.get_opt("p").await.unwrap().is_some(),
        "deleted despite the precondition"
    );
}

#[tokio::test]
async fn deleting_a_namespace_deletes_what_is_in_it() {
    let ((api, _kubelet), _d, default_pods) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&api.write_kubeconfig(dir.path()).unwrap()).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": "doomed"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let doomed: Api<Pod> = Api::namespaced(client, "doomed");
    for pods in [&doomed, &default_pods] {
        pods.create(
            &PostParams::default(),
            &sandbox_pod("p", Some("a"), "running", 8080),
        )
        .await
        .unwrap();
    }
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(status_code(doomed.get("p").await.unwrap_err()), 404);
    assert!(
        default_pods.get("p").await.is_ok(),
        "a pod in another namespace went too"
    );
}
