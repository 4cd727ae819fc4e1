use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sandgate_controller::Config::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    sandgate_controller::run(config).await
}
