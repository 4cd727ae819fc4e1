use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sandgate_controller::Config::parse();
    sandgate_controller::init_tracing(&config.log_format);
    sandgate_controller::run(config).await
}
