//! One Envoy's delta ADS stream, as a state machine with no I/O (driven by `ads`).
//!
//! Two resource types share the stream:
//! - **VirtualHost** (VHDS): the hot routes. The first push of a stream answers Envoy's first
//!   request: every hot route Envoy does not already hold with the same destination, and the
//!   removal of everything it holds that is not current (after a restart of either side, Envoy
//!   names what it holds in `initial_resource_versions`). Later pushes carry only what changed.
//!   One push is in flight at a time; the next waits for its acknowledgement.
//! - **Runtime** (RTDS): one layer holding the validity flag and the stream's identity token,
//!   sent with a TTL and refreshed every quarter TTL. The flag is on while the first push has
//!   been acknowledged and no push has waited longer than [`UNACKNOWLEDGED_TTLS`] TTLs; it is
//!   turned off at once when that stops being true, and the layer is removed on a rejected push.
//!   (A push is slow to be acknowledged mostly while Envoy rebuilds its route table, about
//!   0.15–0.5 s at 10 000 hot routes here: Envoy applies the stream in order, so withdrawing the
//!   flag sooner would change nothing before the push itself applies, and would only make a
//!   large table flap.)
//!
//! Hot routes go only to a stream that is serving ([`Session::set_serving`]): one whose Envoy's
//! counters are being read. A stream that stops serving has every hot route removed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::index::SandboxKey;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

use super::resources::{self, RouteTemplate, RUNTIME_LAYER, RUNTIME_TYPE, VIRTUAL_HOST_TYPE};
use super::table::{Changes, HotRoute, HotTable};

/// How many TTLs a push may wait for its acknowledgement before the flag is withdrawn.
pub const UNACKNOWLEDGED_TTLS: u32 = 5;

/// Why a stream must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("envoy rejected {type_url} push {nonce}: {message}")]
    Rejected {
        type_url: String,
        nonce: String,
        message: String,
    },
}

impl SessionError {
    pub fn label(&self) -> &'static str {
        match self {
            SessionError::Rejected { .. } => "rejected",
        }
    }
}

/// A push Envoy has not acknowledged yet.
#[derive(Debug, Clone)]
struct InFlight {
    nonce: String,
    sent_at: Instant,
    first: bool,
    /// The table cursor this push brings Envoy to.
    cursor: u64,
}

/// What a push carried, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    pub upserts: usize,
    pub removals: usize,
}

pub struct Session {
    template: std::sync::Arc<RouteTemplate>,
    ttl: Duration,
    /// Whether hot routes may be sent at all (`--fast-path`); without it the stream only answers.
    enabled: bool,
    /// Whether this stream's Envoy may hold hot routes now: its counters are being read
    /// ([`super::observe`]). Without it, everything it holds is removed.
    serving: bool,
    /// The next push compares everything (serving changed).
    resync: bool,
    /// This stream's identity, in its runtime layer, so a reading of an Envoy's counters can
    /// prove which Envoy it read.
    token: String,
    nonce: u64,
    // VHDS
    vhds_subscribed: bool,
    /// What Envoy said it held when it subscribed, until the first push answers it.
    initial: Option<HashMap<String, String>>,
    /// What Envoy holds once the push in flight applies.
    sent: HashMap<String, HotRoute>,
    cursor: u64,
    /// The table cursor Envoy has confirmed applying.
    applied: u64,
    in_flight: Option<InFlight>,
    synced: bool,
    // RTDS
    rtds_subscribed: bool,
    valid_sent: bool,
    valid_version: u64,
    last_valid: Option<Instant>,
}

impl Session {
    pub fn new(
        template: std::sync::Arc<RouteTemplate>,
        ttl: Duration,
        enabled: bool,
        token: String,
    ) -> Self {
        Session {
            template,
            ttl,
            enabled,
            serving: false,
            resync: false,
            token,
            nonce: 0,
            vhds_subscribed: false,
            initial: None,
            sent: HashMap::new(),
            cursor: 0,
            applied: 0,
            in_flight: None,
            synced: false,
            rtds_subscribed: false,
            valid_sent: false,
            valid_version: 0,
            last_valid: None,
        }
    }

    /// Hot routes Envoy holds (or will, once the push in flight applies).
    pub fn held(&self) -> usize {
        self.sent.len()
    }

    /// Whether the validity flag is currently sent as on.
    pub fn is_valid(&self) -> bool {
        self.valid_sent
    }

