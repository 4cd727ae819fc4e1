//! Flags of sandgate-extproc. Every flag has an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sandgate_shared::duration::parse_duration;

/// Envoy external processor that routes sandbox traffic to the pod that claimed the sandbox.
#[derive(Debug, Clone, Parser)]
#[command(name = "sandgate-extproc", version)]
pub struct Config {
    /// Address of the ext_proc gRPC server Envoy calls.
    #[arg(long, env = "SANDGATE_GRPC_ADDR", default_value = "127.0.0.1:9001")]
    pub grpc_addr: SocketAddr,

    /// Address of the admin HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "SANDGATE_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Domain suffixes whose hosts name sandboxes: `<port>-<id>.<domain>` or `<id>.<domain>`.
    /// Comma-separated. Without one, only the header and path forms are accepted.
    #[arg(long = "domain", env = "SANDGATE_DOMAINS", value_delimiter = ',')]
    pub domains: Vec<String>,

    /// Port used when neither the request nor the pod's `port` annotation names one.
    #[arg(long, env = "SANDGATE_DEFAULT_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub default_port: Option<u16>,

    /// Namespaces whose pods are watched. Comma-separated; empty means all namespaces.
    #[arg(long = "namespace", env = "SANDGATE_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Prefix of the pod contract's labels and annotations.
    #[arg(long, env = "SANDGATE_LABEL_PREFIX", default_value = sandgate_shared::contract::DEFAULT_PREFIX)]
    pub label_prefix: String,

    /// How long an ID the API does not know is remembered as unknown.
    #[arg(long, env = "SANDGATE_NEGATIVE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub negative_ttl: Duration,

    /// Time limit of an API lookup on an index miss. Keep it below Envoy's ext_proc message_timeout.
    #[arg(long, env = "SANDGATE_LOOKUP_TIMEOUT", default_value = "1500ms", value_parser = parse_duration)]
    pub lookup_timeout: Duration,

    /// How long shutdown waits for in-flight streams after readiness turns false.
    #[arg(long, env = "SANDGATE_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Address of the control API (gRPC) the controller polls.
    #[arg(long, env = "SANDGATE_CONTROL_ADDR", default_value = "0.0.0.0:9002")]
    pub control_addr: SocketAddr,

    /// File holding the control API's bearer token (mounted from a Secret). Required: the control
    /// API never runs unauthenticated.
    #[arg(long, env = "SANDGATE_CONTROL_TOKEN_FILE")]
    pub control_token_file: std::path::PathBuf,

    /// This replica's name in reports (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "sandgate-extproc")]
    pub replica_name: String,

    /// An open stream with no periodic access-log entry for this long is taken as closed, unless
    /// its Envoy names its access_log_flush_interval in node metadata (then three intervals and
    /// 2 s). Must be well above Envoy's access_log_flush_interval.
    #[arg(long, env = "SANDGATE_STREAM_EXPIRY", default_value = "120s", value_parser = parse_duration)]
    pub stream_expiry: Duration,

    /// Most long-lived streams (WebSockets, SSE, long polls) one sandbox may hold open on this
    /// replica. A new upgrade beyond it is answered at once with a 429 JSON error and
    /// `retry-after`, so one sandbox cannot use up the gateway; other requests are unaffected.
    #[arg(long, env = "SANDGATE_MAX_STREAMS_PER_SANDBOX", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_sandbox: u32,

    /// The sandboxes' envd port (E2B's 49983): only the paths the SDK calls (`/health`, `/files`,
    /// the process and filesystem RPCs) are routed there, envd's internal ones (`/init`, ...)
    /// answer 403 on every method, and its hosts are never hot. `0` treats it as any other port.
    #[arg(long, env = "SANDGATE_ENVD_PORT", default_value_t = 49983)]
    pub envd_port: u16,

    /// Envoy's admin address in the same pod, used by `/drain` and `/ready/envoy`.
    #[arg(long, env = "SANDGATE_ENVOY_ADMIN", default_value = "127.0.0.1:9901")]
    pub envoy_admin: SocketAddr,

