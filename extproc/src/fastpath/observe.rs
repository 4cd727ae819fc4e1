//! Watching one Envoy's hot routes: activity on them comes only from that Envoy's per-host
//! counters, so an Envoy whose counters are not being read must not hold hot routes.
//!
//! Each ADS stream has its own observer. It finds its Envoy's admin address ([`admin_target`]),
//! and every `--fast-path-activity-interval` reads, over one connection, `GET /runtime` and
//! `GET /clusters`. The runtime must hold this stream's identity token (sent in the stream's own
//! RTDS layer), so the counters read are proven to be those of the Envoy the stream serves, not
//! of another Envoy at the same address. [`Observation`] turns the readings into:
//! - whether the stream may hold hot routes ([`Observation::serving`]): only while a reading
//!   younger than `stale` proved its Envoy;
//! - which sandboxes were used (counters moved, or a request is open);
//! - after a gap in the readings of `stale` or more (or before any baseline), the sandboxes whose
//!   hot routes the Envoy held while unread, touched once the counters are read again or the
//!   Envoy holds no hot route any more, so a gap in what was seen can only make a sandbox look
//!   busier, never idler. A shorter gap needs no such touch: counters only grow, and Envoy keeps
//!   an ORIGINAL_DST host for its `cleanup_interval` (300 s shipped; it must stay above `stale`)
//!   after its last request, so the next reading's counters show every request in the gap;
//! - how far back everything the Envoy routed has been seen ([`Observation::seen_until`]), which
//!   the control API subtracts from every idle time it reports, and which marks the replica's
//!   report incomplete once older than `stale`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::sync::mpsc;

use super::envoy_stats::{parse_hosts, used, HostCounters};
use crate::index::SandboxKey;

/// The runtime key holding a stream's identity token, in the stream's RTDS layer.
pub const STREAM_KEY: &str = "sandgate.fast_path.stream";
/// The Envoy node metadata key that names its admin address (`ip:port`).
pub const ADMIN_METADATA_KEY: &str = "sandgate.envoy_admin";

/// Where a stream's counters are read, or why they cannot be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTarget {
    Read(SocketAddr),
    Unreadable(String),
}

/// The admin address of the Envoy on an ADS stream from `peer`: its node metadata's
/// [`ADMIN_METADATA_KEY`], else `default` (`--envoy-admin`). Only an address on the peer's own
/// host is read: a loopback address for a loopback peer (the same pod), else the peer's IP.
/// Anything else would let one Envoy's metadata point the extproc at another host.
pub fn admin_target(
    metadata: Option<&str>,
    default: SocketAddr,
    peer: Option<SocketAddr>,
) -> AdminTarget {
    let (addr, from) = match metadata {
        Some(raw) => match raw.trim().parse::<SocketAddr>() {
            Ok(a) => (a, "node metadata"),
            Err(_) => {
                return AdminTarget::Unreadable(format!(
                    "node metadata {ADMIN_METADATA_KEY}={raw:?} is not an ip:port"
                ))
            }
        },
        None => (default, "--envoy-admin"),
    };
    let Some(peer) = peer else {
        return AdminTarget::Unreadable("the stream's peer address is unknown".into());
    };
    let same_host = match (peer.ip(), addr.ip()) {
        (p, a) if p.is_loopback() => a.is_loopback(),
        (p, a) => canonical(p) == canonical(a),
    };
    if same_host {
        AdminTarget::Read(addr)
    } else {
        AdminTarget::Unreadable(format!(
            "admin address {addr} (from {from}) is not on the host of envoy's connection ({}); set node metadata {ADMIN_METADATA_KEY} to an address of that host",
            peer.ip()
        ))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One reading of an Envoy's counters.
pub type Reading = Result<HashMap<SocketAddr, HostCounters>, String>;

/// What a stream knows of its Envoy's counters. Pure: times are passed in.
#[derive(Debug)]
pub struct Observation {
    stale: Duration,
    started: Instant,
    last_ok: Option<Instant>,
    before: Option<HashMap<SocketAddr, HostCounters>>,
    unseen: HashSet<SandboxKey>,
    error: Option<String>,
}

impl Observation {
    pub fn new(stale: Duration, started: Instant) -> Self {
        Observation {
            stale,
            started,
            last_ok: None,
            before: None,
            unseen: HashSet::new(),
            error: None,
        }
    }

    /// Whether the Envoy may hold hot routes at `now`: a reading younger than `stale` proved it.
    pub fn serving(&self, now: Instant) -> bool {
        self.last_ok
            .is_some_and(|t| now.saturating_duration_since(t) <= self.stale)
    }

    /// The last error, while readings fail.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Takes a reading made at `at`. `held` are the hot routes the Envoy holds (destination and
    /// sandbox). Returns the sandboxes to touch.
    pub fn on_reading(
        &mut self,
        at: Instant,
        reading: Reading,
        held: &HashMap<SocketAddr, SandboxKey>,
    ) -> Vec<SandboxKey> {
        match reading {
            Ok(now) => {
                let mut touch: HashSet<SandboxKey> = std::mem::take(&mut self.unseen);
                // Counters only grow, and Envoy keeps an ORIGINAL_DST host for its cleanup
                // interval (300 s in the shipped configs) after its last request: across a gap
                // shorter than `stale`, every request shows in the counters compared below. Only
                // a longer gap (the report said it was incomplete) touches all that was held, so
                // an Envoy whose readings fail now and then does not keep every sandbox busy.
                let gap = at.saturating_duration_since(self.last_ok.unwrap_or(self.started));
                if self.before.is_some() && gap < self.stale {
                    touch.clear();
                }
                for dest in used(self.before.as_ref(), &now) {
                    if let Some(k) = held.get(&dest) {
                        touch.insert(*k);
                    }
                }
                self.before = Some(now);
                self.last_ok = Some(at);
                self.error = None;
                touch.into_iter().collect()
            }
            Err(e) => {
                self.unseen.extend(held.values().copied());
                self.error = Some(e);
                Vec::new()
            }
        }
    }

    /// The Envoy holds no hot route any more: whatever it held unread is touched now.
    pub fn on_holds_nothing(&mut self) -> Vec<SandboxKey> {
        self.unseen.drain().collect()
    }

    /// Everything the Envoy routed before this instant has been seen; `None` when it holds no hot
    /// route (everything it routes goes through ext_proc).
    pub fn seen_until(&self, holds_nothing: bool) -> Option<Instant> {
        if holds_nothing {
            None
        } else {
            Some(self.last_ok.unwrap_or(self.started))
        }
    }
}

/// How long one reading (both calls) may take.
pub fn read_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(200), Duration::from_secs(2))
}

