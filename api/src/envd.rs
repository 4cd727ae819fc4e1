//! Sandboxes whose pods run `sandgate-envd` (pool annotation `sandgate.dev/e2b-envd: sandgate`):
//! at create the API hands the pod's envd the sandbox's env vars and, for a secure sandbox (the
//! SDKs' default), its access token, through envd's `/init` on the pod IP the claim's status
//! names; the token goes back to the SDK as `envdAccessToken`. The gateway never routes `/init`
//! (its `--envd-port` rule), so only the control plane can set a token.
//!
//! The token is not stored: it is an HMAC of the claim's UID and sandbox ID under the API's key
//! (`--envd-token-key-file`, shared by every replica), so `connect` gives the same token again
//! and nothing readable in the cluster holds it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kube::ResourceExt;
use sandgate_controller::crd::{SandboxClaim, SandboxPool};
use sha2::Sha256;

/// Pool annotation: which envd the pool's image runs (`sandgate` for sandgate-envd).
pub const ANN_ENVD: &str = "sandgate.dev/e2b-envd";
/// Claim annotation: the sandbox was created secure (it has an access token).
pub const ANN_SECURE: &str = "sandgate.dev/e2b-secure";
/// The envd version sandgate-envd implements (`sandgate_envd::ENVD_VERSION`; a test keeps them
/// equal).
pub const SANDGATE_ENVD_VERSION: &str = "0.6.1";

/// Whether `pool`'s pods run sandgate-envd.
pub fn runs_sandgate_envd(pool: Option<&SandboxPool>) -> bool {
    pool.and_then(|p| p.metadata.annotations.as_ref())
        .and_then(|a| a.get(ANN_ENVD))
        .is_some_and(|v| v == "sandgate")
}

/// Whether `claim` was created secure.
pub fn is_secure(claim: &SandboxClaim) -> bool {
    claim.annotations().get(ANN_SECURE).map(String::as_str) == Some("true")
}

/// Derives sandboxes' access tokens.
pub struct Tokens {
    key: Vec<u8>,
}

impl Tokens {
    /// From the key file, or (none given) a random key for this process alone, with a warning:
    /// then `connect` on another replica, or after a restart, cannot give the token back.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Tokens> {
        match file {
            Some(f) => {
                let key = std::fs::read(f)
                    .map_err(|e| anyhow::anyhow!("--envd-token-key-file {}: {e}", f.display()))?;
                let key = key.trim_ascii().to_vec();
                anyhow::ensure!(
                    key.len() >= 32,
                    "--envd-token-key-file {}: the key must be at least 32 bytes",
                    f.display()
                );
                Ok(Tokens { key })
            }
            None => {
                tracing::warn!("no --envd-token-key-file: envd access tokens are derived from a key of this process alone; connect on another replica or after a restart gives a token the sandbox refuses");
                Ok(Tokens {
                    key: rand::random::<[u8; 32]>().to_vec(),
                })
            }
        }
    }

    /// The access token of the sandbox `sandbox_id` bound by `claim`.
    pub fn token(&self, claim: &SandboxClaim, sandbox_id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(b"sandgate envd access token\n");
        mac.update(claim.uid().unwrap_or_default().as_bytes());
        mac.update(b"\n");
        mac.update(sandbox_id.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }
}

/// Calls envd's `/init` at `ip:port` until it answers 204 or `deadline` passes (the pod's
/// envd may still be starting). A refusal (401: a token is already set) is final.
pub async fn init(
    ip: IpAddr,
    port: u16,
    env_vars: &BTreeMap<String, String>,
    token: Option<&str>,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let addr = SocketAddr::new(ip, port);
    let body = serde_json::json!({"envVars": env_vars, "accessToken": token}).to_string();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut last: String;
    loop {
        let req = http::Request::post(format!("http://{addr}/init"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("valid request");
        let attempt = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await;
        match attempt {
            Ok(Ok(resp)) if resp.status().is_success() => return Ok(()),
            Ok(Ok(resp)) => {
                let status = resp.status();
                let text = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                if status == http::StatusCode::UNAUTHORIZED {
                    return Err(format!("envd at {addr} refused its init: {text}"));
                }
                last = format!("{status}: {text}");
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 2s".into(),
        }
        if tokio::time::Instant::now() + Duration::from_millis(200) > deadline {
            return Err(format!("envd at {addr} did not take its init: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(uid: &str) -> SandboxClaim {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxClaim",
            "metadata": {"name": "c", "uid": uid},
            "spec": {"poolName": "p"},
        }))
        .unwrap()
    }

    #[test]
    fn tokens_are_stable_per_sandbox_and_differ_across_sandboxes_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "k".repeat(40)).unwrap();
        let a = Tokens::load(Some(&f)).unwrap();
        let b = Tokens::load(Some(&f)).unwrap();
        let t = a.token(&claim("u1"), "sbx-1");
        assert_eq!(t, b.token(&claim("u1"), "sbx-1"), "two replicas agree");
        assert_ne!(t, a.token(&claim("u2"), "sbx-1"));
        assert_ne!(t, a.token(&claim("u1"), "sbx-2"));
        let other = Tokens::load(None).unwrap();
        assert_ne!(t, other.token(&claim("u1"), "sbx-1"));
        assert!(t.len() >= 43, "{t}");
        std::fs::write(&f, "short").unwrap();
        assert!(Tokens::load(Some(&f)).is_err());
    }
}
