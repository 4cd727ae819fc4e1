//! The routing decision: from a parsed address and what the resolver knows, to what Envoy must do.
//! Pure: no I/O, no protobuf.

use std::borrow::Cow;
use std::net::SocketAddr;

use sandgate_shared::address::{AddressError, SandboxAddress};

use crate::metrics::Outcome;
use crate::resolver::Resolved;

/// What to tell Envoy for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Route {
        id: Cow<'a, str>,
        dest: SocketAddr,
        rewritten_path: Option<Cow<'a, str>>,
        /// The sandbox serves this port as HTTP/2 cleartext (else HTTP/1.1; gRPC requests get
        /// HTTP/2 from Envoy's routes whatever this says).
        h2: bool,
    },
    /// Unknown or released sandbox: 502, which E2B SDKs read as "sandbox gone".
    NotFound {
        id: Cow<'a, str>,
    },
    /// The sandbox's containers have exited: 502, "not running".
    Terminated {
        id: Cow<'a, str>,
    },
    /// Claimed but not serving yet: 503 with `retry-after`.
    NotReady {
        id: Cow<'a, str>,
    },
    /// The index has no entry and the API could not be asked: 503 with `retry-after`.
    LookupFailed {
        id: Cow<'a, str>,
    },
    /// The sandbox already holds the most long-lived streams allowed: 429 with `retry-after`.
    TooManyStreams {
        id: Cow<'a, str>,
        open: u32,
    },
    BadRequest(AddressError),
    /// The address names no port and neither the pod nor the config has a default: 400.
    NoPort {
        id: Cow<'a, str>,
    },
}

impl Decision<'_> {
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Route { .. } => Outcome::routed,
            Decision::NotFound { .. } => Outcome::not_found,
            Decision::Terminated { .. } => Outcome::terminated,
            Decision::NotReady { .. } => Outcome::not_ready,
            Decision::LookupFailed { .. } => Outcome::lookup_failed,
            Decision::TooManyStreams { .. } => Outcome::too_many_streams,
            Decision::BadRequest(_) | Decision::NoPort { .. } => Outcome::bad_request,
        }
    }
}

/// Decides for a parsed address. The destination IP only ever comes from `resolved`.
pub fn decide<'a>(
    addr: SandboxAddress<'a>,
    resolved: Resolved,
    default_port: Option<u16>,
) -> Decision<'a> {
    use crate::index::RouteState;
    let id = addr.id;
    let route = match resolved {
        Resolved::Found(r) => r,
        Resolved::Absent => return Decision::NotFound { id },
        Resolved::Failed => return Decision::LookupFailed { id },
    };
    match (route.state, route.ip) {
        (RouteState::Running, Some(ip)) => {
            match addr.port.or(route.default_port).or(default_port) {
                Some(port) => Decision::Route {
                    id,
                    dest: SocketAddr::new(ip, port),
                    rewritten_path: addr.rewritten_path,
                    h2: route.h2c.contains(port),
                },
                None => Decision::NoPort { id },
            }
        }
        (RouteState::Running | RouteState::NotReady, _) => Decision::NotReady { id },
        (RouteState::Terminated, _) => Decision::Terminated { id },
        (RouteState::Gone, _) => Decision::NotFound { id },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{PodRoute, RouteState};
    use sandgate_shared::address::AddressForm;

    fn addr(port: Option<u16>) -> SandboxAddress<'static> {
        SandboxAddress {
            id: Cow::Borrowed("abc"),
            port,
            form: AddressForm::Host,
            rewritten_path: None,
        }
    }

    fn found(state: RouteState, ip: Option<&str>, default_port: Option<u16>) -> Resolved {
        Resolved::Found(PodRoute {
            ip: ip.map(|i| i.parse().unwrap()),
            default_port,
            h2c: Default::default(),
            state,
            pod: 1,
            scope: 0,
        })
    }

    #[test]
    fn port_precedence_is_request_then_pod_then_config() {
        let r = found(RouteState::Running, Some("10.0.0.1"), Some(3000));
        let dest = |d: Decision<'_>| match d {
            Decision::Route { dest, .. } => dest.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(dest(decide(addr(Some(80)), r, Some(9))), "10.0.0.1:80");
        assert_eq!(dest(decide(addr(None), r, Some(9))), "10.0.0.1:3000");
        let no_ann = found(RouteState::Running, Some("10.0.0.1"), None);
        assert_eq!(dest(decide(addr(None), no_ann, Some(9))), "10.0.0.1:9");
        assert!(matches!(
            decide(addr(None), no_ann, None),
            Decision::NoPort { .. }
        ));
    }

    #[test]
    fn only_ports_the_sandbox_declares_h2c_get_http2() {
        let Resolved::Found(mut route) = found(RouteState::Running, Some("10.0.0.1"), Some(50051))
        else {
            unreachable!()
        };
        route.h2c.insert(50051);
        let h2 = |port| match decide(addr(port), Resolved::Found(route), None) {
            Decision::Route { h2, .. } => h2,
            other => panic!("{other:?}"),
        };
        assert!(
            h2(Some(50051)) && h2(None),
            "declared, by name or by default port"
        );
        assert!(!h2(Some(8080)));
    }

    #[test]
    fn states_map_to_answers() {
        assert!(matches!(
            decide(addr(Some(1)), Resolved::Absent, None),
            Decision::NotFound { .. }
        ));
        assert!(matches!(
            decide(addr(Some(1)), Resolved::Failed, None),
            Decision::LookupFailed { .. }
        ));
        let starting = found(RouteState::NotReady, None, None);
        assert!(matches!(
            decide(addr(Some(1)), starting, None),
            Decision::NotReady { .. }
        ));
        let gone = found(RouteState::Gone, Some("10.0.0.1"), None);
        assert!(matches!(
            decide(addr(Some(1)), gone, None),
            Decision::NotFound { .. }
        ));
        let exited = found(RouteState::Terminated, Some("10.0.0.1"), Some(80));
        assert!(matches!(
            decide(addr(Some(1)), exited, None),
            Decision::Terminated { .. }
        ));
    }
}
