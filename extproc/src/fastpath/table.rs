//! The hot-route table: which sandbox hosts Envoy routes by itself, and the pod address each one
//! goes to. Pure: no I/O, no protobuf, no clock.
//!
//! Only the fast path's sync task writes it, with destinations it has just read from the route
//! index. Every change is numbered in a log, so each xDS stream sends Envoy only what changed since
//! its last push (a stream too far behind is resent everything).

use std::collections::{HashMap, VecDeque};
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

pub struct HotTable {
    routes: HashMap<String, HotRoute>,
    hosts_of: HashMap<SandboxKey, Vec<String>>,
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

    /// The hot hosts of one sandbox.
    pub fn hosts_of(&self, sandbox: &SandboxKey) -> &[String] {
        self.hosts_of.get(sandbox).map_or(&[], Vec::as_slice)
    }

    /// Sets a host's route, or removes the host with `None`. Returns whether anything changed.
    pub fn set(&mut self, host: &str, route: Option<HotRoute>) -> bool {
        let old = self.routes.get(host).copied();
        if old == route {
            return false;
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
        assert!(t.set("a.d", route("a", "10.0.0.1:3000")));
        assert!(!t.set("a.d", route("a", "10.0.0.1:3000")), "same route");
        assert_eq!(t.hosts_of(&key("a")), ["8080-a.d", "a.d"]);
        assert!(t.set("a.d", route("a", "10.0.0.2:3000")), "new IP");
        assert!(t.set("8080-a.d", None));
        assert!(!t.set("8080-a.d", None), "already gone");
        assert_eq!(t.hosts_of(&key("a")), ["a.d"]);
        assert!(t.set("a.d", None));
        assert!(t.hosts_of(&key("a")).is_empty() && t.is_empty());
    }

    #[test]
    fn changes_since_a_cursor_name_each_host_once() {
        let mut t = HotTable::new(10);
        t.set("x.d", route("x", "10.0.0.1:1"));
        let c = t.cursor();
        t.set("y.d", route("y", "10.0.0.2:1"));
        t.set("x.d", None);
        t.set("y.d", route("y", "10.0.0.3:1"));
        assert_eq!(
            t.changed_since(c),
            Changes::Hosts(vec!["y.d".into(), "x.d".into()])
        );
        assert_eq!(t.changed_since(t.cursor()), Changes::Hosts(vec![]));
        assert_eq!(t.changed_since(t.cursor() + 1), Changes::Everything);
        t.trim(c + 1);
        assert_eq!(t.changed_since(c), Changes::Everything, "trimmed past it");
        assert_eq!(
            t.changed_since(c + 1),
            Changes::Hosts(vec!["x.d".into(), "y.d".into()])
        );
    }

    #[test]
    fn the_log_is_bounded_even_behind_a_stuck_stream() {
        let mut t = HotTable::new(1);
        for i in 0..5000 {
            t.set(
                "h.d",
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
