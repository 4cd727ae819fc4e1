//! The admin HTTP server: `/metrics`, `/healthz` and `/readyz`, on its own port, plus any routes
//! a binary adds (the extproc's `/drain`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use super::shutdown::Shutdown;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// A binary's own admin route: given the path, the answer (status, body), if the path is its.
pub type ExtraRoutes = Box<dyn Fn(&str) -> Option<Answer> + Send + Sync>;

/// An extra route's answer, computed asynchronously.
pub type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = (StatusCode, String)> + Send>>;

/// What the admin server reads.
pub struct AdminState {
    pub registry: Registry,
    /// Readiness: true once the index is synced and until shutdown starts.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Called before `/metrics` is encoded, to refresh gauges.
    pub before_scrape: Box<dyn Fn() + Send + Sync>,
    /// Routes of the binary's own, tried first.
    pub extra: Option<ExtraRoutes>,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    let extra = state.extra.as_ref().and_then(|f| f(req.uri().path()));
                    Ok::<_, Infallible>(match extra {
                        Some(answer) => {
                            let (status, body) = answer.await;
                            text(status, body)
                        }
                        None => handle(&state, req),
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if (state.ready)() => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: route index not synced, or shutting down or draining\n".into(),
        ),
        "/metrics" => {
            (state.before_scrape)();
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, out);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n".into(),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Binds an address with a message that names the flag.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}"))
}
