//! The xDS resources the fast path sends Envoy. Protobuf stays in this module and in `ads`.
//!
//! - One `VirtualHost` per shard (VHDS, named `<route config>/<shard>`): a shard is every hot host
//!   whose sandbox ID ends in the same character, and its virtual host's one domain is the
//!   suffix wildcard `*<c>.<domain>` ([`super::table::shard_of`]). Its routes are a matcher tree
//!   (Envoy's generic matching API), one hash probe in the router:
//!   1. a routing header given twice (Envoy joins repeats with a comma) is a 400;
//!   2. gRPC goes through ext_proc (its route picks HTTP/2);
//!   3. an exact map on `:authority`: each hot host → a route that sends to the fast cluster (or
//!      its HTTP/2 twin for an h2c port) with the pod's `ip:port` in the header that cluster
//!      reads (overwriting anything the client sent), gated by the validity flag; its name is the
//!      sandbox ID, which the access logs read back;
//!   4. anything else (a host not hot, in capitals, …) goes through ext_proc, as on the catch-all
//!      virtual host of the bootstrap.
//!
//!   The shard's retry policy (connect failures, and the per-try timeout that answers a hung
//!   sandbox with a 504) is set once for all its routes. A hot route needs no per-route filter
//!   config: the ext_proc filter is off by default, and only ext_proc routes turn it on.
//! - One `Runtime` layer (RTDS) per stream holding the validity flag and the stream's identity
//!   token, sent with a TTL and refreshed every quarter of it. Every hot route matches only while
//!   the flag is 100: when sandgate stops refreshing it (dead, hung, disconnected) Envoy drops the
//!   layer at the TTL, and when a push is not acknowledged in time sandgate sends the flag as 0; a
//!   hot host then answers 503 with `retry-after` until sandgate confirms its table again. The
//!   token lets the stream's observer prove whose counters it reads ([`super::observe`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, header_value_option::HeaderAppendAction, DataSource, HeaderValue,
    HeaderValueOption, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    retry_policy::RetryBackOff, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, DirectResponseAction, RetryPolicy, Route, RouteAction, RouteList,
    RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    ext_proc_per_route::Override, ExtProcOverrides, ExtProcPerRoute,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    metadata_matcher::{path_segment::Segment, PathSegment},
    string_matcher::MatchPattern as EnvoyPattern,
    value_matcher::MatchPattern as ValuePattern,
    HttpRequestHeaderMatchInput, MetadataMatcher, StringMatcher as EnvoyStringMatcher,
    ValueMatcher,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::envoy::service::runtime::v3::Runtime;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, UInt32Value, Value};
use envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use envoy_types::pb::xds::r#type::matcher::v3::{
    matcher::{
        matcher_list::{
            predicate::{single_predicate, MatchType, SinglePredicate},
            FieldMatcher, Predicate,
        },
        matcher_tree::{MatchMap, TreeType},
        on_match, MatcherList, MatcherTree, MatcherType, OnMatch,
    },
    regex_matcher::{EngineType, GoogleRe2},
    string_matcher::MatchPattern,
    Matcher, RegexMatcher, StringMatcher,
};
use envoy_types::util::pack_any;
use sandgate_shared::address::{E2B_HEADER_ID, E2B_HEADER_PORT, HEADER_ID, HEADER_PORT};

use super::table::HotRoute;

pub const VIRTUAL_HOST_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
pub const RUNTIME_TYPE: &str = "type.googleapis.com/envoy.service.runtime.v3.Runtime";
/// The RTDS layer (`layered_runtime` in the bootstrap names it).
pub const RUNTIME_LAYER: &str = "sandgate-fast-path";
/// The runtime key every hot route's match reads: 100 while the hot routes are valid, absent (so
/// 0: no hot route matches) otherwise.
pub const VALID_KEY: &str = "sandgate.fast_path.valid";
/// Connect failures retried on every sandbox route (a listener that starts a little late).
pub const CONNECT_RETRIES: u32 = 10;

