//! The hot-route table: which sandbox hosts Envoy routes by itself, and the pod address each one
//! goes to. Pure: no I/O, no protobuf, no clock.
//!
//! Only the fast path's sync task writes it, with destinations it has just read from the route
//! index. Every change is numbered in a log, so each xDS stream sends Envoy only what changed since
//! its last push (a stream too far behind is resent everything).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

use crate::index::SandboxKey;

/// Where one hot host goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotRoute {
    pub sandbox: SandboxKey,
    pub dest: SocketAddr,
    /// The port is served as HTTP/2 cleartext.
    pub h2: bool,
}

/// What changed since a stream's cursor.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// These hosts changed (each is now in the table or not).
    Hosts(Vec<String>),
    /// The log no longer reaches back that far: compare everything.
    Everything,
}

/// The shard a host belongs to: the suffix wildcard domain its shard's virtual host matches,
/// `*<c>.<domain>` where `c` is the last character of the host's first label (the sandbox ID's last
/// character, random for sandgate's IDs). `None` for a host no wildcard can match (a one-character
/// label: Envoy's wildcards never match an empty string).
pub fn shard_of(host: &str) -> Option<String> {
    let (label, domain) = host.split_once('.')?;
    let last = label.chars().last()?;
    (label.len() >= 2 && !domain.is_empty()).then(|| format!("*{last}.{domain}"))
}

pub struct HotTable {
    routes: HashMap<String, HotRoute>,
    hosts_of: HashMap<SandboxKey, Vec<String>>,
    /// Shard → its hosts, in order (a shard's virtual host lists them so).
    shards: HashMap<String, BTreeSet<String>>,
    log: VecDeque<(u64, String)>,
    seq: u64,
    /// Log entries at or below this sequence were dropped.
    trimmed_through: u64,
    capacity: usize,
}

