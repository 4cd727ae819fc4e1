//! `make bench-e2b`: the unmodified E2B Python SDK's create → first 200 through Envoy, for 100
//! sandboxes one after another, against sandgate-api, the controller, a warm pool of 20 and the
//! gateway (tests/e2b/bench.py does the timing). Against the API double by default; set
//! SANDGATE_TEST_KUBECONFIG and SANDGATE_TEST_TARGET=realapi for a real API server.
//!
//! The last line is `RESULT e2b create_p50_ms=<a> create_p99_ms=<b>`.

use sandgate_tests::e2b::{sdk_dir, E2b, PY_NEW};
use sandgate_tests::procs::workspace_root;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = std::env::args().nth(1).unwrap_or_else(|| "100".into());
    let e = E2b::start(20, &[]).await;
    let python = sdk_dir().join(format!("py-{PY_NEW}/bin/python"));
    anyhow::ensure!(
        python.exists(),
        "{} missing: run `make e2b-sdks`",
        python.display()
    );
    let status = tokio::process::Command::new(python)
        .arg(workspace_root().join("tests/e2b/bench.py"))
        .arg(n)
        .envs(e.sdk_env())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "bench.py failed");
    Ok(())
}