/// What every shard shares; must agree with the bootstrap (`envoy/bootstrap.yaml.in`), which a
/// test checks.
#[derive(Debug, Clone)]
pub struct RouteTemplate {
    /// The route configuration whose VHDS namespace the virtual hosts live in.
    pub route_config: String,
    /// The ORIGINAL_DST cluster only hot routes reach (HTTP/1.1 upstream); it reads `header`.
    pub cluster: String,
    /// Its twin speaking HTTP/2 cleartext, for ports the sandbox declares h2c.
    pub cluster_h2: String,
    /// The header that cluster takes the destination from.
    pub header: String,
    /// The clusters of the ext_proc path (destination from ext_proc's metadata), HTTP/1.1 and
    /// HTTP/2.
    pub ext_proc_cluster: String,
    pub ext_proc_cluster_h2: String,
    /// How long a sandbox may take to start its response before a 504 (the per-try timeout).
    pub response_timeout: Duration,
}

impl RouteTemplate {
    /// The VHDS resource name of a shard.
    pub fn resource_name(&self, shard: &str) -> String {
        format!("{}/{shard}", self.route_config)
    }

    /// The shard a VHDS resource name stands for, if it is one of ours.
    pub fn shard_of_resource<'a>(&self, resource_name: &'a str) -> Option<&'a str> {
        resource_name
            .strip_prefix(self.route_config.as_str())?
            .strip_prefix('/')
    }

    /// The VHDS resource for one shard and its hot hosts (in order).
    pub fn shard<'h>(
        &self,
        shard: &str,
        hosts: impl IntoIterator<Item = (&'h str, HotRoute)>,
    ) -> Resource {
        let name = self.resource_name(shard);
        let mut map = HashMap::new();
        let mut version = std::collections::hash_map::DefaultHasher::new();
        for (host, route) in hosts {
            (host, route.dest, route.h2).hash(&mut version);
            map.insert(host.to_string(), action(host, self.hot_route(route)));
        }
        let by_authority = Matcher {
            matcher_type: Some(MatcherType::MatcherTree(MatcherTree {
                input: Some(header_input(":authority")),
                tree_type: Some(TreeType::ExactMatchMap(MatchMap { map })),
            })),
            on_no_match: Some(Box::new(self.ext_proc_action())),
        };
        let mut first = Vec::new();
        for header in [HEADER_ID, HEADER_PORT, E2B_HEADER_ID, E2B_HEADER_PORT] {
            first.push(FieldMatcher {
                predicate: Some(header_matches(header, MatchPattern::Contains(",".into()))),
                on_match: Some(action("duplicate", duplicate_header(header))),
            });
        }
        // gRPC, not gRPC-Web: ext_proc's route picks HTTP/2 for it.
        first.push(FieldMatcher {
            predicate: Some(header_matches(
                "content-type",
                MatchPattern::SafeRegex(RegexMatcher {
                    regex: "application/grpc([+;].*)?".into(),
                    engine_type: Some(EngineType::GoogleRe2(GoogleRe2 {})),
                }),
            )),
            on_match: Some(self.ext_proc_action()),
        });
        let vhost = VirtualHost {
            name: name.clone(),
            domains: vec![shard.to_string()],
            matcher: Some(Matcher {
                matcher_type: Some(MatcherType::MatcherList(MatcherList { matchers: first })),
                on_no_match: Some(Box::new(OnMatch {
                    on_match: Some(on_match::OnMatch::Matcher(Box::new(by_authority))),
                    ..Default::default()
                })),
            }),
            retry_policy: Some(self.retry_policy()),
            ..Default::default()
        };
        Resource {
            name,
            version: format!("{:016x}", version.finish()),
            resource: Some(pack_any(vhost)),
            ..Default::default()
        }
    }

    fn hot_route(&self, route: HotRoute) -> Route {
        let cluster = if route.h2 {
            &self.cluster_h2
        } else {
            &self.cluster
        };
        Route {
            name: route.sandbox.as_str().to_string(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                // Matches only while sandgate's validity flag is in Envoy's runtime.
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent::default()),
                    runtime_key: VALID_KEY.into(),
                }),
                ..Default::default()
            }),
            action: Some(Action::Route(to_cluster(cluster))),
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
        }
    }

    /// The ext_proc path, as the bootstrap's catch-all virtual host has it: gRPC and ports
    /// ext_proc marks h2c over HTTP/2, the rest over HTTP/1.1, the ext_proc filter on.
    pub fn ext_proc_routes(&self) -> Vec<Route> {
        let on = ExtProcPerRoute {
            r#override: Some(Override::Overrides(ExtProcOverrides::default())),
        };
        let filters: HashMap<_, _> =
            [("envoy.filters.http.ext_proc".to_string(), pack_any(on))].into();
        let route = |m: RouteMatch, cluster: &str| Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..m
            }),
            action: Some(Action::Route(to_cluster(cluster))),
            typed_per_filter_config: filters.clone(),
            ..Default::default()
        };
        let h2c = MetadataMatcher {
            filter: "envoy.lb".into(),
            path: vec![PathSegment {
                segment: Some(Segment::Key(crate::grpc::METADATA_UPSTREAM.into())),
            }],
            value: Some(ValueMatcher {
                match_pattern: Some(ValuePattern::StringMatch(EnvoyStringMatcher {
                    match_pattern: Some(EnvoyPattern::Exact(crate::grpc::UPSTREAM_H2.into())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        vec![
            route(
                RouteMatch {
                    grpc: Some(Default::default()),
                    ..Default::default()
                },
                &self.ext_proc_cluster_h2,
            ),
            route(
                RouteMatch {
                    dynamic_metadata: vec![h2c],
                    ..Default::default()
                },
                &self.ext_proc_cluster_h2,
            ),
            route(RouteMatch::default(), &self.ext_proc_cluster),
        ]
    }

    fn ext_proc_action(&self) -> OnMatch {
        OnMatch {
            on_match: Some(on_match::OnMatch::Action(TypedExtensionConfig {
                name: "ext_proc".into(),
                typed_config: Some(pack_any(RouteList {
                    routes: self.ext_proc_routes(),
                })),
            })),
            ..Default::default()
        }
    }

    /// Connect failures retried (nothing was sent) with jittered backoff, about 2 s in all; the
    /// per-try timeout bounds only the wait for response headers: a hung sandbox gets a 504.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retry_on: "connect-failure".into(),
            num_retries: Some(UInt32Value {
                value: CONNECT_RETRIES,
            }),
            per_try_timeout: Some(proto_duration(self.response_timeout)),
            retry_back_off: Some(RetryBackOff {
                base_interval: Some(proto_duration(Duration::from_millis(100))),
                max_interval: Some(proto_duration(Duration::from_millis(500))),
            }),
            ..Default::default()
        }
    }
}

/// No overall timeout: long polls and streams are the sandbox's business.
fn to_cluster(cluster: &str) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
        timeout: Some(proto_duration(Duration::ZERO)),
        ..Default::default()
    }
}

fn header_input(header: &str) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: "header".into(),
        typed_config: Some(pack_any(HttpRequestHeaderMatchInput {
            header_name: header.into(),
        })),
    }
}

fn header_matches(header: &str, pattern: MatchPattern) -> Predicate {
    Predicate {
        match_type: Some(MatchType::SinglePredicate(SinglePredicate {
            input: Some(header_input(header)),
            matcher: Some(single_predicate::Matcher::ValueMatch(StringMatcher {
                match_pattern: Some(pattern),
                ..Default::default()
            })),
        })),
    }
}

fn action(name: &str, route: Route) -> OnMatch {
    OnMatch {
        on_match: Some(on_match::OnMatch::Action(TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(pack_any(route)),
        })),
        ..Default::default()
    }
}

/// A 400 for a routing header given twice; Envoy's local-reply mapper makes the text a JSON
/// `{code, message}` answer, as ext_proc's.
fn duplicate_header(header: &str) -> Route {
    let message = sandgate_shared::AddressError::Duplicate(match header {
        HEADER_ID => HEADER_ID,
        HEADER_PORT => HEADER_PORT,
        E2B_HEADER_ID => E2B_HEADER_ID,
        _ => E2B_HEADER_PORT,
    })
    .to_string();
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(Action::DirectResponse(DirectResponseAction {
            status: 400,
            body: Some(DataSource {
                specifier: Some(Specifier::InlineString(message)),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
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
mod tests;