impl HotTable {
    /// A table that holds at most `capacity` hosts (at least one).
    pub fn new(capacity: usize) -> Self {
        HotTable {
            routes: HashMap::new(),
            hosts_of: HashMap::new(),
            shards: HashMap::new(),
            log: VecDeque::new(),
            seq: 0,
            trimmed_through: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, host: &str) -> Option<HotRoute> {
        self.routes.get(host).copied()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Every hot host and its route.
    pub fn iter(&self) -> impl Iterator<Item = (&str, HotRoute)> {
        self.routes.iter().map(|(h, r)| (h.as_str(), *r))
    }

    /// The hot hosts of one shard (see [`shard_of`]).
    pub fn shard(&self, shard: &str) -> impl Iterator<Item = (&str, HotRoute)> {
        self.shards
            .get(shard)
            .into_iter()
            .flatten()
            .filter_map(|h| Some((h.as_str(), *self.routes.get(h)?)))
    }

    /// Every shard that holds a host.
    pub fn shards(&self) -> impl Iterator<Item = &str> {
        self.shards.keys().map(String::as_str)
    }

    /// The hot hosts of one sandbox.
    pub fn hosts_of(&self, sandbox: &SandboxKey) -> &[String] {
        self.hosts_of.get(sandbox).map_or(&[], Vec::as_slice)
    }

    /// Sets a host's route, or removes the host with `None`. Returns whether anything changed.
    /// A host no shard can hold is never set.
    pub fn set(&mut self, host: &str, route: Option<HotRoute>) -> bool {
        let old = self.routes.get(host).copied();
        if old == route {
            return false;
        }
        let Some(shard) = shard_of(host) else {
            return false;
        };
        match route {
            Some(_) => {
                self.shards
                    .entry(shard)
                    .or_default()
                    .insert(host.to_string());
            }
            None => {
                if let Some(hosts) = self.shards.get_mut(&shard) {
                    hosts.remove(host);
                    if hosts.is_empty() {
                        self.shards.remove(&shard);
                    }
                }
            }
        }
        if let Some(old) = old {
            if route.is_none_or(|r| r.sandbox != old.sandbox) {
                self.unlink(host, old.sandbox);
            }
        }
        match route {
            Some(r) => {
                if old.is_none_or(|o| o.sandbox != r.sandbox) {
                    self.hosts_of
                        .entry(r.sandbox)
                        .or_default()
                        .push(host.to_string());
                }
                self.routes.insert(host.to_string(), r);
            }
            None => {
                self.routes.remove(host);
            }
        }
        self.seq += 1;
        self.log.push_back((self.seq, host.to_string()));
        true
    }

    fn unlink(&mut self, host: &str, sandbox: SandboxKey) {
        if let Some(hosts) = self.hosts_of.get_mut(&sandbox) {
            hosts.retain(|h| h != host);
            if hosts.is_empty() {
                self.hosts_of.remove(&sandbox);
            }
        }
    }

    /// Hosts to drop to get back to `capacity`: those of the least recently active sandboxes
    /// (`last_active` on any one clock; larger is more recent), down to 95% of it so that a table
    /// at its bound is not trimmed (and Envoy's table rebuilt) on every new host.
    pub fn over_capacity(&self, last_active: impl Fn(&SandboxKey) -> i64) -> Vec<String> {
        if self.routes.len() <= self.capacity {
            return Vec::new();
        }
        let keep = self.capacity - self.capacity / 20;
        let mut by_age: Vec<(i64, &str)> = self
            .routes
            .iter()
            .map(|(h, r)| (last_active(&r.sandbox), h.as_str()))
            .collect();
        by_age.sort_unstable();
        let drop = by_age.len() - keep;
        by_age[..drop].iter().map(|(_, h)| h.to_string()).collect()
    }

    /// The sequence number of the last change.
    pub fn cursor(&self) -> u64 {
        self.seq
    }

    /// What changed after `cursor`, oldest first, each host once.
    pub fn changed_since(&self, cursor: u64) -> Changes {
        if cursor < self.trimmed_through || cursor > self.seq {
            return Changes::Everything;
        }
        let mut seen = std::collections::HashSet::new();
        Changes::Hosts(
            self.log
                .iter()
                .filter(|(seq, _)| *seq > cursor)
                .filter(|(_, h)| seen.insert(h.as_str()))
                .map(|(_, h)| h.clone())
                .collect(),
        )
    }

    /// Drops the log up to the oldest cursor still in use, and always down to a bound, so the log
    /// cannot grow without limit behind a stuck stream (which then resyncs everything).
    pub fn trim(&mut self, oldest_cursor_in_use: u64) {
        let bound = (self.capacity * 2).max(1024);
        while let Some(&(seq, _)) = self.log.front() {
            if seq <= oldest_cursor_in_use || self.log.len() > bound {
                self.trimmed_through = seq;
                self.log.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SandboxKey {
        SandboxKey::new(s).unwrap()
    }

    fn route(sandbox: &str, dest: &str) -> Option<HotRoute> {
        Some(HotRoute {
            sandbox: key(sandbox),
            dest: dest.parse().unwrap(),
            h2: false,
        })
    }

    #[test]
    fn set_tracks_hosts_per_sandbox_and_reports_only_changes() {
        let mut t = HotTable::new(10);
        assert!(t.set("8080-a.d", route("a", "10.0.0.1:8080")));
        assert!(t.set("aa.d", route("a", "10.0.0.1:3000")));
        assert!(!t.set("aa.d", route("a", "10.0.0.1:3000")), "same route");
        assert_eq!(t.hosts_of(&key("a")), ["8080-a.d", "aa.d"]);
        assert!(t.set("aa.d", route("a", "10.0.0.2:3000")), "new IP");
        assert!(t.set("8080-a.d", None));
        assert!(!t.set("8080-a.d", None), "already gone");
        assert_eq!(t.hosts_of(&key("a")), ["aa.d"]);
        assert!(t.set("aa.d", None));
        assert!(t.hosts_of(&key("a")).is_empty() && t.is_empty());
    }

    #[test]
    fn hosts_are_sharded_by_the_last_character_of_their_sandbox_id() {
        assert_eq!(
            shard_of("8080-sbx-a1c.sandbox.example.com").as_deref(),
            Some("*c.sandbox.example.com")
        );
        assert_eq!(shard_of("sbx-a1c.d").as_deref(), Some("*c.d"));
        assert_eq!(
            shard_of("c.d"),
            None,
            "no wildcard matches a one-character label"
        );
        assert_eq!(shard_of("nodomain"), None);
        let mut t = HotTable::new(10);
        t.set("80-ab.d", route("ab", "10.0.0.1:80"));
        t.set("ab.d", route("ab", "10.0.0.1:3000"));
        t.set("80-xc.d", route("xc", "10.0.0.2:80"));
        assert!(
            !t.set("c.d", route("c", "10.0.0.3:80")),
            "unshardable: never hot"
        );
        let hosts =
            |t: &HotTable, s: &str| t.shard(s).map(|(h, _)| h.to_string()).collect::<Vec<_>>();
        assert_eq!(hosts(&t, "*b.d"), ["80-ab.d", "ab.d"]);
        assert_eq!(hosts(&t, "*c.d"), ["80-xc.d"]);
        t.set("80-xc.d", None);
        assert!(hosts(&t, "*c.d").is_empty());
        let mut shards: Vec<_> = t.shards().collect();
        shards.sort();
        assert_eq!(shards, ["*b.d"]);
    }

    #[test]
    fn changes_since_a_cursor_name_each_host_once() {
        let mut t = HotTable::new(10);
        t.set("xx.d", route("x", "10.0.0.1:1"));
        let c = t.cursor();
        t.set("yy.d", route("y", "10.0.0.2:1"));
        t.set("xx.d", None);
        t.set("yy.d", route("y", "10.0.0.3:1"));
        assert_eq!(
            t.changed_since(c),
            Changes::Hosts(vec!["yy.d".into(), "xx.d".into()])
        );
        assert_eq!(t.changed_since(t.cursor()), Changes::Hosts(vec![]));
        assert_eq!(t.changed_since(t.cursor() + 1), Changes::Everything);
        t.trim(c + 1);
        assert_eq!(t.changed_since(c), Changes::Everything, "trimmed past it");
        assert_eq!(
            t.changed_since(c + 1),
            Changes::Hosts(vec!["xx.d".into(), "yy.d".into()])
        );
    }

    #[test]
    fn the_log_is_bounded_even_behind_a_stuck_stream() {
        let mut t = HotTable::new(1);
        for i in 0..5000 {
            t.set(
                "hh.d",
                route("h", &format!("10.0.{}.{}:1", i / 250, i % 250)),
            );
        }
        t.trim(0);
        assert!(t.log.len() <= 1024);
        assert_eq!(t.changed_since(0), Changes::Everything);
    }

    #[test]
    fn over_capacity_names_the_least_recently_active_sandboxes() {
        let mut t = HotTable::new(20);
        for i in 0..22 {
            t.set(&format!("s{i}.d"), route(&format!("s{i}"), "10.0.0.1:80"));
        }
        // s0..s21 were last active at times 0..21: keep 19 (95% of 20), drop the three oldest.
        let age = |k: &SandboxKey| k.as_str()[1..].parse::<i64>().unwrap();
        let mut drop = t.over_capacity(age);
        drop.sort();
        assert_eq!(drop, ["s0.d", "s1.d", "s2.d"]);
        let small = HotTable::new(30);
        assert!(small.over_capacity(age).is_empty());
    }
}
