//! Flags of sandgate-api. Every flag has an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sandgate_shared::duration::parse_duration;

/// The E2B-compatible REST API: creates, lists, extends and ends sandboxes as SandboxClaims.
#[derive(Debug, Clone, Parser)]
#[command(name = "sandgate-api", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Prints a new API key once, and the Secret (holding only its hash) to apply.
    Keygen(crate::keys::Keygen),
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the REST API (what `E2B_API_URL` points at).
    #[arg(long, env = "SANDGATE_API_ADDR", default_value = "0.0.0.0:3000")]
    pub listen_addr: SocketAddr,

    /// Address of the admin HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "SANDGATE_ADMIN_ADDR", default_value = "0.0.0.0:9093")]
    pub admin_addr: SocketAddr,

    /// Namespace of the pools (templates), claims (sandboxes) and key Secrets.
    #[arg(
        long,
        env = "SANDGATE_API_NAMESPACE",
        default_value = "sandgate-system"
    )]
    pub namespace: String,

    /// The sandbox domain returned to the SDK (`<port>-<id>.<domain>` routes through the
    /// gateway). Without it the SDK uses its own `E2B_DOMAIN`.
    #[arg(long, env = "SANDGATE_SANDBOX_DOMAIN")]
    pub sandbox_domain: Option<String>,

    /// Lifetime of a sandbox whose create names no timeout (E2B's default is 300 s).
    #[arg(long, env = "SANDGATE_DEFAULT_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub default_timeout: Duration,

    /// The longest lifetime create, connect or set_timeout may ask for; more is a 400.
    #[arg(long, env = "SANDGATE_MAX_TIMEOUT", default_value = "24h", value_parser = parse_duration)]
    pub max_timeout: Duration,

    /// How long create waits for a warm pod to be bound before answering 503 (the claim is then
    /// deleted, so nothing binds late).
    #[arg(long, env = "SANDGATE_CREATE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub create_timeout: Duration,

    /// Concurrent sandboxes per team, unless the team's key Secret sets a lower `max-sandboxes`.
    #[arg(long, env = "SANDGATE_TEAM_MAX_SANDBOXES", default_value_t = 100)]
    pub team_max_sandboxes: u32,

    /// Prefix of the pod contract's labels and annotations.
    #[arg(long, env = "SANDGATE_LABEL_PREFIX", default_value = sandgate_shared::contract::DEFAULT_PREFIX)]
    pub label_prefix: String,

    /// Log format: text or json.
    #[arg(long, env = "SANDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// A key (at least 32 bytes) from which secure sandboxes' envd access tokens are derived;
    /// every replica needs the same one. Without it a random key of this process is used, so
    /// `connect` on another replica or after a restart gives a token the sandbox refuses.
    #[arg(long, env = "SANDGATE_ENVD_TOKEN_KEY_FILE")]
    pub envd_token_key_file: Option<std::path::PathBuf>,

    /// The port sandgate-envd listens on in pods of pools annotated `sandgate.dev/e2b-envd:
    /// sandgate`, where create calls its `/init`.
    #[arg(long, env = "SANDGATE_ENVD_PORT", default_value_t = 49983)]
    pub envd_port: u16,
}
