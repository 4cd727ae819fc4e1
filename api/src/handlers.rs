//! The E2B operations over SandboxClaims: create, connect, list, get_info, kill, set_timeout.
//! Reads come from the claim and pool reflectors; writes go to the API server. Every answer is
//! a status, a JSON body (`{code, message}` for errors) and headers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::StatusCode;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use sandgate_controller::crd::{ClaimPhase, SandboxClaim};
use serde_json::{json, Value};

use crate::e2b::{self, NewSandbox};
use crate::keys::Team;
use crate::App;

/// An answer: status, JSON body (None for 204), extra headers.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Option<Value>,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    pub fn json(status: StatusCode, body: Value) -> Self {
        Answer {
            status,
            body: Some(body),
            headers: Vec::new(),
        }
    }
    pub fn empty() -> Self {
        Answer {
            status: StatusCode::NO_CONTENT,
            body: None,
            headers: Vec::new(),
        }
    }
    pub fn error(status: StatusCode, message: impl AsRef<str>) -> Self {
        Self::json(status, e2b::error_body(status.as_u16(), message.as_ref()))
    }
    pub fn with_header(mut self, k: &'static str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
}

type Result<T> = std::result::Result<T, Answer>;

fn bad_request(message: impl AsRef<str>) -> Answer {
    Answer::error(StatusCode::BAD_REQUEST, message)
}

fn not_found(id: &str) -> Answer {
    Answer::error(StatusCode::NOT_FOUND, format!("sandbox {id} not found"))
}

fn upstream(e: kube::Error) -> Answer {
    tracing::warn!(error = %e, "kubernetes API call failed");
    Answer::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the Kubernetes API could not be reached; retry",
    )
}

impl App {
    fn claims_api(&self) -> Api<SandboxClaim> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn domain(&self) -> Option<&str> {
        self.config.sandbox_domain.as_deref()
    }

    /// The team's claim for sandbox `id`, whatever its phase.
    fn claim_of(&self, team: &Team, id: &str) -> Option<Arc<SandboxClaim>> {
        self.claims
            .state()
            .into_iter()
            .find(|c| e2b::sandbox_id(c) == Some(id) && e2b::owned_by(c, &team.name))
    }

    fn running_claim(&self, team: &Team, id: &str) -> Result<Arc<SandboxClaim>> {
        self.claim_of(team, id)
            .filter(|c| e2b::is_running(c))
            .ok_or_else(|| not_found(id))
    }

