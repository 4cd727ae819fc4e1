//! Polling every extproc replica's control API in parallel, each call bounded by a timeout.
//!
//! Per replica it keeps the boot ID and cursor of the last answer and what that replica has said
//! so far, so a steady-state poll asks only for changes. A replica that restarts (new boot ID)
//! or whose cursor expired answers with a full report, which replaces what was known of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use sandgate_shared::control::{
    control_client::ControlClient, EvictRouteRequest, GetLastActiveRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::idle::report_time;
use crate::replicas::ReplicaAddr;

type Client = ControlClient<InterceptedService<Channel, Bearer>>;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// What one replica has told us.
struct Replica {
    client: Client,
    boot_id: String,
    cursor: u64,
    /// When the last full report came.
    full_at: Option<Instant>,
    /// sandbox → (last active on the controller's clock, open streams)
    known: HashMap<String, (SystemTime, u32)>,
}

/// The outcome of polling one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    Failed(String),
    TimedOut,
    NotWarm,
    /// The replica answered, but some of what its Envoys routed has not been seen (an Envoy
    /// holding hot routes whose counters it cannot read); the reason is the replica's.
    Incomplete(String),
}

impl PollError {
    pub fn label(&self) -> &'static str {
        match self {
            PollError::Failed(_) => "failed",
            PollError::TimedOut => "timeout",
            PollError::NotWarm => "not_warm",
            PollError::Incomplete(_) => "incomplete",
        }
    }

    /// Every label, so each series is exported from the start.
    pub const LABELS: [&'static str; 4] = ["failed", "timeout", "not_warm", "incomplete"];

    /// Whether the replica answered: what it reported is still activity it saw.
    fn answered(&self) -> bool {
        matches!(self, PollError::NotWarm | PollError::Incomplete(_))
    }
}

/// One tick's poll of every replica.
#[derive(Debug, Default)]
pub struct PollResult {
    /// Every replica answered, warm and with a complete view.
    pub complete: bool,
    pub polled: usize,
    pub failed: Vec<(ReplicaAddr, PollError)>,
    /// sandbox → the latest activity each answering replica reported.
    pub activity: HashMap<String, Vec<SystemTime>>,
}

pub struct Poller {
    token: MetadataValue<tonic::metadata::Ascii>,
    timeout: Duration,
    full_every: Duration,
    replicas: HashMap<ReplicaAddr, Replica>,
    evictor: Arc<Evictor>,
}

/// Drops a sandbox's route from every replica the last poll found. Shared with the claim
/// controller, so a deleted claim's sandbox is unroutable before its finalizer goes.
pub struct Evictor {
    timeout: Duration,
    clients: Mutex<Vec<(ReplicaAddr, Client)>>,
}

impl Evictor {
    /// Asks every replica to drop a sandbox's route; each answers once its Envoy holds no hot
    /// route to it (or after a bounded wait). Returns how many confirmed. Failures are logged:
    /// the replicas' pod watches catch up, and their Envoys' hot routes lapse with them.
    pub async fn evict_everywhere(&self, sandbox_id: &str) -> usize {
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The replica itself waits up to a second for its Envoy.
        let timeout = self.timeout + Duration::from_secs(1);
        let calls = clients.into_iter().map(|(addr, mut client)| async move {
            let req = EvictRouteRequest { sandbox_id: sandbox_id.to_string() };
            match tokio::time::timeout(timeout, client.evict_route(req)).await {
                Ok(Ok(r)) if r.get_ref().hot_routes_withdrawn => true,
                Ok(Ok(_)) => {
                    tracing::warn!(replica = %addr, sandbox_id, "EvictRoute: the replica's envoy has not confirmed dropping the sandbox's hot routes");
                    false
                }
                other => {
                    tracing::warn!(replica = %addr, sandbox_id, result = ?other.map(|r| r.map(|_| ())), "EvictRoute failed");
                    false
                }
            }
        });
        join_all(calls).await.into_iter().filter(|ok| *ok).count()
    }
}

