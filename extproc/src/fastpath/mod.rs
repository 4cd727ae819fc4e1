//! The fast path: hot sandbox hosts routed by Envoy itself, with no ext_proc call per request.
//!
//! 1. When ext_proc routes a request addressed by host (`<port>-<id>.<domain>` or
//!    `<id>.<domain>`), the host is offered here ([`FastPath::offer`]: one lock-free lookup when
//!    the host is already hot).
//! 2. The sync task computes each offered host's destination from the route index alone, and
//!    recomputes the hosts of every sandbox the index changes (claims, releases, deletions, IP
//!    changes, evictions), so the table never says more than the index does. Past
//!    `--fast-path-max-routes` the hosts of the least recently active sandboxes go.
//! 3. Each Envoy's ADS stream ([`ads`]) carries the table as VHDS virtual hosts, incrementally,
//!    plus a validity flag with a TTL ([`session`]). Without the flag (sandgate dead, hung or
//!    disconnected for a TTL) Envoy sends hot hosts through ext_proc again.
//! 4. Activity on hot routes comes from each Envoy's per-host counters ([`envoy_stats`]), read
//!    from its admin API every `--fast-path-activity-interval` by the stream's observer
//!    ([`observe`]), which proves whose counters it read. An Envoy whose counters cannot be read
//!    gets no hot routes (or loses them), so its requests go through ext_proc, which sees each
//!    one; until it holds none, the replica reports its view as incomplete. Long-lived requests
//!    still reach the access-log stream, which names the sandbox by its route.
//!
//! It must never put a destination in Envoy that the route index does not hold now, and never let
//! a request go unseen: a sandbox's idleness is reported only as of the last reading of every
//! Envoy that may have routed to it.

pub mod ads;
pub mod envoy_stats;
pub mod observe;
pub mod resources;
pub mod session;
pub mod table;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sandgate_shared::address::{AddressConfig, AddressForm, RequestParts};
use tokio::sync::{watch, Notify};

use crate::activity::ActivityTable;
use crate::decision::{decide, Decision};
use crate::index::{RouteIndex, SandboxKey};
use crate::metrics::FastPathMetrics;
use crate::resolver::Resolved;
use crate::shutdown::Shutdown;

pub use resources::RouteTemplate;
use table::{HotRoute, HotTable};

/// Most hot hosts (ports, and the `<id>.<domain>` form) one sandbox may have; its other hosts
/// stay on the ext_proc path.
pub const MAX_HOSTS_PER_SANDBOX: usize = 16;

/// How the fast path runs (from the extproc's flags).
#[derive(Debug, Clone)]
pub struct FastPathConfig {
    /// Off: Envoy is still answered on its ADS stream, but told of no hot route.
    pub enabled: bool,
    pub template: RouteTemplate,
    /// Most hot hosts held in Envoy.
    pub max_routes: usize,
    /// How long Envoy keeps using hot routes after sandgate stops confirming them.
    pub ttl: Duration,
    /// How long changes are gathered before one push.
    pub batch: Duration,
    /// How often Envoy's per-host counters are read for activity.
    pub activity_interval: Duration,
    /// The admin address of an Envoy that does not name its own in its node metadata
    /// ([`observe::ADMIN_METADATA_KEY`]).
    pub envoy_admin: SocketAddr,
    /// The envd port, whose hosts are never hot (ext_proc checks every path on it).
    pub envd_port: Option<u16>,
}

impl FastPathConfig {
    /// How old the last reading of an Envoy's counters may be before it loses its hot routes and
    /// the replica's report turns incomplete: three reading intervals.
    pub fn stale(&self) -> Duration {
        self.activity_interval * 3
    }
}

/// One ADS stream's place in the table's change log, and how far its Envoy has been seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMark {
    /// The oldest change it may still need.
    pub needed: u64,
    /// Every change up to this one is applied in its Envoy.
    pub applied: u64,
    /// Every request its Envoy routed by a hot route before this was seen; `None` while it holds
    /// no hot route.
    pub seen_until: Option<Instant>,
    /// Why its counters are not being read, while they are not.
    pub unread: Option<String>,
}

/// How complete this replica's view of activity is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completeness {
    /// How far back the least recently read Envoy with hot routes was seen (zero with none).
    pub lag: Duration,
    /// Set when `lag` is past the staleness bound: which stream, and why.
    pub incomplete: Option<String>,
}

/// Hosts and sandboxes the sync task must look at.
#[derive(Default)]
struct Pending {
    hosts: HashMap<String, SandboxKey>,
    sandboxes: HashSet<SandboxKey>,
}

