//! sandgate-controller: the control plane.
//!
//! Runs the idle-timeout reconciler: every interval, the elected leader polls every extproc
//! replica, moves `last-active` annotations forward and releases sandboxes idle past their
//! timeout. It must never release a sandbox on a partial view of activity.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod backoff;
pub mod claim;
pub mod config;
pub mod crd;
pub mod idle;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod patches;
pub mod poller;
pub mod pool;
pub mod replicas;
pub mod tick;
pub mod validate;
pub mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::registry::Registry;
use sandgate_shared::server::{admin, shutdown};
use sandgate_shared::Contract;

pub use config::Config;

pub use sandgate_shared::server::init_tracing;

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let contract = Contract::new(&config.label_prefix).context("--label-prefix")?;
    let default_timeout =
        idle::parse_idle_timeout(&config.default_idle_timeout).context("--default-idle-timeout")?;
    anyhow::ensure!(!config.interval.is_zero(), "--interval must be above zero");
    let token =
        sandgate_shared::server::read_token(&config.control_token_file, "--control-token-file")?;
    let poller = poller::Poller::new(&token, config.poll_timeout, config.full_report_interval)?;
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let lifecycle_metrics = lifecycle::LifecycleMetrics::new(&mut registry);
    let pods = pod_stores(&client, &config.namespaces, &contract);

    let is_leader = Arc::new(AtomicBool::new(!config.leader_election));
    metrics.leader.set(i64::from(!config.leader_election));
    if config.leader_election {
        tokio::spawn(
            leader::Elector {
                api: Api::namespaced(client.clone(), &config.lease_namespace),
                name: config.lease_name.clone(),
                identity: config.identity.clone(),
                duration: config.lease_duration,
                is_leader: is_leader.clone(),
                metrics: metrics.clone(),
            }
            .run(),
        );
    }
    if config.pools {
        let ns = config.namespaces.first().cloned();
        anyhow::ensure!(
            config.namespaces.len() <= 1,
            "--pools supports one --namespace or all namespaces"
        );
        let (pools, claims, pod_api): (Api<crd::SandboxPool>, Api<crd::SandboxClaim>, Api<Pod>) =
            match &ns {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                ),
                None => (
                    Api::all(client.clone()),
                    Api::all(client.clone()),
                    Api::all(client.clone()),
                ),
            };
        // One watch on pool pods feeds the cache and both controllers. A pod reaches the
        // controllers only after the cache holds it, so a reconcile never reads a cache older
        // than the change that triggered it.
        let (reader, writer) = reflector::store();
        let cfg = watcher::Config::default().labels(&contract.label_pool);
        let stream = reflector::reflector(writer, watcher(pod_api, cfg))
            .default_backoff()
            .touched_objects();
        let (to_pools, pool_triggers) = futures::channel::mpsc::unbounded();
        let (to_claims, claim_triggers) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(pod) => {
                        let _ = to_pools.unbounded_send(pod.clone());
                        let _ = to_claims.unbounded_send(pod);
                    }
                    Err(e) => tracing::warn!(error = %e, "pool pod watch error; retrying"),
                }
            }
        });
        // Pools through one reflector: the pool controller is driven by it and claims read
        // their pool from it (no API read per claim reconcile).
        let (pool_reader, pool_writer) = reflector::store();
        let pool_stream = reflector::reflector(pool_writer, watcher(pools, Default::default()))
            .default_backoff()
            .touched_objects();
        let ctx = Arc::new(lifecycle::Ctx {
            client: client.clone(),
            contract: contract.clone(),
            pods: reader.clone(),
            pool_store: pool_reader.clone(),
            not_ready_grace: config.not_ready_grace,
            expectations: Default::default(),
            bound: Default::default(),
            waiting: Default::default(),
            failures: Default::default(),
            create_backoff: Default::default(),
            status_written: Default::default(),
            domain: config.sandbox_domain.clone(),
            is_leader: is_leader.clone(),
            metrics: lifecycle_metrics,
            evictor: poller.evictor(),
            recorder: kube::runtime::events::Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "sandgate-controller".into(),
                    instance: Some(config.identity.clone()),
                },
            ),
        });
        tokio::spawn(async move {
            let _ = reader.wait_until_ready().await;
            lifecycle::run(
                ctx,
                (pool_stream, pool_reader),
                claims,
                pool_triggers,
                claim_triggers,
            )
            .await
        });
    }

    let (trigger, shutdown) = shutdown::channel();
    let listener = admin::bind(config.admin_addr, "--admin-addr").await?;
    let stores = pods.clone();
    let admin_state = Arc::new(admin::AdminState {
        registry,
        ready: Box::new(move || {
            stores
                .iter()
                .all(|s| s.wait_until_ready().now_or_never().is_some())
        }),
        before_scrape: Box::new(|| {}),
        extra: None,
    });
    let admin_task = tokio::spawn(admin::serve(listener, admin_state, shutdown.clone()));
    let limiter = Arc::new(tick::RateLimiter::new(config.write_rate));
    let writer = Arc::new(writer::AnnotationWriter::default());
    tokio::spawn(writer.clone().run(
        client.clone(),
        contract.ann_last_active.clone(),
        limiter.clone(),
        config.write_concurrency as usize,
        metrics.clone(),
    ));
    let ctx = tick::Context {
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "sandgate-controller".into(),
                instance: Some(config.identity.clone()),
            },
        ),
        slices: Api::namespaced(client.clone(), &config.extproc_namespace),
        client,
        pods: pods.clone(),
        contract,
        default_timeout,
        refresh: config.refresh_interval,
        service: config.extproc_service.clone(),
        port_name: config.extproc_port_name.clone(),
        poller: tokio::sync::Mutex::new(poller),
        metrics,
        write_concurrency: config.write_concurrency as usize,
        limiter,
        writer,
        seen: Default::default(),
    };
    tracing::info!(interval = ?config.interval, identity = %config.identity, leader_election = config.leader_election, "sandgate-controller starting");

    let ticks = async {
        for s in &pods {
            let _ = s.wait_until_ready().await;
        }
        let mut every = tokio::time::interval(config.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if is_leader.load(Ordering::SeqCst) {
                tick::tick(&ctx).await;
            }
        }
    };
    tokio::select! {
        _ = ticks => {},
        _ = shutdown::signal() => {},
    }
    trigger.fire();
    let _ = admin_task.await;
    tracing::info!("sandgate-controller stopped");
    Ok(())
}

