//! Finding the extproc replicas: the endpoints of the extproc control Service, from its
//! EndpointSlices. Ready endpoints count, and so do serving-but-terminating ones: a replica that is
//! draining still holds activity the controller must see.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The control-API addresses in `slices`, using the port named `port_name`.
pub fn replica_addrs(slices: &[EndpointSlice], port_name: &str) -> Vec<SocketAddr> {
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
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.push(SocketAddr::new(ip, port));
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
    fn slices_without_the_named_port_are_skipped() {
        let s = slice(
            json!({"metadata": {"name": "x"}, "addressType": "IPv4", "ports": [{"name": "grpc", "port": 1}],
                             "endpoints": [{"addresses": ["10.0.0.1"]}]}),
        );
        assert!(replica_addrs(&[s], "control").is_empty());
    }
}