impl Poller {
    /// `full_every`: how often each replica is asked for a full report even when its cursor is
    /// good, so that whatever an incremental report could have missed is put right, never kept.
    pub fn new(token: &str, timeout: Duration, full_every: Duration) -> anyhow::Result<Self> {
        let token = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            anyhow::anyhow!("--control-token-file: the token is not a valid header value")
        })?;
        Ok(Poller {
            token,
            timeout,
            full_every,
            replicas: HashMap::new(),
            evictor: Arc::new(Evictor {
                timeout,
                clients: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The evictor, kept up to date with the replicas of the latest poll.
    pub fn evictor(&self) -> Arc<Evictor> {
        self.evictor.clone()
    }

    fn client(&mut self, addr: &ReplicaAddr) -> &mut Replica {
        let (token, timeout) = (self.token.clone(), self.timeout);
        self.replicas.entry(addr.clone()).or_insert_with(|| {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .expect("an IP or DNS name and a port make a valid URI")
                .connect_timeout(timeout)
                .timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy();
            Replica {
                client: ControlClient::with_interceptor(channel, Bearer(token))
                    .max_decoding_message_size(256 << 20),
                boot_id: String::new(),
                cursor: 0,
                full_at: None,
                known: HashMap::new(),
            }
        })
    }

    /// Polls `addrs` in parallel. Replicas no longer listed are forgotten.
    pub async fn poll(&mut self, addrs: &[ReplicaAddr]) -> PollResult {
        self.replicas.retain(|a, _| addrs.contains(a));
        for a in addrs {
            self.client(a);
        }
        *self
            .evictor
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self
            .replicas
            .iter()
            .map(|(a, r)| (a.clone(), r.client.clone()))
            .collect();
        let (timeout, full_every) = (self.timeout, self.full_every);
        let calls = self.replicas.iter_mut().map(|(addr, r)| async move {
            let due_full = r.full_at.is_none_or(|t| t.elapsed() >= full_every);
            let req = GetLastActiveRequest {
                cursor: if due_full { 0 } else { r.cursor },
                boot_id: r.boot_id.clone(),
            };
            let answer = tokio::time::timeout(timeout, r.client.get_last_active(req)).await;
            let received = SystemTime::now();
            let res = match answer {
                Err(_) => Err(PollError::TimedOut),
                Ok(Err(status)) => Err(PollError::Failed(format!(
                    "{}: {}",
                    status.code(),
                    status.message()
                ))),
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    if resp.full || resp.boot_id != r.boot_id {
                        r.known.clear();
                    }
                    if resp.full {
                        r.full_at = Some(Instant::now());
                    }
                    r.boot_id = resp.boot_id;
                    r.cursor = resp.cursor;
                    for s in resp.sandboxes {
                        let t =
                            report_time(received, Duration::from_millis(s.idle_ms), s.open_streams);
                        r.known.insert(s.sandbox_id, (t, s.open_streams));
                    }
                    if !resp.warm {
                        Err(PollError::NotWarm)
                    } else if !resp.complete {
                        Err(PollError::Incomplete(if resp.incomplete_reason.is_empty() {
                            "the replica does not say its view is complete (too old for this controller?)".into()
                        } else {
                            resp.incomplete_reason
                        }))
                    } else {
                        Ok(())
                    }
                }
            };
            (addr.clone(), res, received)
        });
        let answers = join_all(calls).await;
        let mut out = PollResult {
            polled: answers.len(),
            ..Default::default()
        };
        for (addr, res, received) in answers {
            // A replica that answered, even with a partial view, saw what it reports: it can only
            // make a sandbox busier.
            if res.as_ref().map_or_else(PollError::answered, |()| true) {
                let r = &self.replicas[&addr];
                for (id, (t, open)) in &r.known {
                    // A stream still open is activity now, even if nothing changed since.
                    let t = if *open > 0 { received } else { *t };
                    out.activity.entry(id.clone()).or_default().push(t);
                }
            }
            match res {
                Ok(()) => {}
                Err(e) => {
                    if matches!(e, PollError::Failed(_) | PollError::TimedOut) {
                        // Start over with a full report next time.
                        if let Some(r) = self.replicas.get_mut(&addr) {
                            r.cursor = 0;
                        }
                    }
                    out.failed.push((addr, e));
                }
            }
        }
        out.complete = out.failed.is_empty() && out.polled > 0;
        out
    }

    /// Asks every replica to drop a sandbox's route (see [`Evictor::evict_everywhere`]).
    pub async fn evict_everywhere(&self, sandbox_id: &str) -> usize {
        self.evictor.evict_everywhere(sandbox_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandgate_shared::control::{
        control_server::{Control, ControlServer},
        EvictRouteResponse, GetLastActiveResponse, SandboxActivity,
    };

    /// A replica that answers warm, with one sandbox, and the completeness it is given; it
    /// records the cursor of every call, and answers a full report to cursor 0 only.
    struct Replica {
        complete: bool,
        cursors: Arc<Mutex<Vec<u64>>>,
    }

    #[tonic::async_trait]
    impl Control for Replica {
        async fn get_last_active(
            &self,
            req: tonic::Request<GetLastActiveRequest>,
        ) -> Result<tonic::Response<GetLastActiveResponse>, tonic::Status> {
            let cursor = req.into_inner().cursor;
            self.cursors.lock().unwrap().push(cursor);
            Ok(tonic::Response::new(GetLastActiveResponse {
                replica: "r".into(),
                boot_id: "b".into(),
                warm: true,
                full: cursor == 0,
                cursor: cursor + 1,
                sandboxes: vec![SandboxActivity {
                    sandbox_id: "sbx-a".into(),
                    idle_ms: 1000,
                    open_streams: 0,
                }],
                complete: self.complete,
                incomplete_reason: if self.complete {
                    String::new()
                } else {
                    "an envoy's counters are unread".into()
                },
            }))
        }
        async fn evict_route(
            &self,
            _: tonic::Request<EvictRouteRequest>,
        ) -> Result<tonic::Response<EvictRouteResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not here"))
        }
    }

    async fn serve(complete: bool) -> ReplicaAddr {
        serve_recording(complete).await.0
    }

    async fn serve_recording(complete: bool) -> (ReplicaAddr, Arc<Mutex<Vec<u64>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cursors = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ControlServer::new(Replica {
                    complete,
                    cursors: cursors.clone(),
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr.into(), cursors)
    }

    #[tokio::test]
    async fn incremental_reports_follow_the_cursor_and_a_full_one_comes_on_schedule() {
        let (addr, cursors) = serve_recording(true).await;
        let mut poller = Poller::new("t", Duration::from_secs(2), Duration::from_secs(30)).unwrap();
        for _ in 0..3 {
            assert!(poller.poll(std::slice::from_ref(&addr)).await.complete);
        }
        assert_eq!(*cursors.lock().unwrap(), [0, 1, 2]);

        // With full reports due every poll, every call starts over.
        let (addr, cursors) = serve_recording(true).await;
        let mut poller = Poller::new("t", Duration::from_secs(2), Duration::ZERO).unwrap();
        for _ in 0..3 {
            assert!(poller.poll(std::slice::from_ref(&addr)).await.complete);
        }
        assert_eq!(*cursors.lock().unwrap(), [0, 0, 0]);
    }

    #[tokio::test]
    async fn an_incomplete_view_makes_the_poll_partial_but_its_activity_still_counts() {
        let complete = serve(true).await;
        let partial = serve(false).await;
        let mut poller = Poller::new("t", Duration::from_secs(2), Duration::from_secs(30)).unwrap();
        let poll = poller.poll(std::slice::from_ref(&complete)).await;
        assert!(poll.complete && poll.failed.is_empty());

        let poll = poller.poll(&[complete, partial.clone()]).await;
        assert!(!poll.complete, "an incomplete view must stop releases");
        assert_eq!(poll.failed.len(), 1);
        let (addr, err) = &poll.failed[0];
        assert_eq!(addr, &partial);
        assert_eq!(err.label(), "incomplete");
        assert!(matches!(err, PollError::Incomplete(why) if why.contains("unread")));
        // Both replicas' reports count as activity: a partial view only ever makes it busier.
        assert_eq!(poll.activity["sbx-a"].len(), 2);
    }
}