use futures::FutureExt;

/// One reflector per watched namespace (or one for all), over pods carrying a sandbox ID.
pub fn pod_stores(
    client: &kube::Client,
    namespaces: &[String],
    contract: &Contract,
) -> Vec<Store<Pod>> {
    let apis: Vec<Api<Pod>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    apis.into_iter()
        .map(|api| {
            let (reader, writer) = reflector::store();
            let cfg = watcher::Config::default().labels(&contract.label_sandbox_id);
            let stream = reflector::reflector(writer, watcher(api, cfg))
                .default_backoff()
                .touched_objects();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if let Err(e) = ev {
                        tracing::warn!(error = %e, "pod watch error; retrying");
                    }
                }
            });
            reader
        })
        .collect()
}

/// Every Kubernetes API call this binary makes, as (API group, resource, verb). The RBAC test checks
/// deploy/rbac.yaml grants exactly these.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("", "pods", "list"),                              // reflectors
    ("", "pods", "watch"),                             // reflectors
    ("", "pods", "get"),                               // claim: confirm a release in the API
    ("", "pods", "patch"),                             // last-active, release, bind, mark idle
    ("", "pods", "create"),                            // pool pods
    ("", "pods", "delete"),                            // released, failed, rotated, excess pods
    ("discovery.k8s.io", "endpointslices", "list"),    // extproc replicas
    ("coordination.k8s.io", "leases", "get"),          // leader election
    ("coordination.k8s.io", "leases", "create"),       // leader election
    ("coordination.k8s.io", "leases", "update"),       // leader election (replace)
    ("events.k8s.io", "events", "create"),             // release, bind and pool events
    ("events.k8s.io", "events", "patch"),              // event series
    ("sandgate.dev", "sandboxpools", "list"),          // pool controller
    ("sandgate.dev", "sandboxpools", "watch"),         // pool controller
    ("sandgate.dev", "sandboxpools", "get"),           // claims read their pool
    ("sandgate.dev", "sandboxpools", "patch"),         // finalizer
    ("sandgate.dev", "sandboxpools/status", "patch"),  // pool status
    ("sandgate.dev", "sandboxclaims", "list"),         // claim controller
    ("sandgate.dev", "sandboxclaims", "watch"),        // claim controller
    ("sandgate.dev", "sandboxclaims", "patch"),        // finalizer
    ("sandgate.dev", "sandboxclaims", "delete"),       // ttlSecondsAfterFinished
    ("sandgate.dev", "sandboxclaims/status", "patch"), // claim status
];