    /// Lets this stream's Envoy hold hot routes, or takes them all away. Returns whether that
    /// changed (a push is then due).
    pub fn set_serving(&mut self, serving: bool) -> bool {
        if self.serving == serving {
            return false;
        }
        self.serving = serving;
        self.resync = true;
        true
    }

    pub fn is_serving(&self) -> bool {
        self.serving
    }

    /// Whether Envoy holds no hot route, and will not once the push in flight applies: nothing
    /// sent, nothing in flight, nothing left from before the stream.
    pub fn holds_nothing(&self) -> bool {
        self.sent.is_empty()
            && self.in_flight.is_none()
            && self.initial.as_ref().is_none_or(HashMap::is_empty)
    }

    /// The destinations of the hot routes Envoy holds (or will, once the push in flight
    /// applies), with their sandboxes.
    pub fn held_destinations(&self) -> HashMap<SocketAddr, SandboxKey> {
        self.sent.values().map(|r| (r.dest, r.sandbox)).collect()
    }

    /// The table cursor of the last push.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The oldest table change this stream may still need (`u64::MAX`: none; a stream that
    /// starts serving again compares everything).
    pub fn needed(&self) -> u64 {
        if !self.vhds_subscribed || !self.enabled || !self.serving {
            u64::MAX
        } else {
            self.cursor
        }
    }

    /// The table cursor this stream's Envoy holds every change up to: nothing it holds is older.
    /// `u64::MAX` when it takes no hot routes (not subscribed, the fast path is off, or not
    /// serving and holding nothing).
    pub fn applied(&self) -> u64 {
        if !self.vhds_subscribed || !self.enabled || (!self.serving && self.holds_nothing()) {
            u64::MAX
        } else {
            self.applied
        }
    }

    /// Handles one request from Envoy: a subscription, an acknowledgement or a rejection. Returns
    /// the answers to send now and, for an acknowledged push, how long it took.
    pub fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<(Vec<DeltaDiscoveryResponse>, Option<Duration>), SessionError> {
        match req.type_url.as_str() {
            VIRTUAL_HOST_TYPE => self.on_vhds(req, now).map(|acked| (Vec::new(), acked)),
            RUNTIME_TYPE => self.on_rtds(req, now).map(|out| (out, None)),
            other => {
                tracing::warn!(
                    type_url = other,
                    "ADS request for a type sandgate does not serve; ignored"
                );
                Ok((Vec::new(), None))
            }
        }
    }

