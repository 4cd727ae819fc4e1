//! The extproc control API against a real process: authentication, reports and the cursor form.

use sandgate_shared::control::{
    control_client::ControlClient, EvictRouteRequest, GetLastActiveRequest,
};
use sandgate_tests::procs::TEST_TOKEN;
use sandgate_tests::stack::Stack;
use tonic::transport::Channel;

async fn client(s: &Stack) -> ControlClient<Channel> {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{}", s.extproc.control_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ControlClient::new(ch)
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn calls_without_the_token_are_rejected() {
    let s = Stack::start().await;
    let mut c = client(&s).await;
    let err = c
        .get_last_active(GetLastActiveRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = c
        .get_last_active(authed(GetLastActiveRequest::default(), "wrong-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = c
        .evict_route(authed(
            EvictRouteRequest {
                sandbox_id: "x".into(),
            },
            "",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let ok = c
        .get_last_active(authed(GetLastActiveRequest::default(), TEST_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.warm);
    assert!(!ok.boot_id.is_empty());
}

#[tokio::test]
async fn reports_full_then_only_changes() {
    let s = Stack::start().await;
    s.sandbox("pod-a", "sbx-a", 8080).await;
    s.sandbox("pod-b", "sbx-b", 8080).await;
    for id in ["sbx-a", "sbx-b"] {
        let r = s
            .get(&format!("8080-{id}.sandbox.localhost"), "/", &[])
            .await;
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    let mut c = client(&s).await;
    let full = c
        .get_last_active(authed(GetLastActiveRequest::default(), TEST_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(full.full);
    let mut ids: Vec<_> = full
        .sandboxes
        .iter()
        .map(|x| x.sandbox_id.as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["sbx-a", "sbx-b"]);
    assert!(full.sandboxes.iter().all(|x| x.idle_ms < 10_000));

    assert_eq!(
        s.get("8080-sbx-b.sandbox.localhost", "/", &[]).await.status,
        200
    );
    let req = GetLastActiveRequest {
        cursor: full.cursor,
        boot_id: full.boot_id.clone(),
    };
    let delta = c
        .get_last_active(authed(req, TEST_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(!delta.full);
    let ids: Vec<_> = delta
        .sandboxes
        .iter()
        .map(|x| x.sandbox_id.as_str())
        .collect();
    assert_eq!(ids, ["sbx-b"]);
    // A cursor from another boot gets everything.
    let req = GetLastActiveRequest {
        cursor: delta.cursor,
        boot_id: "someone-else".into(),
    };
    assert!(
        c.get_last_active(authed(req, TEST_TOKEN))
            .await
            .unwrap()
            .into_inner()
            .full
    );
}

#[tokio::test]
async fn evict_route_validates_its_input() {
    let s = Stack::start().await;
    s.sandbox("pod-a", "sbx-a", 8080).await;
    s.until_status(
        "8080-sbx-a.sandbox.localhost",
        200,
        std::time::Duration::from_secs(2),
    )
    .await;
    let mut c = client(&s).await;
    let err = c
        .evict_route(authed(
            EvictRouteRequest {
                sandbox_id: "Not Valid".into(),
            },
            TEST_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let r = c
        .evict_route(authed(
            EvictRouteRequest {
                sandbox_id: "sbx-a".into(),
            },
            TEST_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.evicted);
    let r = c
        .evict_route(authed(
            EvictRouteRequest {
                sandbox_id: "never-seen".into(),
            },
            TEST_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.evicted);
}
