//! The custom resources: `SandboxPool` (a warm pool) and `SandboxClaim` (a request for one sandbox
//! from it). Group `sandgate.dev`, version `v1alpha1`. `crdgen` writes their YAML to deploy/crds/.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of warm, idle sandbox pods.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "sandgate.dev",
    version = "v1alpha1",
    kind = "SandboxPool",
    namespaced,
    status = "SandboxPoolStatus",
    shortname = "sbp",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Claimed","type":"integer","jsonPath":".status.claimed"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolSpec {
    /// Pod template of the sandboxes. The contract's labels are added by the controller.
    #[schemars(schema_with = "preserve_unknown")]
    pub template: PodTemplateSpec,
    /// Warm idle pods to keep. Claimed pods do not count.
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Idle timeout of sandboxes claimed from this pool, unless the claim sets one (e.g. `15m`,
    /// `never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_idle_timeout: Option<String>,
    /// Idle pods older than this are replaced (e.g. `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pod_age: Option<String>,
    /// Finished (Released or Failed) claims of this pool are deleted this long after their
    /// sandbox stopped, unless a claim sets its own `ttlSecondsAfterFinished`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub claim_ttl_seconds_after_finished: Option<i64>,
    /// The sandbox's default port (written as the pods' `port` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolStatus {
    /// Pods by phase (idle, starting, running, stopping, failed).
    #[serde(default)]
    pub replicas: std::collections::BTreeMap<String, i32>,
    /// Idle, Ready pods ready to be claimed.
    #[serde(default)]
    pub available: i32,
    /// Pods claimed by a sandbox.
    #[serde(default)]
    pub claimed: i32,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserve_unknown_list")]
    pub conditions: Vec<Condition>,
}

/// A request for one sandbox from a pool.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "sandgate.dev",
    version = "v1alpha1",
    kind = "SandboxClaim",
    namespaced,
    status = "SandboxClaimStatus",
    shortname = "sbc",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Sandbox","type":"string","jsonPath":".status.sandboxID"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url","priority":1}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.expiresAt","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimSpec {
    pub pool_name: String,
    /// Overrides the pool's default idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Absolute lifetime counted from the claim's creation (e.g. `300s`, `2h`): at
    /// `creationTimestamp + timeout` the sandbox is released with stop reason `Timeout`, busy or
    /// not (E2B's timeout). The idle timeout still applies, so an idle sandbox goes earlier.
    /// Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Deleted this long after its sandbox stopped (Released or Failed); else the pool's
    /// `claimTtlSecondsAfterFinished`; else kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Added to the claimed pod.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Added to the claimed pod.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq, Eq)]
pub enum ClaimPhase {
    #[default]
    Pending,
    Bound,
    Released,
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimStatus {
    #[serde(default)]
    pub phase: ClaimPhase,
    #[serde(default, rename = "sandboxID", skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The pod's IP when it was bound (what sandgate-api reaches the pod's envd at).
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// The host-form address, e.g. `<id>.sandbox.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserve_unknown_list")]
    pub conditions: Vec<Condition>,
    /// When the sandbox is released whatever its activity (`creationTimestamp + spec.timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub expires_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When the claim was bound to its pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time")]
    pub bound_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Why and when a Released or Failed claim's sandbox stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopRecord>,
}

/// How a sandbox ended.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StopRecord {
    /// `IdleTimeout`, `Timeout`, `ClaimDeleted`, `PodGone`, …
    pub reason: String,
    #[schemars(schema_with = "date_time")]
    pub stopped_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The exit code of a container that ended the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The images the pod ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// When the sandbox was last used, as the controller recorded it (idle releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active: Option<String>,
}

impl SandboxClaim {
    /// `creationTimestamp + spec.timeout`; `None` without a timeout. An unparseable timeout is
    /// refused earlier (`validate::check_claim`).
    pub fn expires_at(&self) -> Option<jiff::Timestamp> {
        let created = self.metadata.creation_timestamp.as_ref()?.0;
        let timeout =
            sandgate_shared::duration::parse_duration(self.spec.timeout.as_deref()?).ok()?;
        let span = jiff::SignedDuration::try_from(timeout).ok()?;
        created.checked_add(span).ok()
    }
}

fn date_time(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "format": "date-time"})
}

fn preserve_unknown(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn preserve_unknown_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}})
}

/// The CRDs as YAML documents, in the order crdgen writes them.
pub fn crds() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    vec![
        (
            "sandboxpools.yaml",
            serde_yaml::to_string(&SandboxPool::crd()).expect("CRD serializes"),
        ),
        (
            "sandboxclaims.yaml",
            serde_yaml::to_string(&SandboxClaim::crd()).expect("CRD serializes"),
        ),
    ]
}
