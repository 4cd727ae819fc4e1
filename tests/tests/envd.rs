//! sandgate-envd driven by the unmodified E2B SDKs (Python 2.50 and 2.63, JS 2.51), as the SDKs
//! reach envd in debug mode (`E2B_DEBUG`, `E2B_SANDBOX_URL`) and as a secure sandbox with an
//! access token: commands, files (a 50 MB binary round trip), PTY, watch, and the token refused.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sandgate_tests::e2b::{sdk_dir, JS, PY_NEW, PY_OLD};
use sandgate_tests::procs::{bin_path, free_port, wait_for_tcp, workspace_root};
use tokio::process::{Child, Command};

struct Envd {
    port: u16,
    _child: Child,
    dir: tempfile::TempDir,
}

async fn envd(token: Option<&str>) -> Envd {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin_path("sandgate-envd"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info,sandgate_envd=debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("envd.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("envd.err")).unwrap())
        .kill_on_drop(true);
    if let Some(t) = token {
        let f = dir.path().join("token");
        std::fs::write(&f, t).unwrap();
        cmd.arg("--access-token-file").arg(f);
    }
    let child = cmd.spawn().expect("start sandgate-envd");
    wait_for_tcp(("127.0.0.1", port), Duration::from_secs(10))
        .await
        .expect("sandgate-envd listens");
    Envd {
        port,
        _child: child,
        dir,
    }
}

fn report(what: &str, out: std::process::Output, logs: &Path) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("----- {what} -----\n{text}");
    if !out.status.success() {
        for f in ["envd.log", "envd.err"] {
            if let Ok(l) = std::fs::read_to_string(logs.join(f)) {
                let tail: Vec<_> = l.lines().rev().take(40).collect();
                eprintln!("----- {f} -----");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        panic!("{what} failed:\n{text}");
    }
}

async fn python(version: &str, mode: &str, e: &Envd, token: Option<&str>) {
    let python = sdk_dir().join(format!("py-{version}/bin/python"));
    assert!(
        python.exists(),
        "{} missing: run `make e2b-sdks`",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg(workspace_root().join("tests/e2b/envd.py"))
        .arg(mode)
        .env("E2B_DEBUG", "true")
        .env("E2B_SANDBOX_URL", format!("http://127.0.0.1:{}", e.port))
        .env("SANDGATE_ENVD_VERSION", sandgate_envd::ENVD_VERSION)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(t) = token {
        cmd.env("SANDGATE_ENVD_TOKEN", t);
    }
    let out = cmd.output().await.expect("run the Python SDK");
    report(
        &format!("python e2b {version} envd {mode}"),
        out,
        e.dir.path(),
    );
}

#[tokio::test]
async fn the_python_sdks_run_commands_files_pty_and_watch_on_sandgate_envd() {
    let e = envd(None).await;
    python(PY_NEW, "direct", &e, None).await;
    python(PY_OLD, "direct", &e, None).await;
}

#[tokio::test]
async fn a_secure_sandbox_serves_its_token_and_refuses_calls_without_it() {
    let token = "envd-token-for-this-test";
    let e = envd(Some(token)).await;
    python(PY_NEW, "secure", &e, Some(token)).await;
}

#[tokio::test]
async fn the_js_sdk_runs_commands_files_and_pty_on_sandgate_envd() {
    let e = envd(None).await;
    let dir = sdk_dir().join(format!("js-{JS}"));
    assert!(
        dir.join("node_modules/e2b").exists(),
        "{} missing: run `make e2b-sdks`",
        dir.display()
    );
    let script = dir.join("envd.mjs");
    std::fs::copy(workspace_root().join("tests/e2b/envd.mjs"), &script).expect("copy envd.mjs");
    let out = Command::new("node")
        .arg(&script)
        .env("E2B_DEBUG", "true")
        .env("E2B_SANDBOX_URL", format!("http://127.0.0.1:{}", e.port))
        .current_dir(&dir)
        .output()
        .await
        .expect("run node");
    report(&format!("js e2b {JS} envd"), out, e.dir.path());
}

#[test]
fn the_api_reports_the_envd_version_sandgate_envd_implements() {
    assert_eq!(
        sandgate_api::envd::SANDGATE_ENVD_VERSION,
        sandgate_envd::ENVD_VERSION
    );
}
