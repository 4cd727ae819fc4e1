//! The ext_proc gRPC edge. Only this module knows the Envoy protobuf types.
//!
//! One stream per HTTP request; one reply per message. Request headers get a decision; any other
//! message (which the Envoy config never sends) gets an empty "continue". A stream reset or EOF is
//! the normal end of a stream, not an error.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
    processing_request::Request as Req,
    processing_response::Response as Resp,
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use futures::Stream;
use sandgate_shared::address::{
    AddressConfig, RequestParts, E2B_HEADER_ID, E2B_HEADER_PORT, HEADER_ID, HEADER_PORT,
};
use tonic::{Request, Response, Status, Streaming};

use crate::activity::ActivityTable;
use crate::decision::{decide, envd_path_allowed, Decision};
use crate::fastpath::FastPath;
use crate::index::SandboxKey;
use crate::metrics::Metrics;
use crate::resolver::Resolver;
use crate::streams::StreamTable;

/// Dynamic-metadata namespace read by the ORIGINAL_DST cluster.
pub const METADATA_NAMESPACE: &str = "envoy.lb";
/// Key inside it holding `ip:port`.
pub const METADATA_KEY: &str = "x-sandbox-destination";
/// Key inside it holding the sandbox ID, read back from Envoy's access logs.
pub const METADATA_SANDBOX_ID: &str = "sandbox-id";
/// Key inside it holding the destination port, for Envoy's own JSON answers ("port not open").
pub const METADATA_PORT: &str = "port";
/// Key inside it set to [`UPSTREAM_H2`] when the port is served as HTTP/2 cleartext: Envoy's route
/// for it (matching this metadata) sends HTTP/2. Absent: HTTP/1.1 (gRPC aside).
pub const METADATA_UPSTREAM: &str = "upstream";
pub const UPSTREAM_H2: &str = "h2";
/// A header name sandgate reserves; removed where an answer needs some header mutation.
const RESERVED_HEADER: &str = "x-sandgate-upstream";
/// Marks sandgate's own answers, so Envoy's local-reply mappers leave their JSON bodies alone.
pub const METADATA_REPLY: &str = "sandgate-reply";
/// Seconds clients are told to wait on a 503.
const RETRY_AFTER_SECS: &[u8] = b"1";

/// Everything a decision needs; shared by all streams.
pub struct Router {
    pub addresses: AddressConfig,
    pub resolver: Arc<Resolver>,
    pub default_port: Option<u16>,
    pub metrics: Metrics,
    pub activity: Arc<ActivityTable>,
    /// Upgrades are opened here at their start; the access-log stream refreshes and closes them.
    pub streams: Arc<StreamTable>,
    pub max_streams_per_sandbox: u32,
    /// The envd port: only the SDK's paths reach it (see [`envd_path_allowed`]).
    pub envd_port: Option<u16>,
    /// Told of every request routed by host, so its host can be routed inside Envoy next time.
    pub fast: Option<Arc<FastPath>>,
}

#[derive(Clone)]
pub struct Processor(Arc<Router>);

impl Processor {
    pub fn new(router: Arc<Router>) -> Self {
        Processor(router)
    }

    pub fn into_service(self) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let router = self.0.clone();
        let replies =
            futures::stream::unfold((inbound, router), |(mut inbound, router)| async move {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let reply = router.on_message(msg).await;
                        Some((Ok(reply), (inbound, router)))
                    }
                    Ok(None) => None,
                    Err(status) => {
                        tracing::trace!(%status, "ext_proc stream ended by Envoy");
                        None
                    }
                }
            });
        Ok(Response::new(Box::pin(replies)))
    }
}

