//! The API double's HTTP layer: Kubernetes REST paths onto the store, watches as streamed JSON lines.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio_stream::wrappers::BroadcastStream;

use super::selector::Selector;
use super::store::{ApiError, Change, EventType, PatchKind, Store};
use super::Hooks;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A parsed request path.
#[derive(Debug)]
struct Target {
    api_version: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
    /// `pods/<name>/binding`: the scheduler's (here, the loopback kubelet's) placement.
    binding: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(n.to_string()), None),
        [r, n, sub @ ("status" | "binding")] => (*r, Some(n.to_string()), Some(*sub)),
        _ => return None,
    };
    if sub == Some("binding") && (resource != "pods" || namespace.is_none()) {
        return None;
    }
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(Target {
        resource: if group.is_empty() {
            resource.to_string()
        } else {
            format!("{group}/{resource}")
        },
        api_version,
        namespace,
        name,
        status: sub == Some("status"),
        binding: sub == Some("binding"),
    })
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

pub async fn handle(
    store: Arc<Store>,
    hooks: Arc<Hooks>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if let Some(token) = &hooks.token {
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {token}")) {
            return Ok(error(ApiError::new(401, "Unauthorized", "Unauthorized")));
        }
    }
    if let Some(doc) = discovery(&path) {
        return Ok(json_response(200, &doc));
    }
    let Some(t) = parse_path(&path) else {
        return Ok(error(ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )));
    };
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error(ApiError::new(400, "BadRequest", "unreadable body"))),
    };
    let parse_body = || {
        serde_json::from_slice::<Value>(&body)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("invalid JSON body: {e}")))
    };
    let ns = t.namespace.clone().unwrap_or_default();
    let result = match (&method, &t.name) {
        (&Method::GET, None) => {
            let sel =
                match Selector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
                {
                    Ok(s) => s,
                    Err(e) => return Ok(error(ApiError::new(400, "BadRequest", e))),
                };
            let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
            if watching {
                return Ok(watch(store, &t, sel, &query));
            }
            if let Some(d) = hooks.list_delay() {
                tokio::time::sleep(d).await;
            }
            let (items, rv) = store.list(&t.resource, t.namespace.as_deref(), &sel);
            let kind = items
                .first()
                .and_then(|o| o["kind"].as_str())
                .map(|k| format!("{k}List"))
                .unwrap_or_else(|| "List".into());
            Ok((
                200,
                json!({"apiVersion": t.api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        (&Method::GET, Some(name)) => store.get(&t.resource, &ns, name).map(|o| (200, o)),
        (&Method::POST, Some(name)) if t.binding => {
            parse_body().and_then(|b| bind(&store, &ns, name, &b))
        }
        (&Method::POST, None) => parse_body()
            .and_then(|b| store.create(&t.resource, &ns, b))
            .map(|o| (201, o)),
        (&Method::PUT, Some(name)) => parse_body()
            .and_then(|b| store.replace(&t.resource, &ns, name, b, t.status))
            .map(|o| (200, o)),
        (&Method::PATCH, Some(name)) => {
            let kind = if content_type.starts_with("application/json-patch+json") {
                PatchKind::Json
            } else if content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json")
            {
                PatchKind::Merge
            } else {
                return Ok(error(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("unsupported patch type {content_type:?}"),
                )));
            };
            if kind == PatchKind::Json {
                if let Some(hook) = hooks.take_before_json_patch() {
                    hook(&store);
                }
            }
            parse_body()
                .and_then(|b| store.patch(&t.resource, &ns, name, kind, &b, t.status))
                .map(|o| (200, o))
        }
        (&Method::DELETE, Some(name)) => {
            let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let precondition = options["preconditions"]["resourceVersion"].as_str();
            store
                .delete(&t.resource, &ns, name, precondition)
                .map(|o| (200, o))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} not supported on {path}"),
        )),
    };
    Ok(match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error(e),
    })
}

/// Decides what a watcher with this selector sees of one change.
/// `POST pods/<name>/binding`: sets `spec.nodeName` once, as the API server does.
fn bind(store: &Store, ns: &str, name: &str, binding: &Value) -> Result<(u16, Value), ApiError> {
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(422, "Invalid", "target.name: Required value"))?;
    let pod = store.get("pods", ns, name)?;
    if pod["spec"]["nodeName"]
        .as_str()
        .is_some_and(|n| !n.is_empty())
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node {}", pod["spec"]["nodeName"]),
        ));
    }
    let patch = json!({"spec": {"nodeName": node}});
    store.patch("pods", ns, name, PatchKind::Merge, &patch, false)?;
    Ok((
        201,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}),
    ))
}

fn visible(
    c: &Change,
    resource: &str,
    ns: Option<&str>,
    sel: &Selector,
) -> Option<(EventType, Value)> {
    if c.resource != resource || ns.is_some_and(|ns| ns != c.namespace) {
        return None;
    }
    let now = sel.matches(&c.object);
    let before = c.old.as_ref().is_some_and(|o| sel.matches(o));
    match (c.kind, before, now) {
        (EventType::Deleted, _, _) if now || before => Some((EventType::Deleted, c.object.clone())),
        (EventType::Deleted, _, _) => None,
        (_, false, true) => Some((EventType::Added, c.object.clone())),
        (_, true, false) => Some((EventType::Deleted, c.object.clone())),
        (k, true, true) => Some((k, c.object.clone())),
        (_, false, false) => None,
    }
}

fn line(kind: &str, object: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Ok(Frame::data(Bytes::from(s)))
}