    fn pool_of(&self, claim: &SandboxClaim) -> Option<Arc<sandgate_controller::crd::SandboxPool>> {
        self.pools
            .state()
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some(claim.spec.pool_name.as_str()))
    }

    /// Seconds asked for, checked against the bounds (`None`: the default).
    fn lifetime(&self, asked: Option<i64>) -> Result<Duration> {
        let max = self.config.max_timeout;
        match asked {
            None => Ok(self.config.default_timeout.min(max)),
            Some(s) if s <= 0 => Err(bad_request(format!(
                "timeout must be a positive number of seconds (got {s})"
            ))),
            Some(s) if Duration::from_secs(s as u64) > max => Err(bad_request(format!(
                "timeout {s}s is above the maximum of {}s",
                max.as_secs()
            ))),
            Some(s) => Ok(Duration::from_secs(s as u64)),
        }
    }

    pub async fn create(
        &self,
        team: &Team,
        body: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Answer> {
        let started = Instant::now();
        let req: NewSandbox = serde_json::from_slice(body)
            .map_err(|e| bad_request(format!("invalid request body: {e}")))?;
        unsupported_options(&req)?;
        let lifetime = self.lifetime(req.timeout)?;
        let pools = self.pools.state();
        let pool = e2b::find_pool(&pools, &req.template_id).ok_or_else(|| {
            bad_request(format!(
                "template {:?} not found: a templateID names a SandboxPool in namespace {} (or one of its {} aliases)",
                req.template_id, self.config.namespace, e2b::ANN_ALIASES
            ))
        })?;
        let pool_name = pool.name_any();
        if !req.env_vars.is_empty()
            && pool
                .annotations()
                .get(e2b::ANN_ENV_VARS)
                .map(String::as_str)
                == Some("false")
        {
            return Err(bad_request(format!(
                "template {} does not accept envVars (its pool sets {}: \"false\")",
                req.template_id,
                e2b::ANN_ENV_VARS
            )));
        }
        let limit = team
            .max_sandboxes
            .unwrap_or(self.config.team_max_sandboxes)
            .min(self.config.team_max_sandboxes);
        let live = self
            .claims
            .state()
            .iter()
            .filter(|c| e2b::owned_by(c, &team.name) && e2b::is_live(c))
            .count();
        if live >= limit as usize {
            return Err(Answer::error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "team {} has {live} sandboxes, its limit; kill one and retry",
                    team.name
                ),
            )
            .with_header("should-retry", "false"));
        }
        // As on E2B today, `secure` is not a choice: every sandgate-envd sandbox gets a token.
        let secure = crate::envd::runs_sandgate_envd(Some(pool));
        let claim = self.claim_for(team, &req, &pool_name, lifetime, idempotency_key, secure)?;
        let name = match self
            .claims_api()
            .create(&PostParams::default(), &claim)
            .await
        {
            Ok(c) => c.name_any(),
            Err(kube::Error::Api(e)) if e.code == 409 && idempotency_key.is_some() => {
                // The same key again: the same sandbox, if it is this team's.
                let existing = claim.metadata.name.clone().unwrap_or_default();
                let theirs = self.claims_api().get(&existing).await.map_err(upstream)?;
                if !e2b::owned_by(&theirs, &team.name) {
                    return Err(Answer::error(
                        StatusCode::CONFLICT,
                        "this Idempotency-Key is in use",
                    ));
                }
                existing
            }
            Err(kube::Error::Api(e)) if e.code == 422 => {
                return Err(bad_request(format!("refused: {}", e.message)))
            }
            Err(e) => return Err(upstream(e)),
        };
        let bound = self.wait_bound(&name).await?;
        self.metrics
            .create_seconds
            .observe(started.elapsed().as_secs_f64());
        let pool = self.pool_of(&bound);
        let token = self
            .init_envd(&bound, pool.as_deref(), &req, started)
            .await?;
        let mut sandbox = e2b::sandbox(&bound, pool.as_deref(), self.domain());
        sandbox.envd_access_token = token;
        tracing::info!(team = %team.name, claim = %name, sandbox_id = %sandbox.sandbox_id, template = %req.template_id, "sandbox created");
        Ok(Answer::json(StatusCode::CREATED, json!(sandbox)))
    }

    /// The SandboxClaim for a create request.
    fn claim_for(
        &self,
        team: &Team,
        req: &NewSandbox,
        pool: &str,
        lifetime: Duration,
        idempotency_key: Option<&str>,
        secure: bool,
    ) -> Result<SandboxClaim> {
        let metadata =
            serde_json::to_string(&req.metadata).map_err(|e| bad_request(e.to_string()))?;
        let mut annotations = BTreeMap::from([
            (e2b::ANN_METADATA.to_string(), metadata),
            (e2b::ANN_TEMPLATE.to_string(), req.template_id.clone()),
        ]);
        if secure {
            annotations.insert(crate::envd::ANN_SECURE.to_string(), "true".to_string());
        }
        sandgate_shared::meta::check_annotations("metadata", &annotations)
            .map_err(|e| bad_request(e.to_string()))?;
        let mut pod_annotations = BTreeMap::new();
        if !req.env_vars.is_empty() {
            let env =
                serde_json::to_string(&req.env_vars).map_err(|e| bad_request(e.to_string()))?;
            pod_annotations.insert(e2b::POD_ANN_ENV_VARS.to_string(), env);
        }
        let mut meta = json!({
            "labels": {e2b::LABEL_TEAM: team.name, e2b::LABEL_CREATED_BY: "sandgate-api"},
            "annotations": annotations,
        });
        match idempotency_key {
            Some(key) => {
                if key.is_empty() || key.len() > 255 {
                    return Err(bad_request("Idempotency-Key must be 1 to 255 characters"));
                }
                let h = crate::keys::hash(&format!("{}\n{key}", team.name));
                meta["name"] = json!(format!("e2b-{}", &h[..20]));
            }
            None => meta["generateName"] = json!("e2b-"),
        }
        serde_json::from_value(json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
            "metadata": meta,
            "spec": {"poolName": pool, "timeout": format!("{}s", lifetime.as_secs()),
                     "annotations": pod_annotations},
        }))
        .map_err(|e| bad_request(e.to_string()))
    }

    /// For a pool that runs sandgate-envd: hands the bound pod's envd the sandbox's env vars
    /// and, if secure, its access token (returned for the SDK). A pod whose envd does not take
    /// its init within the create timeout is given back (the claim deleted) and create is a 503.
    async fn init_envd(
        &self,
        claim: &SandboxClaim,
        pool: Option<&sandgate_controller::crd::SandboxPool>,
        req: &NewSandbox,
        started: Instant,
    ) -> Result<Option<String>> {
        if !crate::envd::runs_sandgate_envd(pool) {
            return Ok(None);
        }
        let name = claim.name_any();
        let id = e2b::sandbox_id(claim).unwrap_or_default();
        let token = crate::envd::is_secure(claim).then(|| self.envd_tokens.token(claim, id));
        let ip = claim
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let deadline = tokio::time::Instant::from_std(started + self.config.create_timeout);
        let result = match ip {
            Some(ip) => {
                crate::envd::init(
                    ip,
                    self.config.envd_port,
                    &req.env_vars,
                    token.as_deref(),
                    deadline,
                )
                .await
            }
            None => Err(format!("claim {name} names no pod IP")),
        };
        if let Err(why) = result {
            tracing::warn!(claim = %name, sandbox_id = %id, error = %why, "envd init failed; the sandbox is given back");
            let _ = self
                .claims_api()
                .delete(&name, &DeleteParams::default())
                .await;
            return Err(Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the sandbox's envd did not start: {why}; retry"),
            )
            .with_header("retry-after", "1"));
        }
        Ok(token)
    }

    /// Claim `name` as this replica's watch last saw it.
    fn cached_claim(&self, name: &str) -> Option<Arc<SandboxClaim>> {
        let key = kube::runtime::reflector::ObjectRef::new(name).within(&self.config.namespace);
        self.claims.get(&key)
    }

    /// Waits (on the claim watch) until the claim is Bound. Past `--create-timeout` the claim
    /// is deleted, so no pod is bound to a sandbox nobody will use, and the answer is a 503.
    async fn wait_bound(&self, name: &str) -> Result<Arc<SandboxClaim>> {
        let deadline = tokio::time::Instant::now() + self.config.create_timeout;
        let mut changed = self.claims_changed.subscribe();
        loop {
            let claim = self.cached_claim(name);
            if let Some(c) = &claim {
                let status = c.status.clone().unwrap_or_default();
                match status.phase {
                    ClaimPhase::Bound if status.sandbox_id.is_some() => return Ok(c.clone()),
                    ClaimPhase::Failed | ClaimPhase::Released => {
                        let why = status
                            .conditions
                            .first()
                            .map(|c| c.message.clone())
                            .unwrap_or_else(|| format!("claim {name} is {:?}", status.phase));
                        return Err(Answer::error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("the sandbox could not start: {why}"),
                        ));
                    }
                    _ => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                let _ = self
                    .claims_api()
                    .delete(name, &DeleteParams::default())
                    .await;
                return Err(Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no warm sandbox was available within {}s; retry",
                        self.config.create_timeout.as_secs()
                    ),
                )
                .with_header("retry-after", "1"));
            }
        }
    }

    pub async fn connect(&self, team: &Team, id: &str, body: &[u8]) -> Result<Answer> {
        let req = timeout_body(body)?;
        let claim = self.running_claim(team, id)?;
        let lifetime = self.lifetime(req.timeout)?;
        // Connect only ever extends the lifetime.
        let wanted = jiff::Timestamp::now() + lifetime_span(lifetime);
        if claim.expires_at().is_none_or(|e| e < wanted) {
            self.set_expiry(&claim, wanted).await?;
        }
        let pool = self.pool_of(&claim);
        let mut sandbox = e2b::sandbox(&claim, pool.as_deref(), self.domain());
        if crate::envd::runs_sandgate_envd(pool.as_deref()) && crate::envd::is_secure(&claim) {
            sandbox.envd_access_token = Some(self.envd_tokens.token(&claim, id));
        }
        Ok(Answer::json(StatusCode::OK, json!(sandbox)))
    }

    pub async fn set_timeout(&self, team: &Team, id: &str, body: &[u8]) -> Result<Answer> {
        let req = timeout_body(body)?;
        let Some(asked) = req.timeout else {
            return Err(bad_request("timeout (seconds) is required"));
        };
        let claim = self.running_claim(team, id)?;
        let lifetime = self.lifetime(Some(asked))?;
        // set_timeout moves the expiry either way.
        self.set_expiry(&claim, jiff::Timestamp::now() + lifetime_span(lifetime))
            .await?;
        Ok(Answer::empty())
    }

    /// Waits (on the claim watch, up to 5 s) until this replica's view of claim `name` satisfies
    /// `done`, so a read right after a write answers with what was written.
    async fn until_seen(&self, name: &str, done: impl Fn(Option<&SandboxClaim>) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut changed = self.claims_changed.subscribe();
        loop {
            let claim = self.cached_claim(name);
            if done(claim.as_deref()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                tracing::warn!(
                    claim = name,
                    "the claim watch did not show a write within 5 s"
                );
                return;
            }
        }
    }

    /// Writes `spec.timeout` so that `creationTimestamp + timeout` is `at` (rounded up).
    async fn set_expiry(&self, claim: &SandboxClaim, at: jiff::Timestamp) -> Result<()> {
        let created = claim
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(jiff::Timestamp::now);
        let secs = at.duration_since(created).as_secs_f64().ceil().max(1.0) as u64;
        let timeout = format!("{secs}s");
        let patch = json!({"spec": {"timeout": timeout}});
        self.claims_api()
            .patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(upstream)?;
        self.until_seen(&claim.name_any(), |c| {
            c.is_none_or(|c| c.spec.timeout.as_deref() == Some(timeout.as_str()))
        })
        .await;
        Ok(())
    }

    pub fn get(&self, team: &Team, id: &str) -> Result<Answer> {
        let claim = self.running_claim(team, id)?;
        let pool = self.pool_of(&claim);
        Ok(Answer::json(
            StatusCode::OK,
            json!(e2b::detail(&claim, pool.as_deref(), self.domain(), true)),
        ))
    }

    pub async fn kill(&self, team: &Team, id: &str) -> Result<Answer> {
        let claim = self.claim_of(team, id).ok_or_else(|| not_found(id))?;
        let running = e2b::is_running(&claim);
        match self
            .claims_api()
            .delete(&claim.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Err(not_found(id)),
            Err(e) => return Err(upstream(e)),
        }
        // The claim goes once the controller has released its pod (its finalizer): then the
        // gateway no longer routes to it.
        self.until_seen(&claim.name_any(), |c| c.is_none()).await;
        tracing::info!(team = %team.name, sandbox_id = %id, "sandbox killed");
        // A sandbox that had already ended is gone: the SDK reads 404 as "already killed".
        if running {
            Ok(Answer::empty())
        } else {
            Err(not_found(id))
        }
    }

    pub fn list(&self, team: &Team, query: &str) -> Result<Answer> {
        let q: BTreeMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let filter = q
            .get("metadata")
            .map(|m| e2b::metadata_filter(m))
            .unwrap_or_default();
        let wants_running = q
            .get("state")
            .is_none_or(|s| s.split(',').any(|x| x.trim() == "running"));
        let limit = match q.get("limit") {
            None => 100,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| bad_request("limit must be between 1 and 1000"))?,
        };
        let after = match q.get("nextToken").filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| bad_request("nextToken is not one this API issued"))?,
            ),
        };
        let mut claims: Vec<Arc<SandboxClaim>> = self
            .claims
            .state()
            .into_iter()
            .filter(|c| {
                wants_running
                    && e2b::owned_by(c, &team.name)
                    && e2b::is_running(c)
                    && e2b::matches(&e2b::metadata(c), &filter)
            })
            .collect();
        claims.sort_by_key(|c| order_key(c));
        let start = after
            .map(|a| claims.partition_point(|c| order_key(c) <= a))
            .unwrap_or(0);
        let page: Vec<&Arc<SandboxClaim>> = claims.iter().skip(start).take(limit).collect();
        let more = start + page.len() < claims.len();
        let items: Vec<Value> = page
            .iter()
            .map(|c| {
                let pool = self.pool_of(c);
                json!(e2b::detail(c, pool.as_deref(), self.domain(), false))
            })
            .collect();
        let mut answer = Answer::json(StatusCode::OK, Value::Array(items));
        if more {
            if let Some(last) = page.last() {
                let token =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(order_key(last));
                answer = answer.with_header("x-next-token", token);
            }
        }
        Ok(answer)
    }
}

