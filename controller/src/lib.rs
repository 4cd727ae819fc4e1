//! sandgate-controller: the control plane.
//!
//! This build has the binary's shell only: configuration, logging, a Kubernetes client check and
//! health endpoints. The idle-timeout reconciler (issue 4) and the pool and claim reconcilers
//! (issue 5) are not written yet; the binary says so at start rather than pretending to work.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use clap::Parser;

/// Flags of sandgate-controller. Every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "sandgate-controller", version)]
pub struct Config {
    /// Log format: text or json.
    #[arg(long, env = "SANDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(_config: Config) -> anyhow::Result<()> {
    tracing::warn!("sandgate-controller: no reconcilers in this build yet (idle release and pools are pending)");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
