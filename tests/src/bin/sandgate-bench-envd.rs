//! `make bench-envd`: the unmodified E2B Python SDK's `commands.run` and `files` calls through
//! Envoy to sandgate-envd pods (pool `envd`, 10 warm), against sandgate-api and the controller
//! (tests/e2b/bench_envd.py does the timing), then the resident memory of the idle envd daemons.
//! Against the API double by default; set SANDGATE_TEST_KUBECONFIG and SANDGATE_TEST_TARGET=realapi
//! for a real API server.
//!
//! The last line is `RESULT envd run_echo_p50_ms=… run_echo_p99_ms=… run_call_p50_ms=…
//! run_call_p99_ms=… file_50mb_write_mb_s=… file_50mb_read_mb_s=… envd_rss_idle_kb=…`.

use std::process::Stdio;

use sandgate_tests::e2b::{sdk_dir, E2b, PY_NEW};
use sandgate_tests::procs::workspace_root;

/// Resident memory (KiB) of every running sandgate-envd process.
fn envd_rss_kb() -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let name = status.lines().next()?.strip_prefix("Name:")?.trim();
            if name != "sandgate-envd" {
                return None;
            }
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n = args.next().unwrap_or_else(|| "30".into());
    let m = args.next().unwrap_or_else(|| "100".into());
    let e = E2b::start(0, &[]).await;
    e.add_envd_pool(10).await;
    let python = sdk_dir().join(format!("py-{PY_NEW}/bin/python"));
    anyhow::ensure!(
        python.exists(),
        "{} missing: run `make e2b-sdks`",
        python.display()
    );
    let gateway = format!("http://{}", e.cluster.gateways[0].envoy.addr());
    let out = tokio::process::Command::new(python)
        .arg(workspace_root().join("tests/e2b/bench_envd.py"))
        .args([&n, &m])
        .envs(e.sdk_env())
        // envd calls go to the gateway with E2b-Sandbox-Id headers (sandbox.localhost has no DNS).
        .env("E2B_SANDBOX_URL", gateway)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(Stdio::inherit())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "bench_envd.py failed: {stdout}");
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT envd "))
        .ok_or_else(|| anyhow::anyhow!("bench_envd.py printed no RESULT line: {stdout}"))?;
    // The pool's idle daemons, each serving nothing now.
    let mut rss = envd_rss_kb();
    anyhow::ensure!(!rss.is_empty(), "no sandgate-envd process found");
    rss.sort_unstable();
    let median = rss[rss.len() / 2];
    eprintln!(
        "{} idle sandgate-envd daemons: RSS median {median} KiB, max {} KiB",
        rss.len(),
        rss[rss.len() - 1]
    );
    println!("{result} envd_rss_idle_kb={median}");
    Ok(())
}
