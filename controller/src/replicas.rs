//! Finding the extproc replicas: the endpoints of the extproc control Service, from its
//! EndpointSlices. Ready endpoints count, and so do serving-but-terminating ones: a replica that is
//! draining still holds activity the controller must see. Slices of every address type count:
//! IPv4 and IPv6 (what a Service's own slices hold) and FQDN (replicas registered by hand, e.g.
//! outside the cluster; the API server refuses loopback IPs in a slice).

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A replica's control-API address: an IP or a host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for ReplicaAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl From<std::net::SocketAddr> for ReplicaAddr {
    fn from(a: std::net::SocketAddr) -> Self {
        ReplicaAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

/// A slice address as a host: an IP, or a DNS name for FQDN slices.
fn host(address_type: &str, address: &str) -> Option<String> {
    match address_type {
        "IPv4" | "IPv6" => address.parse::<IpAddr>().ok().map(|ip| ip.to_string()),
        "FQDN" => {
            let ok = !address.is_empty()
                && address.len() <= 253
                && address
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            ok.then(|| address.to_ascii_lowercase())
        }
        _ => None,
    }
}

/// The control-API addresses in `slices`, using the port named `port_name`.
pub fn replica_addrs(slices: &[EndpointSlice], port_name: &str) -> Vec<ReplicaAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if !(ready || (serving && terminating)) {
                continue;
            }
            for a in &ep.addresses {
                if let Some(host) = host(&slice.address_type, a) {
                    out.push(ReplicaAddr { host, port });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn ready_and_terminating_serving_endpoints_count() {
        let s = slice(json!({
            "metadata": {"name": "x"}, "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 9001}, {"name": "control", "port": 9002}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.5"]},
            ],
        }));
        let addrs: Vec<String> = replica_addrs(&[s], "control")
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.1:9002", "10.0.0.2:9002", "10.0.0.5:9002"]);
    }

    #[test]
    fn every_address_type_is_a_replica() {
        let slices: Vec<EndpointSlice> = [
            ("IPv4", "10.0.0.1"),
            ("IPv6", "fd00::1"),
            ("FQDN", "Replica-1.Example.com"),
            ("FQDN", "not a name"),
            ("IPv4", "not-an-ip"),
            ("Unknown", "10.0.0.9"),
        ]
        .into_iter()
        .map(|(t, a)| {
            slice(json!({"metadata": {"name": "x"}, "addressType": t,
                         "ports": [{"name": "control", "port": 9002}],
                         "endpoints": [{"addresses": [a]}]}))
        })
        .collect();
        let addrs: Vec<String> = replica_addrs(&slices, "control")
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            addrs,
            [
                "10.0.0.1:9002",
                "[fd00::1]:9002",
                "replica-1.example.com:9002"
            ]
        );
    }

    #[test]
    fn slices_without_the_named_port_are_skipped() {
        let s = slice(
            json!({"metadata": {"name": "x"}, "addressType": "IPv4", "ports": [{"name": "grpc", "port": 1}],
                             "endpoints": [{"addresses": ["10.0.0.1"]}]}),
        );
        assert!(replica_addrs(&[s], "control").is_empty());
    }
}
