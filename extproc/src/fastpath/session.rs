//! One Envoy's delta ADS stream, as a state machine with no I/O (driven by `ads`).
//!
//! Two resource types share the stream:
//! - **VirtualHost** (VHDS): the hot routes, one virtual host per shard ([`super::resources`]).
//!   The first push of a stream answers Envoy's first request: every shard Envoy does not
//!   already hold at the same version (its version hashes its contents), and the removal of
//!   everything it holds that is not current (after a restart of either side, Envoy names what it
//!   holds in `initial_resource_versions`). Later pushes carry only the shards that changed,
//!   each whole. One push is in flight at a time; the next waits for its acknowledgement, so the
//!   changes made meanwhile (many hosts turning hot at once, say) go out together.
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

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::index::SandboxKey;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

use super::resources::{self, RouteTemplate, RUNTIME_LAYER, RUNTIME_TYPE, VIRTUAL_HOST_TYPE};
use super::table::{shard_of, Changes, HotRoute, HotTable};

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

/// One shard as Envoy holds it.
#[derive(Debug, Clone, Default)]
struct SentShard {
    version: String,
    hosts: Vec<(String, HotRoute)>,
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
    /// What Envoy holds once the push in flight applies: shard → its version and hosts.
    sent: HashMap<String, SentShard>,
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
        self.sent.values().map(|s| s.hosts.len()).sum()
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
        self.sent
            .values()
            .flat_map(|s| &s.hosts)
            .map(|(_, r)| (r.dest, r.sandbox))
            .collect()
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

    /// The next VHDS push, if one is due and none is in flight: every shard that changed since
    /// the last push, whole (a shard's virtual host is replaced at once).
    pub fn push(
        &mut self,
        table: &HotTable,
        now: Instant,
    ) -> Option<(DeltaDiscoveryResponse, PushStats)> {
        if !self.vhds_subscribed || self.in_flight.is_some() {
            return None;
        }
        let mut removed = Vec::new();
        let first = !self.synced;
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let everything = if let Some(initial) = self.initial.take() {
            // Envoy holds these from an earlier stream: the shards it holds at the version this
            // table would give them are kept; the rest are replaced or removed.
            for (name, version) in initial {
                match self.template.shard_of_resource(&name) {
                    Some(shard) => {
                        self.sent.insert(
                            shard.to_string(),
                            SentShard {
                                version,
                                hosts: Vec::new(),
                            },
                        );
                    }
                    None => removed.push(name),
                }
            }
            true
        } else if std::mem::take(&mut self.resync) {
            true
        } else {
            match table.changed_since(self.cursor) {
                Changes::Everything => true,
                Changes::Hosts(hosts) => {
                    dirty.extend(hosts.iter().filter_map(|h| shard_of(h)));
                    false
                }
            }
        };
        if everything {
            dirty.extend(self.sent.keys().cloned());
            if self.enabled && self.serving {
                dirty.extend(table.shards().map(str::to_string));
            }
        }
        let mut resources = Vec::new();
        for shard in dirty {
            self.diff_shard(&shard, table, &mut resources, &mut removed);
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

    /// Brings one shard in Envoy to what the table holds (nothing, when not serving).
    fn diff_shard(
        &mut self,
        shard: &str,
        table: &HotTable,
        resources: &mut Vec<envoy_types::pb::envoy::service::discovery::v3::Resource>,
        removed: &mut Vec<String>,
    ) {
        let hosts: Vec<(String, HotRoute)> = if self.enabled && self.serving {
            table
                .shard(shard)
                .map(|(h, r)| (h.to_string(), r))
                .collect()
        } else {
            Vec::new()
        };
        if hosts.is_empty() {
            if self.sent.remove(shard).is_some() {
                removed.push(self.template.resource_name(shard));
            }
            return;
        }
        let resource = self
            .template
            .shard(shard, hosts.iter().map(|(h, r)| (h.as_str(), *r)));
        let held = self.sent.get(shard).map(|s| s.version.as_str());
        let version = resource.version.clone();
        if held != Some(version.as_str()) {
            resources.push(resource);
        }
        self.sent
            .insert(shard.to_string(), SentShard { version, hosts });
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
