//! Flags of sandgate-controller. Every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sandgate_shared::duration::parse_duration;

/// Releases idle sandboxes and keeps warm pools full.
#[derive(Debug, Clone, Parser)]
#[command(name = "sandgate-controller", version)]
pub struct Config {
    /// Namespaces whose sandbox pods are managed. Comma-separated; empty means all.
    #[arg(long = "namespace", env = "SANDGATE_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Prefix of the pod contract's labels and annotations.
    #[arg(long, env = "SANDGATE_LABEL_PREFIX", default_value = sandgate_shared::contract::DEFAULT_PREFIX)]
    pub label_prefix: String,

    /// How often the idle-timeout reconciler runs.
    #[arg(long, env = "SANDGATE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Idle timeout of sandboxes with no `idle-timeout` annotation and no pool default
    /// (`0` or `never`: never released).
    #[arg(long, env = "SANDGATE_DEFAULT_IDLE_TIMEOUT", default_value = "15m")]
    pub default_idle_timeout: String,

    /// How far last-active must move before the annotation is rewritten. Default: min(60s, timeout/4).
    #[arg(long, env = "SANDGATE_REFRESH_INTERVAL", value_parser = parse_duration)]
    pub refresh_interval: Option<Duration>,

    /// The extproc control Service whose EndpointSlices list the replicas to poll.
    #[arg(
        long,
        env = "SANDGATE_EXTPROC_SERVICE",
        default_value = "sandgate-extproc-control"
    )]
    pub extproc_service: String,

    /// Namespace of the extproc control Service.
    #[arg(
        long,
        env = "SANDGATE_EXTPROC_NAMESPACE",
        default_value = "sandgate-system"
    )]
    pub extproc_namespace: String,

    /// Name of the control port in the Service's EndpointSlices.
    #[arg(long, env = "SANDGATE_EXTPROC_PORT_NAME", default_value = "control")]
    pub extproc_port_name: String,

    /// File holding the control API's bearer token.
    #[arg(long, env = "SANDGATE_CONTROL_TOKEN_FILE")]
    pub control_token_file: PathBuf,

    /// Time limit of one replica's answer. A tick never waits longer than this for any replica.
    #[arg(long, env = "SANDGATE_POLL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub poll_timeout: Duration,

    /// How often each replica is asked for a full report rather than what changed since the
    /// last one: anything an incremental report missed is put right within this.
    #[arg(long, env = "SANDGATE_FULL_REPORT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub full_report_interval: Duration,

    /// Pod writes (annotations, releases) in flight at once.
    #[arg(long, env = "SANDGATE_WRITE_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub write_concurrency: u32,

    /// Global limit on pod writes per second.
    #[arg(long, env = "SANDGATE_WRITE_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub write_rate: u32,

    /// Elect a leader with a Lease (turn off only for a single replica).
    #[arg(long, env = "SANDGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the Lease.
    #[arg(
        long,
        env = "SANDGATE_LEASE_NAME",
        default_value = "sandgate-controller"
    )]
    pub lease_name: String,

    /// Namespace of the Lease.
    #[arg(
        long,
        env = "SANDGATE_LEASE_NAMESPACE",
        default_value = "sandgate-system"
    )]
    pub lease_namespace: String,

    /// Lease duration: a standby takes over this long after the leader stops renewing.
    #[arg(long, env = "SANDGATE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "sandgate-controller")]
    pub identity: String,
    /// Run the SandboxPool and SandboxClaim reconcilers.
    #[arg(long, env = "SANDGATE_POOLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pools: bool,

    /// An idle pool pod whose Ready condition stays False this long is replaced.
    #[arg(long, env = "SANDGATE_NOT_READY_GRACE", default_value = "60s", value_parser = sandgate_shared::duration::parse_duration)]
    pub not_ready_grace: std::time::Duration,

    /// Domain of the sandbox hosts, for claims' `status.url` (`<id>.<domain>`).
    #[arg(long, env = "SANDGATE_SANDBOX_DOMAIN")]
    pub sandbox_domain: Option<String>,

    /// Address of the admin HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "SANDGATE_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,

    /// Log format: text or json.
    #[arg(long, env = "SANDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}
