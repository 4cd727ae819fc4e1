//! sandgate-api: the E2B-compatible REST API, so the E2B SDK works against sandgate unchanged.
//!
//! Templates are SandboxPools; a sandbox is a SandboxClaim (created on `create`, deleted on
//! `kill`), answered once it is Bound. E2B's timeout is the claim's absolute `spec.timeout`, which
//! the controller enforces. API keys live hashed in Secrets and scope every sandbox to a team:
//! another team's sandbox is "not found". Stateless: every replica reads the same claims, pools
//! and keys from the API server through watches, and answers any request.
//!
//! It never routes traffic (the gateway does) and never writes pods (the controller does).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod config;
pub mod e2b;
pub mod envd;
pub mod handlers;
pub mod keys;
pub mod metrics;
pub mod routes;

use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::registry::Registry;
use sandgate_controller::crd::{SandboxClaim, SandboxPool};
use sandgate_shared::server::{admin, shutdown};
use tokio::sync::watch;

pub use config::{Cli, Command, Config};
pub use sandgate_shared::server::init_tracing;

use handlers::Answer;
use keys::KeyRing;
use routes::Route;

/// Shared by every request.
pub struct App {
    pub config: Config,
    pub client: kube::Client,
    pub claims: Store<SandboxClaim>,
    pub pools: Store<SandboxPool>,
    pub keys: RwLock<KeyRing>,
    /// Bumped on every claim change: create waits on it for its claim to be bound.
    pub claims_changed: watch::Sender<u64>,
    pub metrics: metrics::ApiMetrics,
    /// Access tokens of sandboxes whose pods run sandgate-envd.
    pub envd_tokens: envd::Tokens,
}

/// Every Kubernetes API call this binary makes, as (API group, resource, verb). The RBAC test checks
/// deploy/rbac.yaml grants exactly these.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("sandgate.dev", "sandboxclaims", "list"), // the claim watch
    ("sandgate.dev", "sandboxclaims", "watch"), // the claim watch
    ("sandgate.dev", "sandboxclaims", "get"),  // an Idempotency-Key seen before
    ("sandgate.dev", "sandboxclaims", "create"), // create
    ("sandgate.dev", "sandboxclaims", "patch"), // set_timeout, connect
    ("sandgate.dev", "sandboxclaims", "delete"), // kill, a create that timed out
    ("sandgate.dev", "sandboxpools", "list"),  // templates
    ("sandgate.dev", "sandboxpools", "watch"), // templates
    ("", "secrets", "list"),                   // API keys (label-selected)
    ("", "secrets", "watch"),                  // API keys
];

