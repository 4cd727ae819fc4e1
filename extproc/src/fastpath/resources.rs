//! The xDS resources the fast path sends Envoy. Protobuf stays in this module and in `ads`.
//!
//! - One `VirtualHost` per hot host (VHDS, named `<route config>/<host>`, as VHDS requires): its
//!   one route sends everything to the fast cluster with the pod's `ip:port` in the header that
//!   cluster reads (overwriting anything the client sent). It needs no per-route filter config
//!   (about 1.2 KB each in Envoy): the ext_proc filter is off by default and only the catch-all
//!   virtual host turns it on. Its name is the sandbox ID, which the access logs read back.
//! - One `Runtime` layer (RTDS) per stream holding the validity flag and the stream's identity
//!   token, sent with a TTL and refreshed every quarter of it. Every hot route matches only while
//!   the flag is 100: when sandgate stops refreshing it (dead, hung, disconnected) Envoy drops the
//!   layer at the TTL, and when a push is not acknowledged in time sandgate sends the flag as 0; a
//!   hot host then answers 503 with `retry-after` until sandgate confirms its table again. The
//!   token lets the stream's observer prove whose counters it reads ([`super::observe`]).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
    RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::envoy::service::runtime::v3::Runtime;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::util::pack_any;

use super::table::HotRoute;

pub const VIRTUAL_HOST_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
pub const RUNTIME_TYPE: &str = "type.googleapis.com/envoy.service.runtime.v3.Runtime";
/// The RTDS layer (`layered_runtime` in the bootstrap names it).
pub const RUNTIME_LAYER: &str = "sandgate-fast-path";
/// The runtime key every hot route's match reads: 100 while the hot routes are valid, absent (so
/// 0: no hot route matches) otherwise.
pub const VALID_KEY: &str = "sandgate.fast_path.valid";

/// What every hot route shares; must agree with the bootstrap (`envoy/bootstrap.yaml.in`).
#[derive(Debug, Clone)]
pub struct RouteTemplate {
    /// The route configuration whose VHDS namespace the virtual hosts live in.
    pub route_config: String,
    /// The ORIGINAL_DST cluster only hot routes reach (HTTP/1.1 upstream); it reads `header`.
    pub cluster: String,
    /// Its twin speaking HTTP/2 cleartext, for gRPC and for ports the sandbox declares h2c.
    pub cluster_h2: String,
    /// The header that cluster takes the destination from.
    pub header: String,
}

impl RouteTemplate {
    /// The VHDS resource name of a host.
    pub fn resource_name(&self, host: &str) -> String {
        format!("{}/{host}", self.route_config)
    }

    /// The host a VHDS resource name stands for, if it is one of ours.
    pub fn host_of<'a>(&self, resource_name: &'a str) -> Option<&'a str> {
        resource_name
            .strip_prefix(self.route_config.as_str())?
            .strip_prefix('/')
    }

    /// The VHDS resource for one hot host. Its version is the destination, so Envoy's
    /// `initial_resource_versions` on a reconnect say exactly what it routes where.
    pub fn virtual_host(&self, host: &str, route: HotRoute) -> Resource {
        let name = self.resource_name(host);
        let cluster = if route.h2 {
            &self.cluster_h2
        } else {
            &self.cluster
        };
        let vhost = VirtualHost {
            name: name.clone(),
            domains: vec![host.to_string()],
            // gRPC goes over HTTP/2 whatever the port says.
            routes: vec![
                self.route(route, &self.cluster_h2, true),
                self.route(route, cluster, false),
            ],
            request_headers_to_add: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: self.header.clone(),
                    value: route.dest.to_string(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        Resource {
            name,
            version: version(route),
            resource: Some(pack_any(vhost)),
            ..Default::default()
        }
    }

    fn route(&self, route: HotRoute, cluster: &str, grpc: bool) -> Route {
        Route {
            name: route.sandbox.as_str().to_string(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                // Matches only while sandgate's validity flag is in Envoy's runtime.
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent::default()),
                    runtime_key: VALID_KEY.into(),
                }),
                grpc: grpc.then(Default::default),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
                // No overall timeout: long polls and streams are the sandbox's business. No retry
                // policy either (about 4 KB of Envoy memory per route): connect failures are
                // retried through the route configuration's x-envoy-retry-on header instead.
                timeout: Some(proto_duration(Duration::ZERO)),
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

/// The version string of a hot route: its destination and upstream protocol, so Envoy's
/// `initial_resource_versions` on a reconnect say exactly what it routes where.
pub fn version(route: HotRoute) -> String {
    if route.h2 {
        format!("{}/h2", route.dest)
    } else {
        route.dest.to_string()
    }
}

/// A stream's runtime layer, kept by Envoy for `ttl` unless sent again: the validity flag (100
/// while `valid`, else 0: no hot route matches) and the stream's identity token.
pub fn runtime_layer(ttl: Duration, version: u64, valid: bool, token: &str) -> Resource {
    let layer = Struct {
        fields: [
            (
                VALID_KEY.to_string(),
                Value {
                    kind: Some(Kind::NumberValue(if valid { 100.0 } else { 0.0 })),
                },
            ),
            (
                super::observe::STREAM_KEY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(token.to_string())),
                },
            ),
        ]
        .into(),
    };
    Resource {
        name: RUNTIME_LAYER.into(),
        version: version.to_string(),
        ttl: Some(proto_duration(ttl)),
        resource: Some(pack_any(Runtime {
            name: RUNTIME_LAYER.into(),
            layer: Some(layer),
        })),
        ..Default::default()
    }
}

