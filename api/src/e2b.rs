//! The E2B API's wire shapes and the pure mapping between them and SandboxClaims / SandboxPools.
//! Field names and which of them are required follow what the E2B SDK parses (Python 2.50–2.63,
//! JS 2.51): a missing required field crashes the SDK, so every one is always sent. No I/O.

use std::collections::BTreeMap;

use sandgate_controller::crd::{ClaimPhase, SandboxClaim, SandboxPool};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Claim label naming the team that owns the sandbox.
pub const LABEL_TEAM: &str = "sandgate.dev/team";
/// Claim label marking claims made by this API.
pub const LABEL_CREATED_BY: &str = "app.kubernetes.io/created-by";
/// Claim annotation holding the sandbox's E2B metadata (a JSON object of strings).
pub const ANN_METADATA: &str = "sandgate.dev/e2b-metadata";
/// Claim annotation holding the templateID the sandbox was created from.
pub const ANN_TEMPLATE: &str = "sandgate.dev/e2b-template";
/// Pool annotation: other template names (comma-separated) that select this pool.
pub const ANN_ALIASES: &str = "sandgate.dev/e2b-aliases";
/// Pool annotation: the envd version its image runs (default [`DEFAULT_ENVD_VERSION`]).
pub const ANN_ENVD_VERSION: &str = "sandgate.dev/e2b-envd-version";
/// Pool annotation: `"false"` refuses `envVars` with a 400.
pub const ANN_ENV_VARS: &str = "sandgate.dev/e2b-env-vars";
/// Pod annotation (through the claim) carrying `envVars` as a JSON object, for the sandbox to read
/// with the downward API.
pub const POD_ANN_ENV_VARS: &str = "e2b.sandgate.dev/env-vars";
/// The envd version reported when the pool names none. The SDK refuses anything below 0.1.0.
pub const DEFAULT_ENVD_VERSION: &str = "0.2.0";

/// `POST /sandboxes` and `POST /v2/sandboxes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds of lifetime from now.
    pub timeout: Option<i64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    pub auto_pause: Option<bool>,
    pub auto_resume: Option<Value>,
    pub secure: Option<bool>,
    pub mcp: Option<Value>,
    pub volume_mounts: Option<Value>,
    /// Everything else the SDK may send (`allow_internet_access`, `network`, `iam`, …): each
    /// network control is honoured or refused by name (`handlers::network_options`).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `POST /sandboxes/{id}/connect` and `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Timeout {
    pub timeout: Option<i64>,
}

/// What create and connect answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    /// Sandboxes whose envd checks a token (secure sandboxes of sandgate-envd pools).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// What get_info and list answer (`lifecycle` and `domain` only in get_info).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub sandbox: Sandbox,
    pub started_at: String,
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: &'static str,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Value>,
}

/// `{code, message}`: the only error body the SDK parses.
pub fn error_body(code: u16, message: &str) -> Value {
    serde_json::json!({"code": code, "message": message})
}

/// Finds the pool a `templateID` names: a pool of that name, or one listing it in its aliases.
pub fn find_pool<'a>(
    pools: &'a [std::sync::Arc<SandboxPool>],
    template: &str,
) -> Option<&'a SandboxPool> {
    let by_name = pools
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(template));
    by_name
        .or_else(|| {
            pools.iter().find(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANN_ALIASES))
                    .is_some_and(|a| a.split(',').any(|x| x.trim() == template))
            })
        })
        .map(|p| p.as_ref())
}

/// A claim's E2B metadata.
pub fn metadata(claim: &SandboxClaim) -> BTreeMap<String, String> {
    claim
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_METADATA))
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default()
}

/// Whether the claim belongs to `team`.
pub fn owned_by(claim: &SandboxClaim, team: &str) -> bool {
    claim
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_TEAM))
        .is_some_and(|t| t == team)
}

/// Whether the claim's sandbox runs (or is about to): counted against the team's limit.
pub fn is_live(claim: &SandboxClaim) -> bool {
    claim.metadata.deletion_timestamp.is_none()
        && !matches!(
            claim.status.as_ref().map(|s| &s.phase),
            Some(ClaimPhase::Released | ClaimPhase::Failed)
        )
}

