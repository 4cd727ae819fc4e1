//! The delta ADS server the extproc serves its own Envoy: hot routes (VHDS) and their validity
//! flag (RTDS) on one stream, so the flag can never say more than the routes beside it.
//! The stream's logic is in [`super::session`]; this is its I/O.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use super::resources::VIRTUAL_HOST_TYPE;
use super::session::Session;
use super::FastPath;

#[derive(Clone)]
pub struct Ads {
    fast: Arc<FastPath>,
    next_stream: Arc<AtomicU64>,
}

impl Ads {
    pub fn new(fast: Arc<FastPath>) -> Self {
        Ads {
            fast,
            next_stream: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

type Replies<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Replies<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Replies<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "sandgate serves incremental xDS only: set ads_config.api_type to DELTA_GRPC",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(self.fast.clone(), id, inbound, tx, peer));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Runs one Envoy's stream until it ends, sandgate shuts down, or Envoy rejects a push.
async fn serve(
    fast: Arc<FastPath>,
    id: u64,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
    peer: Option<std::net::SocketAddr>,
) {
    let m = fast.metrics.clone();
    m.streams.inc();
    tracing::info!(stream = id, ?peer, "envoy connected for hot routes");
    let mut session = Session::new(fast.template.clone(), fast.config.ttl, fast.config.enabled);
    let mut changes = fast.changes.subscribe();
    let mut tick =
        tokio::time::interval((fast.config.ttl / 8).max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut push_at: Option<Instant> = None;
    let mut valid = false;
    let why = loop {
        let due = async move {
            match push_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let mut out = Vec::new();
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let subscribes = req.type_url == VIRTUAL_HOST_TYPE && req.response_nonce.is_empty();
                    match session.on_request(req, Instant::now().into_std()) {
                        Ok((answers, acked)) => {
                            out = answers;
                            if let Some(took) = acked {
                                m.ack_seconds.observe(took);
                                push_at = Some(Instant::now());
                            }
                            if subscribes {
                                push_at = Some(Instant::now());
                            }
                        }
                        Err(e) => {
                            tracing::error!(stream = id, error = %e, "envoy rejected a hot-route push; routes withdrawn, stream closed for a full resync");
                            m.rejected.inc();
                            out.extend(session.withdraw());
                            send_all(&tx, out).await;
                            break "rejected";
                        }
                    }
                }
                Ok(None) => break "closed by envoy",
                Err(status) => {
                    tracing::debug!(stream = id, %status, "ADS stream ended");
                    break "broken";
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break "shutdown";
                }
                // A destination taken away goes out at once; new hosts wait to be batched.
                let at = if fast.urgent_since(session.cursor()) {
                    Instant::now()
                } else {
                    Instant::now() + fast.config.batch
                };
                push_at = Some(push_at.map_or(at, |t| t.min(at)));
            }
            _ = due => {
                push_at = None;
                let push = session.push(&fast.lock_table(), Instant::now().into_std());
                if let Some((resp, stats)) = push {
                    m.pushes.inc();
                    m.pushed_upserts.inc_by(stats.upserts as u64);
                    m.pushed_removals.inc_by(stats.removals as u64);
                    tracing::debug!(stream = id, upserts = stats.upserts, removals = stats.removals, "hot routes pushed");
                    out.push(resp);
                }
            }
            _ = tick.tick() => {}
            _ = fast.shutdown.wait() => {
                send_all(&tx, session.withdraw().into_iter().collect()).await;
                break "shutdown";
            }
        }
        fast.note_stream(id, session.needed(), session.applied());
        out.extend(session.validity(Instant::now().into_std(), false));
        if !send_all(&tx, out).await {
            break "closed by envoy";
        }
        if valid != session.is_valid() {
            valid = session.is_valid();
            if valid {
                m.valid_streams.inc();
                tracing::info!(
                    stream = id,
                    routes = session.held(),
                    "hot routes valid in envoy"
                );
            } else {
                m.valid_streams.dec();
                tracing::warn!(
                    stream = id,
                    "hot routes withdrawn: envoy has not confirmed the last push in time"
                );
            }
        }
    };
    if valid {
        m.valid_streams.dec();
    }
    m.streams.dec();
    fast.forget_stream(id);
    tracing::info!(stream = id, why, "envoy hot-route stream ended");
}

async fn send_all(tx: &Tx, out: Vec<DeltaDiscoveryResponse>) -> bool {
    for r in out {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}
