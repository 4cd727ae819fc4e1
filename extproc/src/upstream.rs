//! Which protocol sandgate speaks to a sandbox port: HTTP/1.1 unless the sandbox declares the port
//! as HTTP/2 cleartext (h2c), whatever the client spoke (most sandbox servers — Python's
//! http.server, Flask, uvicorn's defaults, Node's http — speak HTTP/1.1 only). gRPC requests go
//! over HTTP/2 whatever the port says; Envoy's routes match those on their content type.
//!
//! A port is h2c when a container names it as Istio's protocol selection reads names (`grpc`,
//! `grpc-*`, `http2`, `http2-*`, `h2c`, `h2c-*`; `grpc-web` stays HTTP/1.1), or when the pod's
//! `h2c-ports` annotation lists it (`"50051,9000"`). Pure.

use k8s_openapi::api::core::v1::Pod;

use sandgate_shared::address::parse_port;

/// Most h2c ports remembered per sandbox; more are served as HTTP/1.1 (and logged by the caller).
pub const MAX_H2C_PORTS: usize = 8;

/// A small set of ports, stored inline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct H2cPorts {
    len: u8,
    ports: [u16; MAX_H2C_PORTS],
}

impl H2cPorts {
    pub fn contains(&self, port: u16) -> bool {
        self.ports[..usize::from(self.len)].contains(&port)
    }

    /// Adds a port; `false` when the set is full.
    pub fn insert(&mut self, port: u16) -> bool {
        if self.contains(port) {
            return true;
        }
        if usize::from(self.len) == MAX_H2C_PORTS {
            return false;
        }
        self.ports[usize::from(self.len)] = port;
        self.len += 1;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Whether a container port's name declares HTTP/2 cleartext.
pub fn is_h2c_port_name(name: &str) -> bool {
    let protocol = name.split('-').next().unwrap_or_default();
    match protocol {
        "grpc" => !name.starts_with("grpc-web"),
        "http2" | "h2c" => true,
        _ => false,
    }
}

/// The h2c ports a pod declares (port names and the `annotation` listing ports). Also returns
/// whether some were left out (bad values, or past [`MAX_H2C_PORTS`]).
pub fn h2c_ports(pod: &Pod, annotation: &str) -> (H2cPorts, bool) {
    let mut set = H2cPorts::default();
    let mut dropped = false;
    let named = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.name.as_deref().is_some_and(is_h2c_port_name))
        .filter_map(|p| u16::try_from(p.container_port).ok());
    let listed = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation))
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| match parse_port(s.as_bytes()) {
            Ok(p) => Some(p),
            Err(_) => {
                dropped = true;
                None
            }
        })
        .collect::<Vec<_>>();
    for port in named.chain(listed) {
        dropped |= !set.insert(port);
    }
    (set, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_istios_protocol_selection() {
        for name in ["grpc", "grpc-api", "http2", "http2-web", "h2c", "h2c-x"] {
            assert!(is_h2c_port_name(name), "{name}");
        }
        for name in [
            "http",
            "grpc-web",
            "grpc-web-x",
            "grpcx",
            "web",
            "https",
            "",
        ] {
            assert!(!is_h2c_port_name(name), "{name}");
        }
    }

    #[test]
    fn a_pod_declares_h2c_ports_by_name_or_annotation() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": {"sandgate.dev/h2c-ports": "9000, 9001,bad"}},
            "spec": {"containers": [
                {"name": "a", "ports": [
                    {"name": "grpc", "containerPort": 50051},
                    {"name": "http", "containerPort": 8080},
                    {"name": "grpc-web", "containerPort": 8081},
                ]},
                {"name": "b", "ports": [{"containerPort": 3000}]},
            ]},
        }))
        .unwrap();
        let (set, dropped) = h2c_ports(&pod, "sandgate.dev/h2c-ports");
        for p in [50051, 9000, 9001] {
            assert!(set.contains(p), "{p}");
        }
        for p in [8080, 8081, 3000] {
            assert!(!set.contains(p), "{p}");
        }
        assert!(dropped, "a bad value is reported");
        let mut full = H2cPorts::default();
        for p in 1..=MAX_H2C_PORTS as u16 {
            assert!(full.insert(p));
        }
        assert!(full.insert(1), "already there");
        assert!(!full.insert(100), "full");
    }
}
