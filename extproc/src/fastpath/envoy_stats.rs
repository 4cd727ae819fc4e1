//! Activity on hot routes, from the per-host counters Envoy keeps for every ORIGINAL_DST host
//! (`GET /clusters` on its admin port; [`super::observe`] reads it for each Envoy).
//!
//! A destination was used between two readings when its request count moved or a request is
//! open on it (`rq_active`: a silent WebSocket or SSE stream keeps its sandbox busy). The first
//! reading of a stream is only a baseline: counters from before are not activity. Pure.

use std::collections::HashMap;
use std::net::SocketAddr;

/// One host's counters in one reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Requests sent to it or failed on it (`rq_total` + `rq_error`).
    pub requests: u64,
    /// Requests open on it now (`rq_active` + `rq_pending_active`).
    pub open: u64,
}

/// The hosts of `cluster` in the text of `GET /clusters` (`<cluster>::<host>::<stat>::<value>`).
pub fn parse_hosts(text: &str, cluster: &str) -> HashMap<SocketAddr, HostCounters> {
    let mut hosts: HashMap<SocketAddr, HostCounters> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line
            .strip_prefix(cluster)
            .and_then(|r| r.strip_prefix("::"))
        else {
            continue;
        };
        // From the right: an IPv6 host holds "::" itself.
        let mut parts = rest.rsplitn(3, "::");
        let (Some(value), Some(stat), Some(host)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let open = match stat {
            "rq_total" | "rq_error" => false,
            "rq_active" | "rq_pending_active" => true,
            _ => continue,
        };
        let (Ok(addr), Ok(v)) = (host.parse::<SocketAddr>(), value.parse::<u64>()) else {
            continue;
        };
        let c = hosts.entry(addr).or_default();
        if open {
            c.open += v;
        } else {
            c.requests += v;
        }
    }
    hosts
}

/// Destinations used between two readings. `before` is `None` for the first reading.
pub fn used(
    before: Option<&HashMap<SocketAddr, HostCounters>>,
    now: &HashMap<SocketAddr, HostCounters>,
) -> Vec<SocketAddr> {
    now.iter()
        .filter(|(addr, c)| {
            c.open > 0
                || before.is_some_and(|b| match b.get(addr) {
                    Some(p) => p.requests != c.requests,
                    // A host Envoy created since the last reading: it was created for a request.
                    None => c.requests > 0,
                })
        })
        .map(|(addr, _)| *addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
sandbox_pods_fast::observability_name::sandbox_pods_fast
sandbox_pods_fast::default_priority::max_connections::100000
sandbox_pods_fast::10.0.0.1:8080::cx_active::2
sandbox_pods_fast::10.0.0.1:8080::rq_active::0
sandbox_pods_fast::10.0.0.1:8080::rq_error::1
sandbox_pods_fast::10.0.0.1:8080::rq_total::41
sandbox_pods_fast::10.0.0.1:8080::hostname::sandbox_pods_fast10.0.0.1:8080
sandbox_pods_fast::[fd00::2]:3000::rq_active::1
sandbox_pods_fast::[fd00::2]:3000::rq_pending_active::0
sandbox_pods_fast::[fd00::2]:3000::rq_total::7
sandbox_pods::10.0.0.9:80::rq_total::99
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_hosts_of_one_cluster_ipv6_included() {
        let hosts = parse_hosts(TEXT, "sandbox_pods_fast");
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            hosts[&addr("10.0.0.1:8080")],
            HostCounters {
                requests: 42,
                open: 0
            }
        );
        assert_eq!(
            hosts[&addr("[fd00::2]:3000")],
            HostCounters {
                requests: 7,
                open: 1
            }
        );
        assert!(parse_hosts(TEXT, "sandbox_pods").contains_key(&addr("10.0.0.9:80")));
        assert!(parse_hosts("garbage\n::::\n", "sandbox_pods_fast").is_empty());
    }

    #[test]
    fn used_means_new_requests_or_an_open_one_and_the_first_reading_is_a_baseline() {
        let c = |requests, open| HostCounters { requests, open };
        let first: HashMap<_, _> = [
            (addr("10.0.0.1:80"), c(5, 0)),
            (addr("10.0.0.2:80"), c(3, 1)),
            (addr("10.0.0.3:80"), c(9, 0)),
        ]
        .into();
        let sorted = |v: Vec<SocketAddr>| {
            let mut v = v;
            v.sort();
            v
        };
        // Counters from before the first reading are history, an open request is not.
        assert_eq!(sorted(used(None, &first)), [addr("10.0.0.2:80")]);
        let second: HashMap<_, _> = [
            (addr("10.0.0.1:80"), c(6, 0)), // one more request
            (addr("10.0.0.2:80"), c(3, 1)), // still open (a silent WebSocket)
            (addr("10.0.0.3:80"), c(9, 0)), // idle
            (addr("10.0.0.4:80"), c(1, 0)), // new host
            (addr("10.0.0.5:80"), c(0, 0)), // new, never used
        ]
        .into();
        assert_eq!(
            sorted(used(Some(&first), &second)),
            [
                addr("10.0.0.1:80"),
                addr("10.0.0.2:80"),
                addr("10.0.0.4:80")
            ]
        );
    }
}
