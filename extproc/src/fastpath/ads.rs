//! The delta ADS server the extproc serves its Envoys: hot routes (VHDS) and their validity flag
//! (RTDS) on one stream, so the flag can never say more than the routes beside it. Each stream
//! has its own observer reading that Envoy's counters ([`super::observe`]), and gets hot routes
//! only while they are read. The stream's logic is in [`super::session`]; this is its I/O.

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

use envoy_types::pb::envoy::config::core::v3::Node;

use super::observe::{self, admin_target, AdminTarget, Observation, ADMIN_METADATA_KEY};
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

/// A random token naming one stream, put in its Envoy's runtime (not a secret: it proves which
/// Envoy an admin address belongs to).
fn stream_token(id: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(id);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{id}-{:016x}", h.finish())
}

/// The admin address an Envoy names in its node metadata.
fn metadata_admin(node: Option<&Node>) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let field = node?.metadata.as_ref()?.fields.get(ADMIN_METADATA_KEY)?;
    match &field.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => Some(String::new()),
    }
}

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
    let token = stream_token(id);
    let mut session = Session::new(
        fast.template.clone(),
        fast.config.ttl,
        fast.config.enabled,
        token.clone(),
    );
    let mut obs = Observation::new(fast.config.stale(), Instant::now().into_std());
    let (reading_tx, mut readings) = mpsc::channel(1);
    let mut observer: Option<tokio::task::JoinHandle<()>> = None;
    let mut first = true;
    let mut changes = fast.changes.subscribe();
    let mut tick =
        tokio::time::interval((fast.config.ttl / 8).max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut push_at: Option<Instant> = None;
    let mut valid = false;
    let mut unobserved = false;
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
                    if std::mem::take(&mut first) && fast.config.enabled {
                        // The node comes with the first message only.
                        let meta = metadata_admin(req.node.as_ref());
                        match admin_target(meta.as_deref(), fast.config.envoy_admin, peer) {
                            AdminTarget::Read(admin) => {
                                tracing::info!(stream = id, %admin, "reading this envoy's counters for activity on its hot routes");
                                observer = Some(tokio::spawn(observe::run(
                                    admin,
                                    token.clone(),
                                    vec![fast.template.cluster.clone(), fast.template.cluster_h2.clone()],
                                    fast.config.activity_interval,
                                    reading_tx.clone(),
                                )));
                            }
                            AdminTarget::Unreadable(why) => {
                                tracing::warn!(stream = id, why, "this envoy's counters cannot be read: it gets no hot routes, and every request it sends goes through ext_proc");
                            }
                        }
                    }
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
            Some((at, reading)) = readings.recv() => {
                match &reading {
                    Ok(_) => m.activity_polls_ok.inc(),
                    Err(e) => {
                        tracing::debug!(stream = id, error = %e, "reading this envoy's counters failed");
                        m.activity_polls_failed.inc()
                    }
                };
                let touched = obs.on_reading(at, reading, &session.held_destinations());
                touch(&fast, touched);
            }
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
        let now = Instant::now().into_std();
        if fast.config.enabled && session.set_serving(obs.serving(now)) {
            // Routes go out, or all come back, at once.
            push_at = Some(Instant::now());
            if session.is_serving() {
                tracing::info!(stream = id, "envoy's counters read: it may hold hot routes");
            } else {
                tracing::warn!(stream = id, error = obs.error().unwrap_or("no reading"), "envoy's counters unread for too long: its hot routes are withdrawn, its requests go through ext_proc");
            }
        }
        if session.holds_nothing() {
            touch(&fast, obs.on_holds_nothing());
        }
        if unobserved != (fast.config.enabled && !session.is_serving()) {
            unobserved = !unobserved;
            if unobserved {
                m.unobserved_streams.inc();
            } else {
                m.unobserved_streams.dec();
            }
        }
        fast.note_stream(id, mark(&session, &obs));
        out.extend(session.validity(now, false));
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
    if unobserved {
        m.unobserved_streams.dec();
    }
    m.streams.dec();
    if let Some(o) = observer {
        o.abort();
    }
    if !session.holds_nothing() {
        // Envoy may go on routing by what it holds until its runtime layer lapses, unseen: the
        // stream stays in the view (so its gap counts) until then, and its sandboxes are touched.
        let mut held: Vec<_> = session.held_destinations().into_values().collect();
        held.extend(obs.on_holds_nothing());
        fast.note_stream(id, mark(&session, &obs));
        tokio::time::sleep(fast.config.ttl).await;
        touch(&fast, held);
    }
    fast.forget_stream(id);
    tracing::info!(stream = id, why, "envoy hot-route stream ended");
}

fn mark(session: &Session, obs: &Observation) -> super::StreamMark {
    super::StreamMark {
        needed: session.needed(),
        applied: session.applied(),
        seen_until: obs.seen_until(session.holds_nothing()),
        unread: obs.error().map(str::to_string),
    }
}

fn touch(fast: &FastPath, sandboxes: Vec<crate::index::SandboxKey>) {
    for k in sandboxes {
        tracing::debug!(sandbox_id = k.as_str(), "activity on a hot route");
        fast.activity.touch(k);
        fast.metrics.activity_touches.inc();
    }
}

async fn send_all(tx: &Tx, out: Vec<DeltaDiscoveryResponse>) -> bool {
    for r in out {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}