/// Sort order of the list: creation time, then name (so a page token is a position).
fn order_key(c: &SandboxClaim) -> String {
    let ts = c
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    format!("{ts:020}|{}", c.name_any())
}

fn lifetime_span(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)
}

fn timeout_body(body: &[u8]) -> Result<e2b::Timeout> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(e2b::Timeout::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid request body: {e}")))
}

/// Options sandgate cannot honour get a 400 naming them.
fn unsupported_options(req: &NewSandbox) -> Result<()> {
    if req.auto_pause == Some(true) {
        return Err(bad_request(
            "autoPause is not supported: sandgate does not pause sandboxes; at its timeout a sandbox is released (extend it with set_timeout or connect)",
        ));
    }
    let enabled = |v: &Option<Value>| match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Object(o)) => o.get("enabled").and_then(Value::as_bool).unwrap_or(true),
        Some(Value::Null) | None => false,
        Some(_) => true,
    };
    if enabled(&req.auto_resume) {
        return Err(bad_request(
            "autoResume is not supported: sandboxes are never paused",
        ));
    }
    if req.mcp.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(bad_request("mcp is not supported by sandgate"));
    }
    if req
        .volume_mounts
        .as_ref()
        .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(bad_request("volumeMounts are not supported by sandgate"));
    }
    for key in ["autoPauseMemory", "iam"] {
        let set = match req.other.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad_request(format!("{key} is not supported by sandgate")));
        }
    }
    network_options(&req.other).map_err(bad_request)
}