impl Router {
    /// One reply for one message.
    pub async fn on_message(&self, msg: ProcessingRequest) -> ProcessingResponse {
        let response = match msg.request {
            Some(Req::RequestHeaders(h)) => return self.on_request_headers(&h).await,
            Some(Req::ResponseHeaders(_)) => Resp::ResponseHeaders(HeadersResponse::default()),
            Some(Req::RequestBody(_)) => Resp::RequestBody(BodyResponse::default()),
            Some(Req::ResponseBody(_)) => Resp::ResponseBody(BodyResponse::default()),
            Some(Req::RequestTrailers(_)) => Resp::RequestTrailers(TrailersResponse::default()),
            Some(Req::ResponseTrailers(_)) => Resp::ResponseTrailers(TrailersResponse::default()),
            None => Resp::RequestHeaders(HeadersResponse::default()),
        };
        ProcessingResponse {
            response: Some(response),
            ..Default::default()
        }
    }

    /// Parses, resolves, decides and encodes. The hot path.
    pub async fn on_request_headers(&self, headers: &HttpHeaders) -> ProcessingResponse {
        let start = Instant::now();
        let mut parts = RequestParts::default();
        let mut fixes = HeaderFixes::default();
        let mut has_websocket_key = false;
        // A WebSocket (HTTP/1.1 upgrade or HTTP/2 extended CONNECT) lives until its end entry.
        let mut upgrade = false;
        let mut request_id: &[u8] = b"";
        for h in headers.headers.iter().flat_map(|m| m.headers.iter()) {
            let v = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value[..]
            };
            match h.key.as_str() {
                ":authority" => parts.authority = v,
                ":path" => parts.path = v,
                "upgrade" | ":protocol" => {
                    upgrade = true;
                    // An HTTP/2 WebSocket (RFC 8441; Envoy's codec shows it as an HTTP/1.1
                    // upgrade) carries no Sec-WebSocket-Key, which an HTTP/1.1 server requires.
                    fixes.websocket_key |= v.eq_ignore_ascii_case(b"websocket");
                }
                "sec-websocket-key" => has_websocket_key = true,
                "x-request-id" => request_id = v,
                HEADER_ID => {
                    once(&mut parts.header_id, &mut parts.duplicate, v, HEADER_ID);
                    fixes.id = true;
                }
                HEADER_PORT => {
                    once(&mut parts.header_port, &mut parts.duplicate, v, HEADER_PORT);
                    fixes.port = true;
                }
                // The E2B SDK's names (sent when E2B_SANDBOX_URL points at one gateway); ours win
                // when both are sent. Both are stripped.
                E2B_HEADER_ID => {
                    once(
                        &mut parts.e2b_header_id,
                        &mut parts.duplicate,
                        v,
                        E2B_HEADER_ID,
                    );
                    fixes.e2b_id = true;
                }
                E2B_HEADER_PORT => {
                    once(
                        &mut parts.e2b_header_port,
                        &mut parts.duplicate,
                        v,
                        E2B_HEADER_PORT,
                    );
                    fixes.e2b_port = true;
                }
                _ => {}
            }
        }
        fixes.websocket_key &= !has_websocket_key;
        let mut form = None;
        let mut decision = match self.addresses.parse(parts) {
            Ok(addr) => {
                form = Some(addr.form);
                let resolved = self.resolver.resolve(&addr.id).await;
                decide(addr, resolved, self.default_port)
            }
            Err(e) => Decision::BadRequest(e),
        };
        if let Decision::Route {
            id,
            dest,
            rewritten_path,
            ..
        } = &decision
        {
            if Some(dest.port()) == self.envd_port {
                let path = rewritten_path
                    .as_deref()
                    .map(str::as_bytes)
                    .unwrap_or(parts.path);
                if !envd_path_allowed(path) {
                    decision = Decision::EnvdInternal { id: id.clone() };
                }
            }
        }
        if let Decision::Route { id, dest, .. } = &decision {
            // envd's port never goes hot: its paths are checked here, on every request.
            if let (Some(fast), Some(form)) = (&self.fast, form) {
                if Some(dest.port()) != self.envd_port {
                    fast.offer(parts.authority, form, id);
                }
            }
            if let Some(key) = SandboxKey::new(id) {
                if upgrade {
                    decision = self.open_stream(key, request_id, decision);
                } else {
                    self.activity.touch(key);
                }
            }
        }
        self.metrics.outcome(decision.outcome()).inc();
        let reply = encode(decision, fixes);
        self.metrics.decision_seconds.observe(start.elapsed());
        reply
    }
}

