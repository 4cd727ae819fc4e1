//! The unmodified E2B SDKs against sandgate-api and the gateway, process level: two pinned
//! Python SDKs (2.50 on the v1 paths, 2.63 on the v2 paths) and the JS SDK, installed by
//! `make e2b-sdks`. The scenarios themselves are tests/e2b/scenario.py and scenario.mjs.

use sandgate_tests::e2b::{E2b, PY_NEW, PY_OLD};

#[tokio::test]
async fn python_sdk_lifecycle_on_the_v1_and_v2_paths() {
    let e = E2b::start(5, &[]).await;
    e.python(PY_OLD, "lifecycle").await;
    e.python(PY_NEW, "lifecycle").await;
}

#[tokio::test]
async fn a_shortened_timeout_releases_the_sandbox_at_expiry() {
    let e = E2b::start(2, &[]).await;
    e.python(PY_NEW, "timeout").await;
    e.python(PY_OLD, "timeout").await;
}

#[tokio::test]
async fn the_sandbox_url_header_mode_routes() {
    let e = E2b::start(2, &[]).await;
    e.python(PY_NEW, "header-mode").await;
    e.python(PY_OLD, "header-mode").await;
}

#[tokio::test]
async fn another_team_sees_not_found_and_a_bad_key_gets_401() {
    let e = E2b::start(2, &[]).await;
    e.python(PY_NEW, "teams").await;
    e.python(PY_OLD, "teams").await;
}

#[tokio::test]
async fn js_sdk_creates_lists_and_kills() {
    let e = E2b::start(2, &[]).await;
    e.node().await;
}

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use sandgate_controller::crd::{SandboxClaim, SandboxPool};
use sandgate_tests::procs::{eventually, request, Reply};
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);