/// The network controls the SDKs send, each either honoured (its default: open) or refused with
/// a message naming it; sandgate enforces none of the restrictions yet, and a sandbox asked to be
/// locked down must never be created open.
pub fn network_options(other: &BTreeMap<String, Value>) -> std::result::Result<(), String> {
    const NOT_YET: &str = "sandgate does not enforce it yet; the sandbox was not created";
    for key in ["allow_internet_access", "allowInternetAccess"] {
        match other.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => {
                return Err(format!("{key}: false is not supported: {NOT_YET}"));
            }
            Some(v) => return Err(format!("{key} must be a boolean, not {v}")),
        }
    }
    let network = match other.get("network") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(format!("network must be an object, not {v}")),
    };
    for (field, v) in network {
        let unset = match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        match field.as_str() {
            "allowPublicTraffic" => match v {
                Value::Null | Value::Bool(true) => {}
                Value::Bool(false) => {
                    return Err(format!(
                        "network.allowPublicTraffic: false is not supported (no traffic access token): {NOT_YET}"
                    ))
                }
                v => return Err(format!("network.allowPublicTraffic must be a boolean, not {v}")),
            },
            "allowOut" | "denyOut" | "dnsServers" | "egressProxy" | "maskRequestHost"
            | "httpsPorts" | "rules" => {
                if !unset {
                    return Err(format!("network.{field} is not supported: {NOT_YET}"));
                }
            }
            other => return Err(format!("network.{other} is not a network option sandgate knows")),
        }
    }
    Ok(())
}