pub struct FastPath {
    pub config: FastPathConfig,
    pub template: Arc<RouteTemplate>,
    addresses: AddressConfig,
    default_port: Option<u16>,
    index: Arc<RouteIndex>,
    activity: Arc<ActivityTable>,
    table: Mutex<HotTable>,
    /// The table's hosts, readable without its lock (the ext_proc hot path asks).
    hot: papaya::HashSet<String>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// The table's cursor after each change; every ADS stream watches it.
    changes: watch::Sender<u64>,
    /// Where each live stream is, by stream number.
    streams: Mutex<HashMap<u64, StreamMark>>,
    /// Bumped whenever a stream's Envoy confirms a push.
    applied: watch::Sender<()>,
    /// The table cursor of the latest change that took a destination away (a removal or a new
    /// destination): streams push such changes at once, without the batching delay.
    urgent: AtomicU64,
    pub metrics: FastPathMetrics,
    pub shutdown: Shutdown,
}

impl FastPath {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: FastPathConfig,
        addresses: AddressConfig,
        default_port: Option<u16>,
        index: Arc<RouteIndex>,
        activity: Arc<ActivityTable>,
        metrics: FastPathMetrics,
        shutdown: Shutdown,
    ) -> Arc<FastPath> {
        let fast = Arc::new(FastPath {
            template: Arc::new(config.template.clone()),
            table: Mutex::new(HotTable::new(config.max_routes)),
            config,
            addresses,
            default_port,
            index: index.clone(),
            activity,
            hot: papaya::HashSet::new(),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            changes: watch::channel(0).0,
            streams: Mutex::new(HashMap::new()),
            applied: watch::channel(()).0,
            urgent: AtomicU64::new(0),
            metrics,
            shutdown,
        });
        if fast.config.enabled {
            let weak = Arc::downgrade(&fast);
            let set = index.set_listener(Box::new(move |key| {
                if let Some(fast) = weak.upgrade() {
                    fast.index_changed(key);
                }
            }));
            assert!(set, "the route index already has a listener");
        }
        fast
    }

    /// Starts the sync task and the activity poller.
    pub fn spawn(self: &Arc<Self>) {
        if !self.config.enabled {
            return;
        }
        tokio::spawn(self.clone().sync_loop());
    }

    /// ext_proc routed a request for `sandbox` addressed by the host in `authority`: make the
    /// host hot. Cheap when it already is.
    pub fn offer(&self, authority: &[u8], form: AddressForm, sandbox: &str) {
        if !self.config.enabled || !matches!(form, AddressForm::Host | AddressForm::HostWithPort) {
            return;
        }
        let Some(host) = canonical_host(authority) else {
            return;
        };
        if self.hot.pin().contains(host.as_ref()) {
            return;
        }
        let Some(key) = SandboxKey::new(sandbox) else {
            return;
        };
        self.lock_pending().hosts.insert(host.into_owned(), key);
        self.wake.notify_one();
    }

    /// The index changed `key`'s entry: its hot hosts must be looked at again.
    fn index_changed(&self, key: SandboxKey) {
        if !self.hot_sandbox(&key) {
            return;
        }
        self.lock_pending().sandboxes.insert(key);
        self.wake.notify_one();
    }

    fn hot_sandbox(&self, key: &SandboxKey) -> bool {
        if !self.lock_table().hosts_of(key).is_empty() {
            return true;
        }
        // A host offered but not yet looked at may belong to it.
        self.lock_pending().hosts.values().any(|k| k == key)
    }

    /// Records where stream `id` is (see [`StreamMark`]).
    fn note_stream(&self, id: u64, mark: StreamMark) {
        let applied = mark.applied;
        let old = self.lock_streams().insert(id, mark);
        if old.is_none_or(|o| o.applied != applied) {
            self.applied.send_replace(());
        }
    }

    /// How complete the view of activity is at `now`: every Envoy holding hot routes must have
    /// had its counters read within the staleness bound.
    pub fn completeness(&self, now: Instant) -> Completeness {
        let streams = self.lock_streams();
        let oldest = streams
            .iter()
            .filter_map(|(id, m)| Some((m.seen_until?, id, m)))
            .min_by_key(|(t, ..)| *t);
        let Some((seen, id, mark)) = oldest else {
            return Completeness {
                lag: Duration::ZERO,
                incomplete: None,
            };
        };
        let lag = now.saturating_duration_since(seen);
        let incomplete = (lag > self.config.stale()).then(|| {
            format!(
                "the envoy on hot-route stream {id} holds hot routes whose counters were last read {lag:?} ago ({})",
                mark.unread.as_deref().unwrap_or("no reading yet")
            )
        });
        Completeness { lag, incomplete }
    }

    fn forget_stream(&self, id: u64) {
        self.lock_streams().remove(&id);
        self.applied.send_replace(());
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<u64, StreamMark>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a change at or after `cursor` took a destination away.
    fn urgent_since(&self, cursor: u64) -> bool {
        self.urgent.load(Ordering::Acquire) > cursor
    }

    /// Brings the table up to date with the index now and waits, up to `within`, until every
    /// connected Envoy has applied it: after a `true`, no Envoy routes by a hot route the index
    /// no longer holds (an evicted sandbox's, say). `false` when one did not confirm in time;
    /// its validity flag still lapses if it never does.
    pub async fn settle(&self, within: Duration) -> bool {
        if !self.config.enabled {
            return true;
        }
        let mut confirmed = self.applied.subscribe();
        self.sync_once();
        let target = self.lock_table().cursor();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.lock_streams().values().all(|m| m.applied >= target) {
                return true;
            }
            match tokio::time::timeout_at(deadline, confirmed.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    fn lock_table(&self) -> MutexGuard<'_, HotTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `host` goes according to the index now, if it routes at all.
    fn resolve(&self, host: &str) -> Option<HotRoute> {
        let parts = RequestParts {
            authority: host.as_bytes(),
            ..Default::default()
        };
        let addr = self.addresses.parse(parts).ok()?;
        if !matches!(addr.form, AddressForm::Host | AddressForm::HostWithPort) {
            return None;
        }
        let route = self.index.get(&addr.id)?;
        match decide(addr, Resolved::Found(route), self.default_port) {
            Decision::Route {
                id,
                dest,
                rewritten_path: None,
                h2,
            } if Some(dest.port()) != self.config.envd_port => Some(HotRoute {
                sandbox: SandboxKey::new(&id)?,
                dest,
                h2,
            }),
            _ => None,
        }
    }

    async fn sync_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.shutdown.wait() => return,
            }
            self.sync_once();
        }
    }

    /// Looks at everything pending: offered hosts and sandboxes the index changed. The pending
    /// set is taken before the index is read, so an index change made after that read is
    /// pending again and looked at by the next round.
    pub fn sync_once(&self) {
        let mut table = self.lock_table();
        let pending = std::mem::take(&mut *self.lock_pending());
        let before = table.cursor();
        let mut urgent = false;
        for (host, _) in pending.hosts {
            let route = self.resolve(&host).filter(|r| {
                // One sandbox cannot fill the table (and churn Envoy's) with port after port.
                table.get(&host).is_some()
                    || table.hosts_of(&r.sandbox).len() < MAX_HOSTS_PER_SANDBOX
            });
            urgent |= self.apply(&mut table, &host, route);
        }
        for sandbox in pending.sandboxes {
            for host in table.hosts_of(&sandbox).to_vec() {
                let route = self.resolve(&host);
                urgent |= self.apply(&mut table, &host, route);
            }
        }
        let evict =
            table.over_capacity(|k| self.activity.last_active_ms(k.as_str()).unwrap_or(i64::MIN));
        for host in &evict {
            self.apply(&mut table, host, None);
        }
        self.metrics.evicted.inc_by(evict.len() as u64);
        self.metrics.routes.set(table.len() as i64);
        let oldest = self.oldest_cursor(table.cursor());
        table.trim(oldest);
        if urgent {
            self.urgent.store(table.cursor(), Ordering::Release);
        }
        if table.cursor() != before {
            self.changes.send_replace(table.cursor());
        }
    }

    /// Sets `host`'s route; returns whether that took a destination away from it.
    fn apply(&self, table: &mut HotTable, host: &str, route: Option<HotRoute>) -> bool {
        let old = table.get(host);
        if table.set(host, route) {
            let hot = self.hot.pin();
            if route.is_some() {
                hot.insert(host.to_string());
            } else {
                hot.remove(host);
            }
        }
        old.is_some_and(|o| route.is_none_or(|r| r.dest != o.dest))
    }

    fn oldest_cursor(&self, current: u64) -> u64 {
        let streams = self.lock_streams();
        streams.values().map(|m| m.needed).min().unwrap_or(current)
    }

    /// Number of hot hosts.
    pub fn len(&self) -> usize {
        self.lock_table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host of an authority as Envoy matches virtual hosts: lower case, without a port (the
/// connection manager strips it), never with a trailing dot (those go through ext_proc).
pub fn canonical_host(authority: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let host = match authority.iter().rposition(|&b| b == b':') {
        Some(i) if authority.first() != Some(&b'[') => &authority[..i],
        _ => authority,
    };
    let host = std::str::from_utf8(host).ok()?;
    if host.is_empty() || host.ends_with('.') {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests;
