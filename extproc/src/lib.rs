//! sandgate-extproc: the data plane.
//!
//! Envoy asks it, once per request, where the request goes. It answers from an in-memory route
//! index fed by a pod watch. It must never take a destination from the request itself.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod activity;
pub mod als;
pub mod config;
pub mod control;
pub mod decision;
pub mod drain;
pub mod fastpath;
pub mod grpc;
pub mod index;
pub mod kube;
pub mod metrics;
pub mod resolver;
pub mod streams;
pub mod upstream;

use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use sandgate_shared::{AddressConfig, Contract};

pub use config::Config;
pub use sandgate_shared::server::{admin, shutdown};

pub use sandgate_shared::server::init_tracing;

/// Runs the extproc until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let contract = Arc::new(Contract::new(&config.label_prefix).context("--label-prefix")?);
    let addresses = AddressConfig::new(&config.domains).context("--domain")?;
    if addresses.domains().is_empty() {
        tracing::warn!("no --domain configured: only the header and path forms will route");
    }
    let fast_config = fast_path_config(&config)?;
    let token =
        sandgate_shared::server::read_token(&config.control_token_file, "--control-token-file")?;
    let client = ::kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;

    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let index = Arc::new(index::RouteIndex::new());
    let apis = kube::scoped_apis(&client, &config.namespaces);
    let lookup = Arc::new(kube::KubeLookup {
        apis: apis.clone(),
        contract: contract.clone(),
    });
    let resolver = Arc::new(resolver::Resolver::new(
        index.clone(),
        lookup,
        config.negative_ttl,
        config.lookup_timeout,
        metrics.clone(),
    ));
    let sync = Arc::new(kube::SyncState::new(apis.len()));
    let activity = Arc::new(activity::ActivityTable::new());
    let (trigger, shutdown) = shutdown::channel();
    let fast = fastpath::FastPath::new(
        fast_config,
        addresses.clone(),
        config.default_port,
        index.clone(),
        activity.clone(),
        metrics::FastPathMetrics::new(&mut registry),
        shutdown.clone(),
    );
    fast.spawn();
    for (scope, api) in apis {
        tokio::spawn(kube::run_watch(
            api,
            scope,
            contract.clone(),
            resolver.clone(),
            activity.clone(),
            sync.clone(),
            metrics.clone(),
        ));
    }

    let admin_listener = admin::bind(config.admin_addr, "--admin-addr").await?;
    let grpc_listener = admin::bind(config.grpc_addr, "--grpc-addr").await?;
    let control_listener = admin::bind(config.control_addr, "--control-addr").await?;
    tracing::info!(grpc = %config.grpc_addr, admin = %config.admin_addr, domains = ?addresses.domains(), fast_path = config.fast_path, "sandgate-extproc starting");

    let drain = Arc::new(drain::Drain::new(drain::DrainConfig {
        envoy_admin: config.envoy_admin,
        delay: config.drain_delay,
        timeout: config.drain_timeout,
    }));
    let streams = Arc::new(streams::StreamTable::new(
        activity.clone(),
        config.stream_expiry,
    ));
    tokio::spawn(expire_streams(streams.clone(), config.stream_expiry));
    let admin_state = Arc::new(admin::AdminState {
        registry,
        ready: {
            let (sync, shutdown, m) = (sync.clone(), shutdown.clone(), metrics.clone());
            let drain = drain.clone();
            Box::new(move || {
                let synced = sync.is_synced();
                m.index_synced.set(i64::from(synced));
                synced && !shutdown.is_fired() && !drain.is_draining()
            })
        },
        extra: Some(drain_routes(drain)),
        before_scrape: {
            let (index, activity, m) = (index.clone(), activity.clone(), metrics.clone());
            let streams = streams.clone();
            Box::new(move || {
                m.indexed_sandboxes.set(index.len() as i64);
                m.tracked_sandboxes.set(activity.len() as i64);
                m.open_streams.set(streams.len() as i64);
            })
        },
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone()));
    let boot_id = boot_id();
    let control = control::ControlApi {
        activity: activity.clone(),
        resolver: resolver.clone(),
        replica: config.replica_name.clone(),
        boot_id: boot_id.clone(),
        fast: Some(fast.clone()),
        warm: {
            let sync = sync.clone();
            Box::new(move || sync.is_synced())
        },
    };
    let control_shutdown = shutdown.clone();
    let control_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(control.into_service(control::BearerAuth::new(&token)))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(control_listener)
                    .with_nodelay(Some(true)),
                async move { control_shutdown.wait().await },
            ),
    );
    tracing::info!(control = %config.control_addr, replica = %config.replica_name, %boot_id, "control API listening");
    let access_logs = als::AccessLogs {
        activity: activity.clone(),
        streams: streams.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let router = Arc::new(grpc::Router {
        addresses,
        resolver,
        default_port: config.default_port,
        metrics,
        activity,
        streams,
        max_streams_per_sandbox: config.max_streams_per_sandbox,
        envd_port: (config.envd_port != 0).then_some(config.envd_port),
        fast: Some(fast.clone()),
    });
    let grace = config.shutdown_grace;
    let grpc_shutdown = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(grpc::Processor::new(router).into_service())
        .add_service(access_logs.into_service())
        .add_service(fastpath::ads::Ads::new(fast.clone()).into_service())
        .serve_with_incoming_shutdown(
            // Envoy's ext_proc messages are tiny: Nagle would hold them back.
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            async move {
                grpc_shutdown.wait().await;
                // Readiness is already false: give Envoy time to stop sending new streams.
                tokio::time::sleep(grace).await;
            },
        );
    let serve = tokio::spawn(server);

    shutdown::signal().await;
    tracing::info!(grace = ?grace, "shutdown requested: readiness off, draining");
    trigger.fire();
    serve.await?.context("ext_proc server failed")?;
    let _ = admin_task.await;
    let _ = control_task.await;
    tracing::info!("sandgate-extproc stopped");
    Ok(())
}