fn watch(
    store: Arc<Store>,
    t: &Target,
    sel: Selector,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let live = store.subscribe();
    let since: Option<u64> = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800),
    );
    let (resource, ns) = (t.resource.clone(), t.namespace.clone());
    let kind = if t.api_version == "v1" && t.resource == "pods" {
        "Pod"
    } else {
        "Object"
    };
    let api_version = t.api_version.clone();

    // Initial events: either the log after `since`, or the current state as ADDED.
    let (initial, mut last_rv): (Vec<Result<Frame<Bytes>, Infallible>>, u64) = match since {
        Some(rv) => match store.changes_since(rv) {
            Some(changes) => {
                let frames = changes
                    .iter()
                    .filter_map(|c| {
                        visible(c, &resource, ns.as_deref(), &sel)
                            .map(|(k, o)| line(k.as_str(), &o))
                    })
                    .collect();
                (frames, changes.last().map(|c| c.rv).unwrap_or(rv))
            }
            None => {
                let gone = ApiError::new(410, "Expired", format!("too old resource version: {rv}"));
                return streamed(
                    futures::stream::iter(vec![line("ERROR", &gone.to_status())]).boxed(),
                );
            }
        },
        None => {
            let (items, rv) = store.list(&resource, ns.as_deref(), &sel);
            (items.iter().map(|o| line("ADDED", o)).collect(), rv)
        }
    };
    // A bookmark promises every change up to its version was sent, so it carries the last
    // version this stream has passed, not the store's newest.
    let passed = Arc::new(std::sync::atomic::AtomicU64::new(last_rv));
    let passed_live = passed.clone();
    // A watcher that falls behind the change feed is closed, as the API server closes a slow
    // watch: the client watches again from the last version it saw and misses nothing.
    let live = BroadcastStream::new(live)
        .take_while(|c| futures::future::ready(c.is_ok()))
        .filter_map(move |c| {
            let out = match c {
                Ok(c) if c.rv > last_rv => {
                    last_rv = c.rv;
                    passed_live.store(c.rv, std::sync::atomic::Ordering::Relaxed);
                    visible(&c, &resource, ns.as_deref(), &sel).map(|(k, o)| line(k.as_str(), &o))
                }
                _ => None,
            };
            futures::future::ready(out)
        });
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)))
        .filter_map(move |_| {
            let out = bookmarks.then(|| {
                line("BOOKMARK", &json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": passed.load(std::sync::atomic::Ordering::Relaxed).to_string()}}))
            });
            futures::future::ready(out)
        });
    // Bookmarks stop with the live feed.
    let live = live.map(Some).chain(futures::stream::once(async { None }));
    let merged = futures::stream::select(live, ticks.map(Some))
        .take_while(|f| futures::future::ready(f.is_some()))
        .filter_map(futures::future::ready);
    let events = futures::stream::iter(initial)
        .chain(merged)
        .take_until(tokio::time::sleep(timeout));
    streamed(events.boxed())
}

fn streamed(
    s: futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>,
) -> Response<Body> {
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(s)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Resources the double advertises: (group, version, [(plural, kind, short name)]).
/// (plural, kind, short name).
type Resource = (&'static str, &'static str, &'static str);

const RESOURCES: &[(&str, &str, &[Resource])] = &[
    (
        "",
        "v1",
        &[
            ("pods", "Pod", "po"),
            ("events", "Event", "ev"),
            ("services", "Service", "svc"),
            ("namespaces", "Namespace", "ns"),
        ],
    ),
    ("coordination.k8s.io", "v1", &[("leases", "Lease", "")]),
    (
        "discovery.k8s.io",
        "v1",
        &[("endpointslices", "EndpointSlice", "")],
    ),
    (
        "sandgate.dev",
        "v1alpha1",
        &[
            ("sandboxpools", "SandboxPool", "sbp"),
            ("sandboxclaims", "SandboxClaim", "sbc"),
        ],
    ),
];

/// Discovery documents, so kubectl works against the double.
fn discovery(path: &str) -> Option<Value> {
    let gv = |g: &str, v: &str| {
        if g.is_empty() {
            v.to_string()
        } else {
            format!("{g}/{v}")
        }
    };
    match path.trim_end_matches('/') {
        "/version" => Some(
            json!({"major": "1", "minor": "36", "gitVersion": "v1.36.0-sandgate-double", "platform": "linux/amd64"}),
        ),
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        "/apis" => {
            let groups: Vec<Value> = RESOURCES
                .iter()
                .filter(|(g, _, _)| !g.is_empty())
                .map(|(g, v, _)| {
                    let d = json!({"groupVersion": gv(g, v), "version": v});
                    json!({"name": g, "versions": [d.clone()], "preferredVersion": d})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        p => {
            let (g, v, res) = RESOURCES.iter().find(|(g, v, _)| {
                p == format!("/api/{v}") && g.is_empty() || p == format!("/apis/{g}/{v}")
            })?;
            let verbs = [
                "create", "delete", "get", "list", "patch", "update", "watch",
            ];
            let mut resources = Vec::new();
            for (plural, kind, short) in res.iter() {
                let singular = kind.to_lowercase();
                let shorts: Vec<&str> = if short.is_empty() {
                    vec![]
                } else {
                    vec![short]
                };
                resources.push(json!({"name": plural, "singularName": singular, "namespaced": *plural != "namespaces", "kind": kind, "verbs": verbs, "shortNames": shorts}));
                resources.push(json!({"name": format!("{plural}/status"), "singularName": "", "namespaced": *plural != "namespaces", "kind": kind, "verbs": ["get", "patch", "update"]}));
            }
            Some(
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv(g, v), "resources": resources}),
            )
        }
    }
}