    fn on_vhds(
        &mut self,
        req: DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<Option<Duration>, SessionError> {
        if req.response_nonce.is_empty() {
            // A (re)subscription: answer it with a first push.
            self.vhds_subscribed = true;
            if self.initial.is_none() && !self.synced {
                self.initial = Some(req.initial_resource_versions);
            }
            return Ok(None);
        }
        let Some(flight) = self.in_flight.take_if(|f| f.nonce == req.response_nonce) else {
            return Ok(None); // an answer to an older push, already superseded
        };
        if let Some(err) = req.error_detail {
            return Err(SessionError::Rejected {
                type_url: req.type_url,
                nonce: flight.nonce,
                message: err.message,
            });
        }
        if flight.first {
            self.synced = true;
        }
        self.applied = self.applied.max(flight.cursor);
        Ok(Some(now.saturating_duration_since(flight.sent_at)))
    }

    fn on_rtds(
        &mut self,
        req: DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<Vec<DeltaDiscoveryResponse>, SessionError> {
        if let Some(err) = req.error_detail {
            return Err(SessionError::Rejected {
                type_url: req.type_url,
                nonce: req.response_nonce,
                message: err.message,
            });
        }
        if !req.response_nonce.is_empty() {
            return Ok(Vec::new());
        }
        // A subscription: Envoy waits for an answer before it starts, so give one at once.
        self.rtds_subscribed = true;
        Ok(self.validity(now, true).into_iter().collect())
    }

    /// The next VHDS push, if one is due and none is in flight.
    pub fn push(
        &mut self,
        table: &HotTable,
        now: Instant,
    ) -> Option<(DeltaDiscoveryResponse, PushStats)> {
        if !self.vhds_subscribed || self.in_flight.is_some() {
            return None;
        }
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let first = !self.synced;
        if let Some(initial) = self.initial.take() {
            // Envoy keeps what it holds with the same destination, gets the current destination
            // (below) for a host still hot, and loses the rest.
            for (name, version) in initial {
                let current = self
                    .template
                    .host_of(&name)
                    .and_then(|host| Some((host, table.get(host)?)))
                    .filter(|_| self.enabled && self.serving);
                match current {
                    Some((host, r)) if resources::version(r) == version => {
                        self.sent.insert(host.to_string(), r);
                    }
                    Some(_) => {}
                    None => removed.push(name),
                }
            }
            self.diff_all(table, &mut resources, &mut removed);
        } else if std::mem::take(&mut self.resync) {
            self.diff_all(table, &mut resources, &mut removed);
        } else {
            match table.changed_since(self.cursor) {
                Changes::Everything => self.diff_all(table, &mut resources, &mut removed),
                Changes::Hosts(hosts) => {
                    for host in hosts {
                        self.diff_one(&host, table, &mut resources, &mut removed);
                    }
                }
            }
        }
        self.cursor = table.cursor();
        if !first && resources.is_empty() && removed.is_empty() {
            // Envoy already holds the table as it is now.
            self.applied = self.cursor;
            return None;
        }
        let stats = PushStats {
            upserts: resources.len(),
            removals: removed.len(),
        };
        let nonce = self.next_nonce();
        self.in_flight = Some(InFlight {
            nonce: nonce.clone(),
            sent_at: now,
            first,
            cursor: self.cursor,
        });
        Some((
            DeltaDiscoveryResponse {
                type_url: VIRTUAL_HOST_TYPE.into(),
                resources,
                removed_resources: removed,
                nonce,
                ..Default::default()
            },
            stats,
        ))
    }

    fn diff_all(
        &mut self,
        table: &HotTable,
        resources: &mut Vec<envoy_types::pb::envoy::service::discovery::v3::Resource>,
        removed: &mut Vec<String>,
    ) {
        let mut hosts: Vec<String> = self.sent.keys().cloned().collect();
        if self.enabled && self.serving {
            hosts.extend(table.iter().map(|(h, _)| h.to_string()));
        }
        hosts.sort_unstable();
        hosts.dedup();
        for host in hosts {
            self.diff_one(&host, table, resources, removed);
        }
    }

    fn diff_one(
        &mut self,
        host: &str,
        table: &HotTable,
        resources: &mut Vec<envoy_types::pb::envoy::service::discovery::v3::Resource>,
        removed: &mut Vec<String>,
    ) {
        let want = table.get(host).filter(|_| self.enabled && self.serving);
        match (want, self.sent.get(host)) {
            (Some(r), Some(d)) if *d == r => {}
            (Some(r), _) => {
                resources.push(self.template.virtual_host(host, r));
                self.sent.insert(host.to_string(), r);
            }
            (None, Some(_)) => {
                removed.push(self.template.resource_name(host));
                self.sent.remove(host);
            }
            (None, None) => {}
        }
    }

    fn wants_valid(&self, now: Instant) -> bool {
        self.enabled
            && self.synced
            && self.in_flight.as_ref().is_none_or(|f| {
                now.saturating_duration_since(f.sent_at) < self.ttl * UNACKNOWLEDGED_TTLS
            })
    }

    /// The stream's runtime layer, when it must be sent: the validity flag turned on or off, or
    /// refreshed (every quarter TTL; the layer also carries the stream's identity, so it is sent
    /// whether the flag is on or not). `force` answers a subscription whatever the state.
    pub fn validity(&mut self, now: Instant, force: bool) -> Option<DeltaDiscoveryResponse> {
        if !self.rtds_subscribed {
            return None;
        }
        let want = self.wants_valid(now);
        let refresh_due = self
            .last_valid
            .is_none_or(|t| now.saturating_duration_since(t) >= self.ttl / 4);
        if !(force || want != self.valid_sent || refresh_due) {
            return None;
        }
        self.valid_version += 1;
        self.valid_sent = want;
        self.last_valid = Some(now);
        let nonce = self.next_nonce();
        Some(DeltaDiscoveryResponse {
            type_url: RUNTIME_TYPE.into(),
            resources: vec![resources::runtime_layer(
                self.ttl,
                self.valid_version,
                want,
                &self.token,
            )],
            nonce,
            ..Default::default()
        })
    }

    /// Withdraws the runtime layer, validity flag and identity both (before a stream ends on our
    /// side).
    pub fn withdraw(&mut self) -> Option<DeltaDiscoveryResponse> {
        if !self.rtds_subscribed || self.last_valid.is_none() {
            return None;
        }
        self.valid_sent = false;
        let nonce = self.next_nonce();
        Some(DeltaDiscoveryResponse {
            type_url: RUNTIME_TYPE.into(),
            removed_resources: vec![RUNTIME_LAYER.into()],
            nonce,
            ..Default::default()
        })
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }
}

#[cfg(test)]
mod tests;