/// A random ID for this process, so the controller can tell a restart from a long uptime.
/// `/drain` (the gateway pod's preStop hook) and `/ready/envoy` (Envoy's readiness, whose own
/// admin port stays on loopback).
fn drain_routes(drain: Arc<drain::Drain>) -> admin::ExtraRoutes {
    use http::StatusCode;
    Box::new(move |path| {
        let drain = drain.clone();
        match path {
            "/drain" => Some(Box::pin(async move { (StatusCode::OK, drain.run().await) })),
            "/ready/envoy" => Some(Box::pin(async move {
                if drain.envoy_ready().await {
                    (StatusCode::OK, "envoy ready\n".to_string())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "envoy not ready or draining\n".to_string(),
                    )
                }
            })),
            _ => None,
        }
    })
}

/// The fast path's settings, checked: a bad value exits at start naming its flag.
fn fast_path_config(config: &Config) -> anyhow::Result<fastpath::FastPathConfig> {
    use std::time::Duration;
    anyhow::ensure!(
        config.fast_path_ttl >= Duration::from_millis(200),
        "--fast-path-ttl must be at least 200ms (it is refreshed every quarter of it)"
    );
    anyhow::ensure!(
        config.fast_path_batch < config.fast_path_ttl / 2,
        "--fast-path-batch must be under half of --fast-path-ttl"
    );
    anyhow::ensure!(
        !config.fast_path_response_timeout.is_zero(),
        "--fast-path-response-timeout must be above zero"
    );
    anyhow::ensure!(
        !config.fast_path_activity_interval.is_zero(),
        "--fast-path-activity-interval must be above zero"
    );
    anyhow::ensure!(
        http::HeaderName::from_bytes(config.fast_path_header.as_bytes())
            .is_ok_and(|h| h.as_str() == config.fast_path_header),
        "--fast-path-header must be a lower-case HTTP header name, not {:?}",
        config.fast_path_header
    );
    for (flag, value) in [
        ("--fast-path-cluster", &config.fast_path_cluster),
        ("--fast-path-cluster-h2", &config.fast_path_cluster_h2),
        ("--ext-proc-cluster", &config.ext_proc_cluster),
        ("--ext-proc-cluster-h2", &config.ext_proc_cluster_h2),
        ("--fast-path-route-config", &config.fast_path_route_config),
    ] {
        anyhow::ensure!(
            !value.is_empty() && !value.contains('/'),
            "{flag} must be a non-empty name without '/', not {value:?}"
        );
    }
    Ok(fastpath::FastPathConfig {
        enabled: config.fast_path,
        template: fastpath::RouteTemplate {
            route_config: config.fast_path_route_config.clone(),
            cluster: config.fast_path_cluster.clone(),
            cluster_h2: config.fast_path_cluster_h2.clone(),
            ext_proc_cluster: config.ext_proc_cluster.clone(),
            ext_proc_cluster_h2: config.ext_proc_cluster_h2.clone(),
            response_timeout: config.fast_path_response_timeout,
            header: config.fast_path_header.clone(),
        },
        max_routes: config.fast_path_max_routes as usize,
        ttl: config.fast_path_ttl,
        batch: config.fast_path_batch,
        activity_interval: config.fast_path_activity_interval,
        envoy_admin: config.envoy_admin,
        envd_port: (config.envd_port != 0).then_some(config.envd_port),
    })
}

/// Closes streams nothing refreshed within `expiry`, also when no Envoy sends access logs.
async fn expire_streams(streams: Arc<streams::StreamTable>, expiry: std::time::Duration) {
    // Streams may carry an expiry shorter than the table's (their Envoy's): check each second.
    let mut every = tokio::time::interval(expiry.clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(1),
    ));
    loop {
        every.tick().await;
        streams.expire();
    }
}

fn boot_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}
