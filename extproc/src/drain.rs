//! Draining the gateway pod's Envoy before it stops, so a rolling restart loses nothing.
//!
//! Both containers' `preStop` hooks call `GET /drain` on the extproc's admin port (Envoy's admin
//! stays on loopback, and a hook cannot POST). The first call runs the sequence, later calls wait
//! for it; each answers once Envoy has drained:
//! 1. the gateway turns unready (`/readyz` and `/ready/envoy` answer 503; Envoy's own `/ready`
//!    too, through `/healthcheck/fail`), so the Service stops sending new connections;
//! 2. for `--drain-delay` Envoy keeps serving whatever still arrives while endpoints update;
//! 3. `/drain_listeners?graceful`: HTTP/1.1 answers carry `Connection: close`, HTTP/2 gets GOAWAY;
//! 4. it waits until Envoy holds no downstream connection, or `--drain-timeout`.
//!
//! Only then are the containers sent SIGTERM: in-flight requests complete, and the extproc
//! answers Envoy's ext_proc and access-log calls throughout. A WebSocket still open at the end is
//! closed by Envoy's exit (a FIN, not a reset).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::sync::watch;

/// How the drain goes.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// Envoy's admin address (loopback, in the same pod).
    pub envoy_admin: SocketAddr,
    /// How long Envoy keeps serving new requests after turning unready.
    pub delay: Duration,
    /// The longest wait for Envoy's connections to close.
    pub timeout: Duration,
}

pub struct Drain {
    config: DrainConfig,
    started: AtomicBool,
    done: watch::Sender<bool>,
}

impl Drain {
    pub fn new(config: DrainConfig) -> Self {
        Drain {
            config,
            started: AtomicBool::new(false),
            done: watch::channel(false).0,
        }
    }

    /// Whether a drain has begun (the gateway is then unready).
    pub fn is_draining(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Runs the drain, or waits for the one already running. Returns what happened.
    pub async fn run(&self) -> String {
        if self.started.swap(true, Ordering::SeqCst) {
            let mut done = self.done.subscribe();
            let _ = done.wait_for(|d| *d).await;
            return "drained\n".into();
        }
        let outcome = self.sequence().await;
        self.done.send_replace(true);
        tracing::info!(%outcome, "drain finished");
        format!("{outcome}\n")
    }

    async fn sequence(&self) -> String {
        let c = &self.config;
        tracing::info!(envoy = %c.envoy_admin, delay = ?c.delay, timeout = ?c.timeout, "drain started");
        if let Err(e) = admin(c.envoy_admin, "POST", "/healthcheck/fail").await {
            tracing::warn!(error = %e, "envoy /healthcheck/fail");
        }
        tokio::time::sleep(c.delay).await;
        if let Err(e) = admin(c.envoy_admin, "POST", "/drain_listeners?graceful").await {
            tracing::warn!(error = %e, "envoy /drain_listeners");
            return format!("envoy unreachable: {e}");
        }
        let deadline = Instant::now() + c.timeout;
        loop {
            match downstream_connections(c.envoy_admin).await {
                Ok(0) => return "drained: no connection left".into(),
                Ok(n) if Instant::now() >= deadline => {
                    return format!("drain timeout: {n} connections left")
                }
                Err(e) if Instant::now() >= deadline => return format!("drain timeout: {e}"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Whether Envoy says it is ready (and no drain has begun).
    pub async fn envoy_ready(&self) -> bool {
        !self.is_draining()
            && admin(self.config.envoy_admin, "GET", "/ready")
                .await
                .is_ok_and(|(status, _)| status == 200)
    }
}

/// Open client connections on Envoy's listeners (`downstream_cx_active` of every HTTP connection
/// manager).
async fn downstream_connections(envoy: SocketAddr) -> anyhow::Result<u64> {
    let (_, body) = admin(
        envoy,
        "GET",
        "/stats?filter=^http%5C..*%5C.downstream_cx_active$",
    )
    .await?;
    Ok(parse_cx_active(&body))
}

fn parse_cx_active(stats: &str) -> u64 {
    stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(name, _)| {
            // The admin listener's count includes the connection asking.
            name.starts_with("http.")
                && !name.starts_with("http.admin.")
                && name.ends_with(".downstream_cx_active")
        })
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// One request to Envoy's admin API.
pub(crate) async fn admin(
    envoy: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let call = async {
        let stream = tokio::net::TcpStream::connect(envoy).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .map_err(|_| anyhow::anyhow!("envoy admin {path}: timed out"))?
}

#[cfg(test)]
mod tests {
    #[test]
    fn active_connections_are_summed_over_connection_managers() {
        let stats = "http.sandboxes.downstream_cx_active: 3\n\
                     http.admin.downstream_cx_active: 1\n\
                     http.sandboxes.downstream_cx_total: 99\n\
                     listener.x.downstream_cx_active: 7\n";
        assert_eq!(super::parse_cx_active(stats), 3);
    }
}
