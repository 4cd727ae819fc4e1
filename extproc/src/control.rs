//! The control API server (`sandgate.control.v1.Control`), polled by sandgate-controller.
//! Every call must carry `authorization: Bearer <token>`, compared in constant time.
//!
//! A report never makes a sandbox look idler than what was seen: idle times are counted only up
//! to the last reading of every Envoy holding hot routes, and the report says it is incomplete
//! once that reading is older than the fast path's staleness bound.

use std::sync::Arc;
use std::time::Duration;

use sandgate_shared::control::{
    control_server::{Control, ControlServer},
    EvictRouteRequest, EvictRouteResponse, GetLastActiveRequest, GetLastActiveResponse,
    SandboxActivity,
};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use crate::activity::ActivityTable;
use crate::fastpath::{Completeness, FastPath};
use crate::index::SandboxKey;
use crate::resolver::Resolver;

pub struct ControlApi {
    pub activity: Arc<ActivityTable>,
    pub resolver: Arc<Resolver>,
    pub replica: String,
    pub boot_id: String,
    pub warm: Box<dyn Fn() -> bool + Send + Sync>,
    /// Hot routes in this replica's Envoy, withdrawn before an eviction answers.
    pub fast: Option<Arc<FastPath>>,
}

/// How long an eviction waits for the replica's Envoy to drop the sandbox's hot routes.
pub const EVICT_SETTLE: Duration = Duration::from_secs(1);

/// Checks the bearer token of a call.
#[derive(Clone)]
pub struct BearerAuth(Arc<[u8]>);

impl BearerAuth {
    pub fn new(token: &str) -> Self {
        BearerAuth(token.trim().as_bytes().into())
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes)
            .unwrap_or_default();
        if !self.0.is_empty() && bool::from(presented.ct_eq(&self.0)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }
}

impl ControlApi {
    pub fn into_service(
        self,
        auth: BearerAuth,
    ) -> tonic::service::interceptor::InterceptedService<ControlServer<Self>, BearerAuth> {
        ControlServer::with_interceptor(self, auth)
    }
}

#[tonic::async_trait]
impl Control for ControlApi {
    async fn get_last_active(
        &self,
        request: Request<GetLastActiveRequest>,
    ) -> Result<Response<GetLastActiveResponse>, Status> {
        let req = request.into_inner();
        // Read warmth first: a report is only as complete as the index was before it was taken.
        let warm = (self.warm)();
        let cursor = if req.boot_id == self.boot_id {
            req.cursor
        } else {
            0
        };
        let activity = self.activity.clone();
        let snap = tokio::task::spawn_blocking(move || activity.snapshot(cursor))
            .await
            .map_err(|e| Status::internal(format!("snapshot failed: {e}")))?;
        // Read after the snapshot, so the gap it names covers every idle time in it.
        let view = match &self.fast {
            Some(fast) => fast.completeness(std::time::Instant::now()),
            None => Completeness {
                lag: Duration::ZERO,
                incomplete: None,
            },
        };
        if let Some(why) = &view.incomplete {
            tracing::warn!(reason = %why, "activity report incomplete: the controller releases nothing while it is");
        }
        Ok(Response::new(GetLastActiveResponse {
            replica: self.replica.clone(),
            boot_id: self.boot_id.clone(),
            warm,
            full: snap.full,
            cursor: snap.cursor,
            sandboxes: snap
                .sandboxes
                .into_iter()
                .map(|r| SandboxActivity {
                    sandbox_id: r.id.as_str().to_string(),
                    // Requests in the gap are not known yet: count it as activity.
                    idle_ms: r.idle.saturating_sub(view.lag).as_millis() as u64,
                    open_streams: r.open_streams,
                })
                .collect(),
            complete: view.incomplete.is_none(),
            incomplete_reason: view.incomplete.unwrap_or_default(),
        }))
    }

    async fn evict_route(
        &self,
        request: Request<EvictRouteRequest>,
    ) -> Result<Response<EvictRouteResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        let key = SandboxKey::new(&id)
            .ok_or_else(|| Status::invalid_argument(format!("invalid sandbox id {id:?}")))?;
        let routed = self.resolver.index().evict(&key);
        self.resolver.forget_lookup(&key).await;
        let tracked = self.activity.remove(key.as_str());
        // The index no longer holds the route: once Envoy has the table as it is now, it holds
        // no hot route to the sandbox either.
        let withdrawn = match &self.fast {
            Some(fast) => fast.settle(EVICT_SETTLE).await,
            None => true,
        };
        if let Some(fast) = &self.fast {
            match withdrawn {
                true => fast.metrics.evictions_confirmed.inc(),
                false => fast.metrics.evictions_unconfirmed.inc(),
            };
        }
        if withdrawn {
            tracing::info!(sandbox_id = %id, routed, tracked, "route evicted");
        } else {
            tracing::warn!(sandbox_id = %id, routed, tracked, within = ?EVICT_SETTLE, "route evicted, but envoy has not confirmed dropping its hot routes yet");
        }
        Ok(Response::new(EvictRouteResponse {
            evicted: routed || tracked,
            hot_routes_withdrawn: withdrawn,
        }))
    }
}