impl Router {
    /// Opens a long-lived stream for a routed upgrade, or refuses it when the sandbox already
    /// holds its most.
    fn open_stream<'a>(
        &self,
        key: SandboxKey,
        request_id: &[u8],
        route: Decision<'a>,
    ) -> Decision<'a> {
        let open = self.activity.open_streams(key.as_str());
        if open >= self.max_streams_per_sandbox {
            return Decision::TooManyStreams {
                id: key.as_str().to_string().into(),
                open,
            };
        }
        match std::str::from_utf8(request_id) {
            Ok(id) if !id.is_empty() => {
                self.streams.seen(key, id);
            }
            // No request ID to match its end with: the access log's periodic entries count it.
            _ => self.activity.touch(key),
        }
        route
    }
}

/// Records a routing header's value; one seen twice makes the address ambiguous (refused when it
/// is parsed).
fn once<'a>(
    slot: &mut Option<&'a [u8]>,
    duplicate: &mut Option<&'static str>,
    v: &'a [u8],
    name: &'static str,
) {
    if slot.replace(v).is_some() {
        duplicate.get_or_insert(name);
    }
}

/// What a routed request's headers need: the sandbox-addressing headers it carried (which must go
/// before it reaches the pod), and a Sec-WebSocket-Key for an HTTP/2 WebSocket that has none.
#[derive(Debug, Default, Clone, Copy)]
struct HeaderFixes {
    id: bool,
    port: bool,
    e2b_id: bool,
    e2b_port: bool,
    websocket_key: bool,
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1). The client never sees
/// the accept value computed from it (HTTP/2 WebSockets have none), so it need not be secret.
fn websocket_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    while out.len() < 24 {
        out.push('=');
    }
    out
}

fn encode(decision: Decision<'_>, fixes: HeaderFixes) -> ProcessingResponse {
    use serde_json::json;
    match decision {
        Decision::Route {
            id,
            dest,
            rewritten_path,
            h2,
        } => route_reply(
            &id,
            dest.to_string(),
            dest.port(),
            rewritten_path.as_deref(),
            fixes,
            h2,
        ),
        // E2B SDKs read a 502 whose message says "was not found" as "the sandbox is not running".
        Decision::NotFound { id } => immediate(
            502,
            "sandgate_sandbox_not_found",
            json!({"code": 502, "error": "sandbox not found", "sandbox_id": id,
                   "message": format!("The sandbox {id} was not found")}),
            false,
        ),
        Decision::Terminated { id } => immediate(
            502,
            "sandgate_sandbox_terminated",
            json!({"code": 502, "error": "sandbox not running", "sandbox_id": id,
                   "message": format!("The sandbox {id} was not found: its container has exited")}),
            false,
        ),
        Decision::NotReady { id } => immediate(
            503,
            "sandgate_sandbox_not_ready",
            json!({"code": 503, "error": "sandbox not ready", "sandbox_id": id,
                   "message": format!("The sandbox {id} is not ready yet; retry")}),
            true,
        ),
        Decision::LookupFailed { id } => immediate(
            503,
            "sandgate_lookup_failed",
            json!({"code": 503, "error": "sandbox lookup failed, retry", "sandbox_id": id,
                   "message": format!("The sandbox {id} could not be looked up; retry")}),
            true,
        ),
        Decision::BadRequest(e) => immediate(
            400,
            "sandgate_bad_address",
            json!({"code": 400, "error": e.to_string(), "reason": e.label(),
                   "message": e.to_string()}),
            false,
        ),
        Decision::TooManyStreams { id, open } => immediate(
            429,
            "sandgate_too_many_streams",
            json!({"code": 429, "error": "too many open streams", "sandbox_id": id,
                   "open_streams": open,
                   "message": format!("The sandbox {id} has {open} streams open, the most allowed; close one and retry")}),
            true,
        ),
        Decision::EnvdInternal { id } => immediate(
            403,
            "sandgate_envd_internal",
            json!({"code": 403, "error": "envd internal route", "sandbox_id": id,
                   "message": format!("This path of the sandbox {id}'s envd is for the control plane only")}),
            false,
        ),
        Decision::NoPort { id } => immediate(
            400,
            "sandgate_no_port",
            json!({"code": 400, "error": "no port in the address and no default port for this sandbox",
                   "sandbox_id": id,
                   "message": format!("The sandbox {id} has no default port: name one in the address")}),
            false,
        ),
    }
}