/// The largest request body read.
const MAX_BODY: usize = 1 << 20;

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.default_timeout.is_zero() && config.default_timeout <= config.max_timeout,
        "--default-timeout must be above zero and at most --max-timeout"
    );
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let mut registry = Registry::default();
    let metrics = metrics::ApiMetrics::new(&mut registry);
    let ns = config.namespace.clone();

    let (claims, claims_writer) = reflector::store();
    let (changed_tx, _) = watch::channel(0u64);
    let claims_changed = changed_tx.clone();
    let claim_api: Api<SandboxClaim> = Api::namespaced(client.clone(), &ns);
    tokio::spawn(
        watcher(claim_api, watcher::Config::default())
            .default_backoff()
            .reflect(claims_writer)
            .for_each(move |e| {
                if let Err(e) = e {
                    tracing::warn!(error = %e, "claim watch error");
                }
                changed_tx.send_modify(|n| *n += 1);
                futures::future::ready(())
            }),
    );
    let (pools, pools_writer) = reflector::store();
    let pool_api: Api<SandboxPool> = Api::namespaced(client.clone(), &ns);
    tokio::spawn(
        watcher(pool_api, watcher::Config::default())
            .default_backoff()
            .reflect(pools_writer)
            .for_each(|e| {
                if let Err(e) = e {
                    tracing::warn!(error = %e, "pool watch error");
                }
                futures::future::ready(())
            }),
    );
    let app = Arc::new(App {
        config: config.clone(),
        client: client.clone(),
        claims: claims.clone(),
        pools: pools.clone(),
        keys: RwLock::new(KeyRing::default()),
        claims_changed,
        metrics: metrics.clone(),
        envd_tokens: envd::Tokens::load(config.envd_token_key_file.as_deref())?,
    });
    let (secrets, secrets_writer) = reflector::store();
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let keys_app = app.clone();
    tokio::spawn(
        watcher(
            secret_api,
            watcher::Config::default().labels(&format!("{}=true", keys::SECRET_LABEL)),
        )
        .default_backoff()
        .reflect(secrets_writer)
        .for_each(move |e| {
            if let Err(e) = e {
                tracing::warn!(error = %e, "key Secret watch error");
            }
            let ring = key_ring(&secrets.state());
            keys_app.metrics.keys.set(ring.len() as i64);
            *keys_app.keys.write().unwrap_or_else(|e| e.into_inner()) = ring;
            futures::future::ready(())
        }),
    );

    let (trigger, shutdown) = shutdown::channel();
    let listener = admin::bind(config.listen_addr, "--listen-addr").await?;
    let admin_listener = admin::bind(config.admin_addr, "--admin-addr").await?;
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (claims, pools, synced) = (claims.clone(), pools.clone(), synced.clone());
        tokio::spawn(async move {
            let _ = claims.wait_until_ready().await;
            let _ = pools.wait_until_ready().await;
            synced.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("claims and pools synced");
        });
    }
    let admin_state = Arc::new(admin::AdminState {
        registry,
        ready: {
            let (synced, shutdown) = (synced.clone(), shutdown.clone());
            Box::new(move || {
                synced.load(std::sync::atomic::Ordering::SeqCst) && !shutdown.is_fired()
            })
        },
        before_scrape: Box::new(|| {}),
        extra: None,
    });
    tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone()));
    tracing::info!(addr = %config.listen_addr, namespace = %ns, domain = ?config.sandbox_domain, "sandgate-api listening");
    let serve = serve(listener, app, shutdown.clone());
    tokio::select! {
        _ = serve => {}
        _ = shutdown::signal() => {
            tracing::info!("shutting down");
            trigger.fire();
        }
    }
    Ok(())
}

fn key_ring(secrets: &[Arc<Secret>]) -> KeyRing {
    KeyRing::new(secrets.iter().filter_map(|s| {
        let data: std::collections::BTreeMap<String, Vec<u8>> = s
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        match keys::from_secret_data(&data) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(secret = ?s.metadata.name, error = %e, "key Secret ignored");
                None
            }
        }
    }))
}

async fn serve(listener: tokio::net::TcpListener, app: Arc<App>, shutdown: shutdown::Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One request: route, authenticate, run, render.
pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let route = routes::route(req.method(), req.uri().path());
    let label = routes::label(&route);
    let answer = dispatch(app, route, req).await;
    app.metrics.request(label, answer.status.as_u16());
    render(answer)
}

async fn dispatch(app: &App, route: Route, req: Request<Incoming>) -> Answer {
    match route {
        Route::Health => return Answer::json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        Route::NotFound => {
            return Answer::error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {} {}", req.method(), req.uri().path()),
            )
        }
        Route::MethodNotAllowed => {
            return Answer::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        }
        _ => {}
    }
    let key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_string();
    let team = app
        .keys
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .team(&key)
        .cloned();
    let Some(team) = team else {
        return Answer::error(
            StatusCode::UNAUTHORIZED,
            if key.is_empty() {
                "missing X-API-KEY header"
            } else {
                "invalid API key"
            },
        );
    };
    let idempotency = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body unreadable or above 1 MiB",
            )
        }
    };
    let result = match route {
        Route::Create => app.create(&team, &body, idempotency.as_deref()).await,
        Route::List => app.list(&team, &query),
        Route::Get(id) => app.get(&team, &id),
        Route::Kill(id) => app.kill(&team, &id).await,
        Route::Connect(id) => app.connect(&team, &id, &body).await,
        Route::SetTimeout(id) => app.set_timeout(&team, &id, &body).await,
        Route::Unsupported { what, id } => Ok(handlers::unsupported(what, &id)),
        Route::Health | Route::NotFound | Route::MethodNotAllowed => unreachable!("handled above"),
    };
    result.unwrap_or_else(|e| e)
}

fn render(answer: Answer) -> Response<Full<Bytes>> {
    let body = answer
        .body
        .map(|b| Bytes::from(b.to_string()))
        .unwrap_or_default();
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = answer.status;
    let h = resp.headers_mut();
    if answer.status != StatusCode::NO_CONTENT {
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    for (k, v) in answer.headers {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    resp
}
