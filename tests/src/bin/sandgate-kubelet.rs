//! The loopback kubelet as a program: `sandgate-kubelet --kubeconfig <path> [--namespace <ns>]`
//! registers a Node and runs the pods it schedules there on loopback addresses (see
//! `sandgate_tests::kubelet`), against any API server, until Ctrl-C or SIGTERM.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The API server's kubeconfig.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: std::path::PathBuf,
    /// Only this namespace's pods (default: every namespace).
    #[arg(long)]
    namespace: Option<String>,
    /// The Node's name.
    #[arg(long, default_value = "sandgate-kubelet")]
    node: String,
    /// Pod IPs come from 127.<net>.0.0/16.
    #[arg(long, default_value_t = 77)]
    net: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let client = sandgate_tests::stack::client_for(&args.kubeconfig).await;
    let _kubelet = sandgate_tests::kubelet::Kubelet::start(
        client,
        args.namespace.as_deref(),
        &args.node,
        args.net,
    )
    .await?;
    eprintln!("sandgate-kubelet: node {} running pods", args.node);
    sandgate_tests::procs::ctrl_c().await;
    Ok(())
}
