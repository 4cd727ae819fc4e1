//! Which E2B operation a request is: pure parsing of method and path. v1 and v2 paths both
//! route, since SDKs up to 2.50 use the v1 create/connect paths and later ones the v2 paths.

use http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Create,
    List,
    Get(String),
    Kill(String),
    Connect(String),
    SetTimeout(String),
    /// Pause, resume, snapshots, metrics: answered 501 with what to do instead.
    Unsupported {
        what: &'static str,
        id: String,
    },
    /// A known path with another method: 405.
    MethodNotAllowed,
    NotFound,
}

pub fn route(method: &Method, path: &str) -> Route {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let segs: Vec<&str> = match segs.as_slice() {
        ["v2", rest @ ..] => rest.to_vec(),
        _ => segs,
    };
    let m = method;
    match segs.as_slice() {
        ["health"] if m == Method::GET => Route::Health,
        ["sandboxes"] if m == Method::POST => Route::Create,
        ["sandboxes"] if m == Method::GET => Route::List,
        ["sandboxes"] => Route::MethodNotAllowed,
        ["sandboxes", id] if m == Method::GET => Route::Get(id.to_string()),
        ["sandboxes", id] if m == Method::DELETE => Route::Kill(id.to_string()),
        ["sandboxes", _] => Route::MethodNotAllowed,
        ["sandboxes", id, "connect"] if m == Method::POST => Route::Connect(id.to_string()),
        ["sandboxes", id, "timeout"] if m == Method::POST => Route::SetTimeout(id.to_string()),
        ["sandboxes", id, what @ ("pause" | "resume" | "snapshots" | "metrics" | "refreshes")] => {
            Route::Unsupported {
                what: match *what {
                    "pause" => "pause",
                    "resume" => "resume",
                    "snapshots" => "snapshots",
                    "metrics" => "metrics",
                    _ => "refreshes",
                },
                id: id.to_string(),
            }
        }
        ["sandboxes", _, "connect" | "timeout"] => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// The metric label of a route.
pub fn label(r: &Route) -> &'static str {
    match r {
        Route::Health => "health",
        Route::Create => "create",
        Route::List => "list",
        Route::Get(_) => "get",
        Route::Kill(_) => "kill",
        Route::Connect(_) => "connect",
        Route::SetTimeout(_) => "set_timeout",
        Route::Unsupported { .. } => "unsupported",
        Route::MethodNotAllowed => "method_not_allowed",
        Route::NotFound => "not_found",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_paths_route_alike() {
        let r = |m: Method, p: &str| route(&m, p);
        let cases = [
            (r(Method::POST, "/sandboxes"), Route::Create),
            (r(Method::POST, "/v2/sandboxes"), Route::Create),
            (r(Method::GET, "/v2/sandboxes"), Route::List),
            (r(Method::GET, "/sandboxes/"), Route::List),
            (
                r(Method::GET, "/sandboxes/sbx-1"),
                Route::Get("sbx-1".into()),
            ),
            (
                r(Method::DELETE, "/sandboxes/sbx-1"),
                Route::Kill("sbx-1".into()),
            ),
            (
                r(Method::POST, "/sandboxes/sbx-1/connect"),
                Route::Connect("sbx-1".into()),
            ),
            (
                r(Method::POST, "/v2/sandboxes/sbx-1/connect"),
                Route::Connect("sbx-1".into()),
            ),
            (
                r(Method::POST, "/sandboxes/sbx-1/timeout"),
                Route::SetTimeout("sbx-1".into()),
            ),
            (
                r(Method::POST, "/sandboxes/sbx-1/pause"),
                Route::Unsupported {
                    what: "pause",
                    id: "sbx-1".into(),
                },
            ),
            (
                r(Method::GET, "/sandboxes/sbx-1/metrics"),
                Route::Unsupported {
                    what: "metrics",
                    id: "sbx-1".into(),
                },
            ),
            (r(Method::PUT, "/sandboxes"), Route::MethodNotAllowed),
            (
                r(Method::GET, "/sandboxes/sbx-1/connect"),
                Route::MethodNotAllowed,
            ),
            (r(Method::GET, "/templates"), Route::NotFound),
            (r(Method::GET, "/"), Route::NotFound),
            (r(Method::GET, "/health"), Route::Health),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