/// Reads the host counters of `clusters` (the hot routes' clusters) from the Envoy at `admin`,
/// after checking that its runtime holds `token`. Both calls go over one connection, so they
/// reach the same process.
pub async fn read(
    admin: SocketAddr,
    token: &str,
    clusters: &[String],
    timeout: Duration,
) -> Reading {
    let call = async {
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("connect {admin}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("admin {admin}: {e}"))?;
        let conn = tokio::spawn(conn);
        let runtime = get(&mut sender, "/runtime").await?;
        match runtime_value(&runtime, STREAM_KEY) {
            Some(t) if t == token => {}
            Some(_) => {
                return Err(format!(
                    "the envoy at {admin} is not the one on this stream (its {STREAM_KEY} differs)"
                ))
            }
            None => {
                return Err(format!(
                    "the envoy at {admin} holds no {STREAM_KEY}: not the one on this stream, or its runtime layer lapsed"
                ))
            }
        }
        let text = get(&mut sender, "/clusters").await?;
        drop(sender);
        conn.abort();
        let mut hosts = HashMap::new();
        for cluster in clusters {
            hosts.extend(parse_hosts(&text, cluster));
        }
        Ok(hosts)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("admin {admin}: no answer within {timeout:?}")))
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> Result<String, String> {
    let req = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("GET {path}: status {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A key's final value in Envoy's `GET /runtime` JSON.
pub fn runtime_value(json: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = v.get("entries")?.get(key)?.get("final_value")?.as_str()?;
    (!s.is_empty()).then(|| s.to_string())
}

/// Reads `admin` every `interval` and sends each reading with its time, until the receiver goes.
pub async fn run(
    admin: SocketAddr,
    token: String,
    clusters: Vec<String>,
    interval: Duration,
    tx: mpsc::Sender<(Instant, Reading)>,
) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = read_timeout(interval);
    loop {
        every.tick().await;
        // Stamped before the calls: counters read later only hold more.
        let at = Instant::now();
        let reading = read(admin, &token, &clusters, timeout).await;
        if tx.send((at, reading)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_admin_address_must_be_on_the_peers_host() {
        let default = addr("127.0.0.1:9901");
        let local = Some(addr("127.0.0.1:40000"));
        let remote = Some(addr("10.1.2.3:40000"));
        assert_eq!(
            admin_target(None, default, local),
            AdminTarget::Read(default)
        );
        assert_eq!(
            admin_target(Some("127.0.0.1:19901"), default, local),
            AdminTarget::Read(addr("127.0.0.1:19901"))
        );
        assert_eq!(
            admin_target(Some("10.1.2.3:9901"), default, remote),
            AdminTarget::Read(addr("10.1.2.3:9901"))
        );
        // Another host, a loopback address for a remote peer, garbage, an unknown peer.
        for (meta, peer) in [
            (Some("10.9.9.9:9901"), remote),
            (None, remote),
            (Some("10.1.2.3:9901"), local),
            (Some("localhost:9901"), local),
            (None, None),
        ] {
            assert!(
                matches!(
                    admin_target(meta, default, peer),
                    AdminTarget::Unreadable(_)
                ),
                "{meta:?} from {peer:?}"
            );
        }
        // An IPv4 peer seen as IPv6-mapped is the same host.
        assert_eq!(
            admin_target(
                Some("10.1.2.3:9901"),
                default,
                Some(addr("[::ffff:10.1.2.3]:4000"))
            ),
            AdminTarget::Read(addr("10.1.2.3:9901"))
        );
    }

    #[test]
    fn the_stream_token_is_read_from_the_runtime_json() {
        let json = r#"{"layers":["static","sandgate-fast-path","admin"],"entries":{
            "sandgate.fast_path.stream":{"final_value":"tok-1","layer_values":["","tok-1",""]},
            "sandgate.fast_path.valid":{"final_value":"100","layer_values":["","100",""]}}}"#;
        assert_eq!(runtime_value(json, STREAM_KEY).as_deref(), Some("tok-1"));
        assert_eq!(runtime_value(json, "absent"), None);
        assert_eq!(runtime_value("not json", STREAM_KEY), None);
    }

    fn key(s: &str) -> SandboxKey {
        SandboxKey::new(s).unwrap()
    }

    fn counters(entries: &[(&str, u64, u64)]) -> Reading {
        Ok(entries
            .iter()
            .map(|(a, requests, open)| {
                (
                    addr(a),
                    HostCounters {
                        requests: *requests,
                        open: *open,
                    },
                )
            })
            .collect())
    }

    #[test]
    fn serving_needs_a_fresh_proof_and_what_went_unread_is_touched_later() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let stale = Duration::from_secs(3);
        let mut o = Observation::new(stale, t0);
        let held: HashMap<SocketAddr, SandboxKey> = [
            (addr("10.0.0.1:80"), key("a")),
            (addr("10.0.0.2:80"), key("b")),
        ]
        .into();
        // Never read: no hot routes, and nothing it holds is seen past the stream's start.
        assert!(!o.serving(t0));
        assert_eq!(o.seen_until(false), Some(t0));
        assert_eq!(o.seen_until(true), None);
        // The first reading is a baseline: only an open request counts.
        let touched = o.on_reading(
            s(1),
            counters(&[("10.0.0.1:80", 5, 0), ("10.0.0.2:80", 1, 1)]),
            &held,
        );
        assert_eq!(touched, [key("b")]);
        assert!(o.serving(s(1)) && o.serving(s(4)) && !o.serving(s(5)));
        assert_eq!(o.seen_until(false), Some(s(1)));
        // A failed reading touches nothing yet, remembers what the Envoy held, keeps the last proof.
        assert!(o.on_reading(s(2), Err("down".into()), &held).is_empty());
        assert_eq!(o.error(), Some("down"));
        assert_eq!(o.seen_until(false), Some(s(1)));
        // Read again within `stale`: the counters cover the gap, so only what moved is touched
        // (a reading failing now and then must not keep every sandbox busy).
        let touched = o.on_reading(
            s(3),
            counters(&[("10.0.0.1:80", 6, 0), ("10.0.0.2:80", 1, 0)]),
            &held,
        );
        assert_eq!(touched, [key("a")]);
        assert_eq!(o.error(), None);
        // Unread for longer than `stale` (the reports said so): everything held is touched.
        o.on_reading(s(4), Err("down".into()), &held);
        let mut touched = o.on_reading(
            s(6),
            counters(&[("10.0.0.1:80", 6, 0), ("10.0.0.2:80", 1, 0)]),
            &held,
        );
        touched.sort_by_key(|k| k.as_str().to_string());
        assert_eq!(touched, [key("a"), key("b")]);
        // With no baseline yet, what was held unread is touched whatever the gap.
        let mut fresh = Observation::new(stale, t0);
        fresh.on_reading(s(1), Err("down".into()), &held);
        let mut touched = fresh.on_reading(s(2), counters(&[]), &held);
        touched.sort_by_key(|k| k.as_str().to_string());
        assert_eq!(touched, [key("a"), key("b")]);
        // Unread long enough to stop serving; once the Envoy holds nothing, its routes are touched.
        o.on_reading(s(7), Err("down".into()), &held);
        assert!(!o.serving(s(10)));
        let mut touched = o.on_holds_nothing();
        touched.sort_by_key(|k| k.as_str().to_string());
        assert_eq!(touched, [key("a"), key("b")]);
        assert!(o.on_holds_nothing().is_empty(), "touched once");
    }
}