    /// On `/drain`: how long Envoy keeps serving new requests after turning unready (time for the
    /// Service's endpoints to drop the pod).
    #[arg(long, env = "SANDGATE_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// On `/drain`: the longest wait for Envoy's client connections to close. Keep delay plus
    /// timeout below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "SANDGATE_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Fast path: serve hot sandbox hosts to Envoy over xDS (on the ext_proc port), so their
    /// requests are routed inside Envoy with no ext_proc call. `false` sends every request through
    /// ext_proc (Envoy's ADS stream is still answered, with no route).
    #[arg(long, env = "SANDGATE_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,

    /// Most hot sandbox hosts held in Envoy (its memory grows by about 6 KB per host). Past it, the
    /// hosts of the least recently active sandboxes go back to the ext_proc path.
    #[arg(long, env = "SANDGATE_FAST_PATH_MAX_ROUTES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub fast_path_max_routes: u32,

    /// How long Envoy keeps using hot routes after sandgate stops confirming them (dead, hung,
    /// disconnected, or Envoy slow to apply an update); confirmed every quarter of it. Then every
    /// request goes through ext_proc again.
    #[arg(long, env = "SANDGATE_FAST_PATH_TTL", default_value = "1s", value_parser = parse_duration)]
    pub fast_path_ttl: Duration,

    /// How long hot-route changes are gathered into one update (each update rebuilds Envoy's
    /// route table). Keep it well under a second: a release reaches Envoy after it.
    #[arg(long, env = "SANDGATE_FAST_PATH_BATCH", default_value = "50ms", value_parser = parse_duration)]
    pub fast_path_batch: Duration,

    /// How often Envoy's per-host request counters are read for activity on hot routes. Keep it
    /// well under the shortest idle timeout.
    #[arg(long, env = "SANDGATE_FAST_PATH_ACTIVITY_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub fast_path_activity_interval: Duration,

    /// The ORIGINAL_DST cluster hot routes send to (it reads `--fast-path-header`); only hot
    /// routes may reach it. Must match the Envoy config.
    #[arg(
        long,
        env = "SANDGATE_FAST_PATH_CLUSTER",
        default_value = "sandbox_pods_fast"
    )]
    pub fast_path_cluster: String,

    /// The HTTP/2 twin of `--fast-path-cluster`: gRPC and ports the sandbox declares h2c go there.
    #[arg(
        long,
        env = "SANDGATE_FAST_PATH_CLUSTER_H2",
        default_value = "sandbox_pods_fast_h2"
    )]
    pub fast_path_cluster_h2: String,

    /// The clusters of the ext_proc path (HTTP/1.1 and HTTP/2), which hot routes' shards fall
    /// back to for hosts that are not hot. Must match the Envoy config.
    #[arg(
        long,
        env = "SANDGATE_EXT_PROC_CLUSTER",
        default_value = "sandbox_pods"
    )]
    pub ext_proc_cluster: String,
    #[arg(
        long,
        env = "SANDGATE_EXT_PROC_CLUSTER_H2",
        default_value = "sandbox_pods_h2"
    )]
    pub ext_proc_cluster_h2: String,

    /// How long a sandbox may take to start its response on a hot route before Envoy answers
    /// 504 (the per-try timeout of the catch-all route in the Envoy config: keep them equal).
    #[arg(long, env = "SANDGATE_FAST_PATH_RESPONSE_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub fast_path_response_timeout: Duration,

    /// The header that cluster takes the destination from; every hot route overwrites it.
    #[arg(
        long,
        env = "SANDGATE_FAST_PATH_HEADER",
        default_value = "x-sandgate-destination"
    )]
    pub fast_path_header: String,

    /// The route configuration (in the Envoy config) whose VHDS hot hosts join.
    #[arg(
        long,
        env = "SANDGATE_FAST_PATH_ROUTE_CONFIG",
        default_value = "sandboxes"
    )]
    pub fast_path_route_config: String,

    /// Log format: text or json.
    #[arg(long, env = "SANDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}
