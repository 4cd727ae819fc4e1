use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = sandgate_api::Cli::parse();
    match cli.command {
        Some(sandgate_api::Command::Keygen(k)) => sandgate_api::keys::keygen(&k),
        None => {
            sandgate_api::init_tracing(&cli.config.log_format);
            sandgate_api::run(cli.config).await
        }
    }
}
