//! The Kubernetes API double as a server of its own, for running the scenarios against an API
//! reached only by kubeconfig (`tests/scenarios.sh double`). Pods run on the loopback kubelet
//! that each scenario starts (`sandgate-kubelet` for other uses):
//!
//! `sandgate-apidouble <kubeconfig path>` serves on an ephemeral loopback port, writes a kubeconfig
//! for it to the path, and runs until Ctrl-C or SIGTERM.

use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("usage: sandgate-apidouble <kubeconfig path>"))?;
    let api = sandgate_tests::apidouble::ApiDouble::start().await?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, sandgate_tests::apidouble::kubeconfig(api.addr))?;
    std::fs::rename(&tmp, &path)?;
    eprintln!(
        "sandgate-apidouble: serving {}; kubeconfig {}",
        api.addr,
        path.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
