use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sandgate_extproc::Config::parse();
    sandgate_extproc::init_tracing(&config.log_format);
    sandgate_extproc::run(config).await
}