/// What an unsupported operation answers: 501 (never 404, which the SDK reads as "not found").
pub fn unsupported(what: &str, id: &str) -> Answer {
    let message = match what {
        "pause" | "resume" => format!(
            "{what} is not supported by sandgate (sandbox {id}): sandboxes are not paused; extend one with set_timeout, or create a new one"
        ),
        "snapshots" => format!("snapshots are not supported by sandgate (sandbox {id})"),
        "metrics" => format!(
            "sandbox metrics are not served by sandgate (sandbox {id}); read the pod's metrics from your cluster's monitoring"
        ),
        _ => format!("{what} is not supported by sandgate (sandbox {id})"),
    };
    Answer::error(StatusCode::NOT_IMPLEMENTED, message).with_header("should-retry", "false")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: Value) -> std::result::Result<(), String> {
        let req: NewSandbox = serde_json::from_value(body).expect("a create body");
        unsupported_options(&req).map_err(|a| format!("{a:?}"))
    }

    /// Every field the pinned SDKs (Python 2.50/2.63, JS 2.51) can send in a create body: each
    /// with what it sends by default (accepted) and, where it asks for something sandgate does
    /// not do, a value that must be refused naming the field.
    #[test]
    fn every_create_field_of_the_sdks_is_honoured_or_refused_by_name() {
        let accepted = [
            json!({"timeout": 300}),
            json!({"autoPause": false}),
            json!({"autoPauseMemory": false}),
            json!({"autoResume": null}),
            json!({"secure": true}),
            json!({"allow_internet_access": true}),
            json!({"metadata": {"a": "b"}}),
            json!({"envVars": {"A": "1"}}),
            json!({"mcp": null}),
            json!({"iam": {}}),
            json!({"volumeMounts": []}),
            json!({"network": {}}),
            json!({"network": {"allowPublicTraffic": true, "allowOut": [], "denyOut": [],
                               "dnsServers": [], "egressProxy": null, "maskRequestHost": null,
                               "httpsPorts": [], "rules": {}}}),
        ];
        for extra in accepted {
            let mut body = json!({"templateID": "base"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert_eq!(check(body.clone()), Ok(()), "{body}");
        }
        let refused = [
            (json!({"autoPause": true}), "autoPause"),
            (json!({"autoPauseMemory": true}), "autoPauseMemory"),
            (json!({"autoResume": {"enabled": true}}), "autoResume"),
            (json!({"mcp": {"x": {}}}), "mcp"),
            (json!({"iam": {"tokens": {"t": {}}}}), "iam"),
            (
                json!({"volumeMounts": [{"name": "v", "path": "/v"}]}),
                "volumeMounts",
            ),
            (
                json!({"allow_internet_access": false}),
                "allow_internet_access",
            ),
            (json!({"allowInternetAccess": false}), "allowInternetAccess"),
            (
                json!({"allow_internet_access": "no"}),
                "allow_internet_access",
            ),
            (json!({"network": "closed"}), "network"),
            (
                json!({"network": {"allowPublicTraffic": false}}),
                "network.allowPublicTraffic",
            ),
            (
                json!({"network": {"allowOut": ["10.0.0.0/8"]}}),
                "network.allowOut",
            ),
            (
                json!({"network": {"denyOut": ["0.0.0.0/0"]}}),
                "network.denyOut",
            ),
            (
                json!({"network": {"dnsServers": ["1.1.1.1"]}}),
                "network.dnsServers",
            ),
            (
                json!({"network": {"egressProxy": {"url": "http://p"}}}),
                "network.egressProxy",
            ),
            (
                json!({"network": {"maskRequestHost": "h"}}),
                "network.maskRequestHost",
            ),
            (
                json!({"network": {"httpsPorts": [443]}}),
                "network.httpsPorts",
            ),
            (json!({"network": {"rules": {"r": {}}}}), "network.rules"),
            (
                json!({"network": {"somethingNew": true}}),
                "network.somethingNew",
            ),
        ];
        for (extra, field) in refused {
            let mut body = json!({"templateID": "base"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let err = check(body.clone()).expect_err(&body.to_string());
            assert!(err.contains(field), "{body}: {err}");
            assert!(err.contains("400"), "{body}: {err}");
        }
    }
}