fn route_reply(
    id: &str,
    dest: String,
    port: u16,
    rewritten_path: Option<&str>,
    fixes: HeaderFixes,
    h2: bool,
) -> ProcessingResponse {
    let mut lb = Struct {
        fields: HashMap::from([
            (METADATA_KEY.to_string(), string_value(dest)),
            (
                METADATA_SANDBOX_ID.to_string(),
                string_value(id.to_string()),
            ),
            (METADATA_PORT.to_string(), string_value(port.to_string())),
        ]),
    };
    if h2 {
        lb.fields.insert(
            METADATA_UPSTREAM.to_string(),
            string_value(UPSTREAM_H2.to_string()),
        );
    }
    let metadata = namespaced(lb);
    let mut mutation = HeaderMutation::default();
    if let Some(path) = rewritten_path {
        mutation
            .set_headers
            .push(set_header(":path", path.as_bytes()));
    }
    if fixes.websocket_key {
        mutation
            .set_headers
            .push(set_header("sec-websocket-key", websocket_key().as_bytes()));
    }
    if fixes.id {
        mutation.remove_headers.push(HEADER_ID.to_string());
    }
    if fixes.port {
        mutation.remove_headers.push(HEADER_PORT.to_string());
    }
    if fixes.e2b_id {
        mutation.remove_headers.push(E2B_HEADER_ID.to_string());
    }
    if fixes.e2b_port {
        mutation.remove_headers.push(E2B_HEADER_PORT.to_string());
    }
    if h2 {
        // Envoy clears the route only for an answer that mutates headers: removing a name
        // sandgate reserves (and no pod needs) is one.
        mutation.remove_headers.push(RESERVED_HEADER.to_string());
    }
    let has_mutation = !mutation.set_headers.is_empty() || !mutation.remove_headers.is_empty();
    ProcessingResponse {
        dynamic_metadata: Some(metadata),
        response: Some(Resp::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: has_mutation.then_some(mutation),
                // The route was chosen before this answer; only an h2c port needs it chosen
                // again (its route matches the metadata above). Everything else keeps it.
                clear_route_cache: h2,
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

fn immediate(
    status: u16,
    details: &str,
    body: serde_json::Value,
    retry: bool,
) -> ProcessingResponse {
    let mut headers = HeaderMutation {
        set_headers: vec![set_header("content-type", b"application/json")],
        ..Default::default()
    };
    if retry {
        headers
            .set_headers
            .push(set_header("retry-after", RETRY_AFTER_SECS));
    }
    let marker = Struct {
        fields: HashMap::from([(METADATA_REPLY.to_string(), string_value("1".into()))]),
    };
    ProcessingResponse {
        dynamic_metadata: Some(namespaced(marker)),
        response: Some(Resp::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(headers),
            body: body.to_string().into_bytes(),
            details: details.to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// `fields` under the `envoy.lb` namespace, as Envoy expects dynamic metadata.
fn namespaced(fields: Struct) -> Struct {
    Struct {
        fields: HashMap::from([(
            METADATA_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(fields)),
            },
        )]),
    }
}

fn string_value(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