fn proto_duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::SandboxKey;
    use prost::Message;

    fn template() -> RouteTemplate {
        RouteTemplate {
            route_config: "sandboxes".into(),
            cluster: "sandbox_pods_fast".into(),
            cluster_h2: "sandbox_pods_fast_h2".into(),
            header: "x-sandgate-destination".into(),
        }
    }

    #[test]
    fn a_hot_host_is_one_vhost_whose_route_overwrites_the_destination_header() {
        let t = template();
        let r = t.virtual_host(
            "8080-sbx-a.sandbox.example.com",
            HotRoute {
                sandbox: SandboxKey::new("sbx-a").unwrap(),
                dest: "10.1.2.3:8080".parse().unwrap(),
                h2: false,
            },
        );
        assert_eq!(r.name, "sandboxes/8080-sbx-a.sandbox.example.com");
        assert_eq!(r.version, "10.1.2.3:8080");
        let any = r.resource.unwrap();
        assert_eq!(any.type_url, VIRTUAL_HOST_TYPE);
        let vh = VirtualHost::decode(any.value.as_slice()).unwrap();
        // VHDS removes by resource name and keys vhosts by their own name: the two must agree.
        assert_eq!(vh.name, r.name);
        assert_eq!(vh.domains, ["8080-sbx-a.sandbox.example.com"]);
        // gRPC first, over HTTP/2; then everything else, over HTTP/1.1.
        let grpc = &vh.routes[0];
        assert!(grpc.r#match.as_ref().unwrap().grpc.is_some());
        let Some(Action::Route(action)) = &grpc.action else {
            panic!("not a route action")
        };
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster("sandbox_pods_fast_h2".into()))
        );
        let route = &vh.routes[1];
        assert_eq!(route.name, "sbx-a");
        let add = &vh.request_headers_to_add[0];
        assert_eq!(
            add.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        let h = add.header.as_ref().unwrap();
        assert_eq!(
            (h.key.as_str(), h.value.as_str()),
            ("x-sandgate-destination", "10.1.2.3:8080")
        );
        let Some(Action::Route(action)) = &route.action else {
            panic!("not a route action")
        };
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster("sandbox_pods_fast".into()))
        );
        // No per-route filter config (about 1.2 KB each in Envoy): ext_proc is off by default
        // and only the catch-all virtual host turns it on.
        assert!(route.typed_per_filter_config.is_empty());
        assert!(action.retry_policy.is_none());
        let gate = route
            .r#match
            .as_ref()
            .unwrap()
            .runtime_fraction
            .as_ref()
            .unwrap();
        assert_eq!(gate.runtime_key, VALID_KEY);
        assert_eq!(
            gate.default_value.unwrap().numerator,
            0,
            "off without the flag"
        );
        assert_eq!(t.host_of(&r.name), Some("8080-sbx-a.sandbox.example.com"));
        assert_eq!(t.host_of("other/x.example.com"), None);
    }

    #[test]
    fn the_runtime_layer_carries_its_ttl_the_flag_and_the_stream_token() {
        for (valid, flag) in [(true, 100.0), (false, 0.0)] {
            let r = runtime_layer(Duration::from_millis(1500), 7, valid, "tok");
            assert_eq!((r.name.as_str(), r.version.as_str()), (RUNTIME_LAYER, "7"));
            let ttl = r.ttl.unwrap();
            assert_eq!((ttl.seconds, ttl.nanos), (1, 500_000_000));
            let rt = Runtime::decode(r.resource.unwrap().value.as_slice()).unwrap();
            let fields = rt.layer.unwrap().fields;
            assert_eq!(fields[VALID_KEY].kind, Some(Kind::NumberValue(flag)));
            assert_eq!(
                fields[super::super::observe::STREAM_KEY].kind,
                Some(Kind::StringValue("tok".into()))
            );
        }
    }
}