/// Calls the API as team a (or with `key`).
async fn call(e: &E2b, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> Reply {
    let key = key.unwrap_or(&e.key).to_string();
    request(
        ([127, 0, 0, 1], e.api_port).into(),
        method,
        path,
        &[
            ("X-API-KEY", &key),
            ("lang_version", "3.11"),
            ("sdk_runtime", "python"),
        ],
        body,
    )
    .await
    .expect("request to sandgate-api")
}

fn assert_error(r: &Reply, status: u16, contains: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(
        r.headers["content-type"], "application/json",
        "{:?}",
        r.headers
    );
    let b = r.json();
    assert_eq!(b["code"], status, "{}", r.body);
    assert!(
        b["message"].as_str().is_some_and(|m| m.contains(contains)),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn every_error_is_json_with_code_and_message() {
    let e = E2b::start(1, &["--max-timeout", "1h"]).await;
    assert_error(
        &call(&e, "GET", "/templates", None, None).await,
        404,
        "no such endpoint",
    );
    assert_error(
        &call(&e, "PUT", "/v2/sandboxes", None, None).await,
        405,
        "not allowed",
    );
    assert_error(
        &call(&e, "GET", "/v2/sandboxes", Some(""), None).await,
        401,
        "missing X-API-KEY",
    );
    assert_error(
        &call(
            &e,
            "GET",
            "/v2/sandboxes",
            Some(&format!("e2b_{}", "1".repeat(40))),
            None,
        )
        .await,
        401,
        "invalid API key",
    );
    let create = |body: Value| call(&e, "POST", "/v2/sandboxes", None, Some(body));
    assert_error(
        &create(json!({"templateID": "nope"})).await,
        400,
        "template \"nope\" not found",
    );
    assert_error(
        &create(json!({"templateID": "base", "autoPause": true})).await,
        400,
        "autoPause",
    );
    assert_error(
        &create(json!({"templateID": "base", "timeout": 7200})).await,
        400,
        "maximum of 3600s",
    );
    assert_error(
        &create(json!({"template": "base"})).await,
        400,
        "invalid request body",
    );
    for what in ["pause", "resume", "snapshots", "metrics"] {
        let method = if what == "metrics" { "GET" } else { "POST" };
        let r = call(
            &e,
            method,
            &format!("/sandboxes/sbx-x/{what}"),
            None,
            Some(json!({})),
        )
        .await;
        assert_error(&r, 501, "not");
        assert_eq!(r.headers["should-retry"], "false");
    }
    assert_error(
        &call(&e, "GET", "/sandboxes/sbx-nobody", None, None).await,
        404,
        "not found",
    );
    // An alias names the pool; the answer has every field the SDK requires.
    let r = create(json!({"templateID": "code-interpreter-v1", "metadata": {"a": "b"}})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let s = r.json();
    for k in ["templateID", "sandboxID", "clientID", "envdVersion"] {
        assert!(s[k].is_string(), "{k}: {s}");
    }
    assert_eq!(
        (s["templateID"].as_str(), s["alias"].as_str()),
        (Some("base"), Some("code-interpreter-v1"))
    );
    assert_eq!(s["domain"], "sandbox.localhost");
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_sandbox_and_teams_are_capped() {
    let e = E2b::start(3, &["--team-max-sandboxes", "2"]).await;
    let api = ([127, 0, 0, 1], e.api_port).into();
    let create = |key: &'static str| {
        let k = e.key.clone();
        async move {
            request(
                api,
                "POST",
                "/v2/sandboxes",
                &[("X-API-KEY", &k), ("Idempotency-Key", key)],
                Some(json!({"templateID": "base"})),
            )
            .await
            .unwrap()
        }
    };
    let (a, b) = tokio::join!(create("run-1"), create("run-1"));
    assert_eq!((a.status, b.status), (201, 201), "{} {}", a.body, b.body);
    assert_eq!(a.json()["sandboxID"], b.json()["sandboxID"]);
    let c = create("run-2").await;
    assert_eq!(c.status, 201, "{}", c.body);
    assert_ne!(c.json()["sandboxID"], a.json()["sandboxID"]);
    // Two live sandboxes: the team's cap.
    let r = call(
        &e,
        "POST",
        "/v2/sandboxes",
        None,
        Some(json!({"templateID": "base"})),
    )
    .await;
    assert_error(&r, 429, "its limit");
    assert_eq!(r.headers["should-retry"], "false");
    // Another team is not capped by team a, and a kill frees a place.
    let other = e.other_key.clone();
    let r = call(
        &e,
        "POST",
        "/v2/sandboxes",
        Some(&other),
        Some(json!({"templateID": "base"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = c.json()["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(
        call(&e, "DELETE", &format!("/sandboxes/{id}"), None, None)
            .await
            .status,
        204
    );
    eventually(10 * SEC, || async {
        let r = call(
            &e,
            "POST",
            "/v2/sandboxes",
            None,
            Some(json!({"templateID": "base"})),
        )
        .await;
        if r.status == 201 {
            Ok(())
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await;
}

#[tokio::test]
async fn env_vars_reach_the_pod_and_a_pool_can_refuse_them() {
    let e = E2b::start(1, &[]).await;
    let r = call(
        &e,
        "POST",
        "/v2/sandboxes",
        None,
        Some(json!({"templateID": "base", "envVars": {"TOKEN": "t0k", "MODE": "x"}})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    let pods: Api<Pod> = e.cluster.target.api();
    let pod = pods
        .list(&kube::api::ListParams::default().labels(&format!("sandgate.dev/sandbox-id={id}")))
        .await
        .unwrap()
        .items
        .remove(0);
    let env: Value =
        serde_json::from_str(&pod.metadata.annotations.unwrap()["e2b.sandgate.dev/env-vars"])
            .unwrap();
    assert_eq!(env, json!({"TOKEN": "t0k", "MODE": "x"}));
    let pools: Api<SandboxPool> = e.cluster.target.api();
    let optout = json!({"metadata": {"annotations": {"sandgate.dev/e2b-env-vars": "false"}}});
    pools
        .patch("base", &PatchParams::default(), &Patch::Merge(&optout))
        .await
        .unwrap();
    eventually(5 * SEC, || async {
        let r = call(
            &e,
            "POST",
            "/v2/sandboxes",
            None,
            Some(json!({"templateID": "base", "envVars": {"A": "1"}})),
        )
        .await;
        if r.status == 400 && r.body.contains("does not accept envVars") {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await;
}

#[tokio::test]
async fn connect_only_extends_and_set_timeout_may_shorten() {
    let e = E2b::start(1, &[]).await;
    let r = call(
        &e,
        "POST",
        "/sandboxes",
        None,
        Some(json!({"templateID": "base", "timeout": 600})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    let end = |r: Reply| jiff::Timestamp::from_str(r.json()["endAt"].as_str().unwrap()).unwrap();
    use std::str::FromStr;
    let first = end(call(&e, "GET", &format!("/sandboxes/{id}"), None, None).await);
    let r = call(
        &e,
        "POST",
        &format!("/sandboxes/{id}/connect"),
        None,
        Some(json!({"timeout": 60})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        end(call(&e, "GET", &format!("/sandboxes/{id}"), None, None).await),
        first,
        "connect shortened the lifetime"
    );
    let r = call(
        &e,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        None,
        Some(json!({"timeout": 3600})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let longer = end(call(&e, "GET", &format!("/sandboxes/{id}"), None, None).await);
    assert!(longer > first);
    let r = call(
        &e,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        None,
        Some(json!({"timeout": 30})),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let shorter = end(call(&e, "GET", &format!("/sandboxes/{id}"), None, None).await);
    assert!(shorter < first);
    // kubectl users see the same expiry on the claim.
    let claims: Api<SandboxClaim> = e.cluster.target.api();
    eventually(5 * SEC, || async {
        let c = claims
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?
            .items;
        let at = c[0]
            .status
            .as_ref()
            .and_then(|s| s.expires_at.clone())
            .map(|t| t.0);
        if at == Some(shorter) {
            Ok(())
        } else {
            Err(format!("status.expiresAt {at:?}, want {shorter}"))
        }
    })
    .await;
}

#[tokio::test]
async fn a_create_no_warm_pod_can_answer_is_a_503_and_leaves_no_claim() {
    let e = E2b::start(0, &["--create-timeout", "2s"]).await;
    let r = call(
        &e,
        "POST",
        "/v2/sandboxes",
        None,
        Some(json!({"templateID": "base"})),
    )
    .await;
    assert_error(&r, 503, "no warm sandbox was available within 2s");
    let claims: Api<SandboxClaim> = e.cluster.target.api();
    eventually(10 * SEC, || async {
        let n = claims
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} claims left"))
        }
    })
    .await;
}

/// A kill answers once the sandbox is unreachable: the controller evicts its route from every
/// gateway (whose Envoy confirms dropping the hot route) before the claim's finalizer goes, and
/// the API waits for the claim to be gone.
#[tokio::test]
async fn a_killed_sandbox_is_unreachable_when_the_kill_answers() {
    let e = E2b::start(1, &[]).await;
    let r = call(
        &e,
        "POST",
        "/v2/sandboxes",
        None,
        Some(json!({"templateID": "base"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    let host = format!("8080-{id}.{}", sandgate_tests::stack::DOMAIN);
    let gw = &e.cluster.gateways[0];
    if sandgate_tests::stack::fast_path() {
        sandgate_tests::stack::until_hot(&gw.extproc, &gw.envoy, &host, 10 * SEC).await;
    } else {
        eventually(10 * SEC, || async {
            let r = e.cluster.get(0, &host).await;
            (r.status == 200)
                .then_some(())
                .ok_or(format!("{} {}", r.status, r.body))
        })
        .await;
    }
    let confirmed = "sandgate_extproc_fast_path_evictions_total{result=\"confirmed\"}";
    assert_eq!(gw.extproc.metric(confirmed).await, 0.0);

    let r = call(&e, "DELETE", &format!("/sandboxes/{id}"), None, None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let held = gw.envoy.hot_hosts().await;
    assert!(!held.contains(&host), "envoy still holds {host}: {held:?}");
    let r = e.cluster.get(0, &host).await;
    assert_ne!(r.status, 200, "the killed sandbox answered: {}", r.body);
    assert!(
        gw.extproc.metric(confirmed).await >= 1.0,
        "the controller did not evict the route before the claim went"
    );
}

#[tokio::test]
async fn the_sdk_reaches_sandgate_envd_through_the_gateway_with_the_token_the_api_gave() {
    let e = E2b::start(0, &[]).await;
    e.add_envd_pool(1).await;
    // The SDK sends envd calls to E2B_SANDBOX_URL (the gateway) with E2b-Sandbox-Id headers.
    let gateway = format!("http://{}", e.cluster.gateways[0].envoy.addr());
    e.python_script(
        PY_NEW,
        "envd.py",
        &["sandbox"],
        &[
            ("E2B_SANDBOX_URL", gateway),
            ("SANDGATE_ENVD_BIG_MB", "50".to_string()),
        ],
    )
    .await;
}