/// Whether the claim's sandbox runs now: Bound, not being deleted, and not past its expiry
/// (the controller's release may still be on its way).
pub fn is_running(claim: &SandboxClaim) -> bool {
    claim.metadata.deletion_timestamp.is_none()
        && claim.status.as_ref().map(|s| &s.phase) == Some(&ClaimPhase::Bound)
        && claim
            .expires_at()
            .is_none_or(|e| e > jiff::Timestamp::now())
}

/// The sandbox ID of a bound claim.
pub fn sandbox_id(claim: &SandboxClaim) -> Option<&str> {
    claim.status.as_ref()?.sandbox_id.as_deref()
}

/// A running claim as create and connect answer it.
pub fn sandbox(claim: &SandboxClaim, pool: Option<&SandboxPool>, domain: Option<&str>) -> Sandbox {
    let template = claim
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_TEMPLATE))
        .cloned()
        .unwrap_or_else(|| claim.spec.pool_name.clone());
    let envd = pool
        .and_then(|p| p.metadata.annotations.as_ref())
        .and_then(|a| a.get(ANN_ENVD_VERSION))
        .cloned()
        .unwrap_or_else(|| {
            if crate::envd::runs_sandgate_envd(pool) {
                crate::envd::SANDGATE_ENVD_VERSION.into()
            } else {
                DEFAULT_ENVD_VERSION.into()
            }
        });
    Sandbox {
        alias: (template != claim.spec.pool_name).then(|| template.clone()),
        template_id: claim.spec.pool_name.clone(),
        sandbox_id: sandbox_id(claim).unwrap_or_default().to_string(),
        client_id: "sandgate".into(),
        envd_version: envd,
        envd_access_token: None,
        domain: domain.map(str::to_string),
    }
}

/// A running claim as get_info (`detail`) and list answer it.
pub fn detail(
    claim: &SandboxClaim,
    pool: Option<&SandboxPool>,
    domain: Option<&str>,
    detail: bool,
) -> SandboxDetail {
    let started = claim
        .status
        .as_ref()
        .and_then(|s| s.bound_at.as_ref())
        .or(claim.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let end = claim.expires_at().unwrap_or(started);
    let (cpu, mem, disk) = pool.map(resources).unwrap_or((1, 512, 0));
    SandboxDetail {
        sandbox: sandbox(claim, pool, domain),
        started_at: started.to_string(),
        end_at: end.to_string(),
        cpu_count: cpu,
        memory_mb: mem,
        disk_size_mb: disk,
        state: "running",
        metadata: metadata(claim),
        lifecycle: detail.then(|| serde_json::json!({"autoResume": false, "onTimeout": "kill"})),
    }
}

/// CPUs, memory MB and disk MB of the pool's pod: the containers' limits, else requests
/// (defaults 1 CPU, 512 MB, 0).
pub fn resources(pool: &SandboxPool) -> (u32, u64, u64) {
    let mut cpu_milli = 0u64;
    let mut mem = 0u64;
    let mut disk = 0u64;
    for c in pool
        .spec
        .template
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
    {
        let r = c.resources.clone().unwrap_or_default();
        let pick = |k: &str| {
            r.limits
                .as_ref()
                .and_then(|l| l.get(k))
                .or_else(|| r.requests.as_ref().and_then(|q| q.get(k)))
                .map(|q| q.0.clone())
        };
        cpu_milli += pick("cpu").and_then(|q| cpu_millis(&q)).unwrap_or(0);
        mem += pick("memory").and_then(|q| bytes(&q)).unwrap_or(0) / 1_000_000;
        disk += pick("ephemeral-storage")
            .and_then(|q| bytes(&q))
            .unwrap_or(0)
            / 1_000_000;
    }
    let cpus = cpu_milli.div_ceil(1000).max(1) as u32;
    (cpus, if mem == 0 { 512 } else { mem }, disk)
}

fn cpu_millis(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as u64),
    }
}

/// A Kubernetes quantity in bytes (`512Mi`, `1Gi`, `1G`, `1000`).
fn bytes(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    SUFFIXES.iter().find_map(|(s, mult)| {
        let n = q.strip_suffix(s)?;
        n.parse::<f64>().ok().map(|v| (v * *mult as f64) as u64)
    })
}

