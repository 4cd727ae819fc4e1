//! The unmodified E2B SDKs against sandgate-api and the gateway, process level: two pinned
//! Python SDKs (2.50 on the v1 paths, 2.63 on the v2 paths) and the JS SDK, installed by
//! `make e2b-sdks`. The scenarios themselves are tests/e2b/scenario.py and scenario.mjs.

use sandgate_tests::e2b::{E2b, JS, PY_NEW, PY_OLD};

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
    let _ = JS;
    e.node().await;
}
