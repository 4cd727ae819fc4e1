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
    /// A path on the sandbox's envd port that only the control plane may use (`/init`, ...): 403.
    EnvdInternal {
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
            Decision::EnvdInternal { .. } => Outcome::forbidden,
        }
    }
}

/// Whether a request path may reach envd from outside: the SDK's calls (`/health`, `/files`,
/// the `process.Process` and `filesystem.Filesystem` RPCs) and nothing else, judged on the path
/// percent-decoded and with dot segments and empty segments removed, so `/files/../init` and
/// `/%69nit` are the `/init` they mean. Everything else on that port (envd's `/init`, `/envs`,
/// `/metrics`, E2B's freeze and upgrade family, whatever a later envd adds) is for the control
/// plane, which reaches the pod directly.
pub fn envd_path_allowed(path: &[u8]) -> bool {
    let path = path.split(|b| *b == b'?').next().unwrap_or(b"");
    let decoded = percent_decode(path);
    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|b| *b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    match segments.as_slice() {
        [b"health"] | [b"files"] => true,
        [service, method] => {
            (*service == b"process.Process" || *service == b"filesystem.Filesystem")
                && !method.is_empty()
        }
        _ => false,
    }
}

fn percent_decode(p: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%' && i + 2 < p.len() {
            if let (Some(h), Some(l)) = (hex(p[i + 1]), hex(p[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(p[i]);
        i += 1;
    }
    // Decoding twice catches a %25-encoded percent sign meant for a second decoder.
    if out.contains(&b'%') && out != p {
        return percent_decode(&out);
    }
    out
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
    fn only_the_sdks_envd_paths_pass_the_gateway() {
        for ok in [
            &b"/health"[..],
            b"/files?path=/tmp/x&username=user",
            b"/process.Process/Start",
            b"/filesystem.Filesystem/ListDir",
            b"//files",
        ] {
            assert!(envd_path_allowed(ok), "{}", String::from_utf8_lossy(ok));
        }
        for no in [
            &b"/init"[..],
            b"/INIT",
            b"/%69nit",
            b"/%2569nit",
            b"/files/../init",
            b"/files/%2e%2e/init",
            b"/./init",
            b"/envs",
            b"/metrics",
            b"/upgrade",
            b"/freeze",
            b"/files/compose",
            b"/process.Process/",
            b"/other.Service/Start",
            b"/",
            b"",
        ] {
            assert!(!envd_path_allowed(no), "{}", String::from_utf8_lossy(no));
        }
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