/// The list endpoint's `metadata` filter: the SDK percent-encodes each key and value and then
/// the whole `k=v&…` string, so after the query's own decoding each pair is decoded once more.
pub fn metadata_filter(raw: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (percent_decode(&k), percent_decode(&v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a claim's metadata has every pair of `filter`.
pub fn matches(metadata: &BTreeMap<String, String>, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| metadata.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(name: &str, annotations: Value, resources: Value) -> std::sync::Arc<SandboxPool> {
        std::sync::Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPool",
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"replicas": 1, "template": {"spec": {"containers": [
                    {"name": "c", "image": "i", "resources": resources}]}}},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn templates_are_pools_by_name_or_alias() {
        let pools = vec![
            pool(
                "python",
                json!({ANN_ALIASES: "base, code-interpreter"}),
                json!({}),
            ),
            pool("base", json!({}), json!({})),
        ];
        let name = |t: &str| find_pool(&pools, t).and_then(|p| p.metadata.name.clone());
        assert_eq!(
            name("base").as_deref(),
            Some("base"),
            "a pool's own name wins"
        );
        assert_eq!(name("code-interpreter").as_deref(), Some("python"));
        assert_eq!(name("python").as_deref(), Some("python"));
        assert_eq!(name("nope"), None);
    }

    #[test]
    fn resources_come_from_the_template() {
        let p = pool(
            "p",
            json!({}),
            json!({"limits": {"cpu": "1500m", "memory": "1Gi"}, "requests": {"ephemeral-storage": "2G"}}),
        );
        assert_eq!(resources(&p), (2, 1073, 2000));
        assert_eq!(resources(&pool("q", json!({}), json!({}))), (1, 512, 0));
    }

    #[test]
    fn the_sdks_double_encoded_metadata_filter_decodes() {
        // `{"k y": "v&1", "a": "b"}` as the SDK sends it, after the query string's own decoding.
        let f = metadata_filter("k%2520y=v%25261&a=b");
        assert_eq!(
            f,
            BTreeMap::from([("a".into(), "b".into()), ("k y".into(), "v&1".into())])
        );
        let m = BTreeMap::from([
            ("a".to_string(), "b".to_string()),
            ("k y".to_string(), "v&1".to_string()),
            ("other".to_string(), "x".to_string()),
        ]);
        assert!(matches(&m, &f));
        assert!(!matches(&BTreeMap::new(), &f));
    }

    #[test]
    fn every_required_field_is_sent() {
        let claim: SandboxClaim = serde_json::from_value(json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
            "metadata": {"name": "c", "creationTimestamp": "2026-12-01T10:00:00Z",
                         "annotations": {ANN_TEMPLATE: "code-interpreter", ANN_METADATA: "{\"run\":\"7\"}"}},
            "spec": {"poolName": "python", "timeout": "300s"},
            "status": {"phase": "Bound", "sandboxID": "sbx-abc"},
        }))
        .unwrap();
        let p = pool("python", json!({ANN_ENVD_VERSION: "0.3.1"}), json!({}));
        let d = serde_json::to_value(detail(&claim, Some(&p), Some("sandbox.example.com"), true))
            .unwrap();
        for k in [
            "templateID",
            "sandboxID",
            "clientID",
            "envdVersion",
            "startedAt",
            "endAt",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "state",
        ] {
            assert!(d.get(k).is_some_and(|v| !v.is_null()), "{k} missing: {d}");
        }
        assert_eq!(d["endAt"], "2026-12-01T10:05:00Z");
        assert_eq!(d["envdVersion"], "0.3.1");
        assert_eq!(d["alias"], "code-interpreter");
        assert_eq!(d["metadata"], json!({"run": "7"}));
        assert_eq!(
            d["lifecycle"],
            json!({"autoResume": false, "onTimeout": "kill"})
        );
        let s = serde_json::to_value(sandbox(&claim, None, None)).unwrap();
        assert_eq!(s["envdVersion"], DEFAULT_ENVD_VERSION);
        assert!(s["domain"].is_null() && s.get("domain").is_some());
    }
}
