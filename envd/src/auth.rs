//! What `/init` hands envd at claim time (the sandbox's env vars, access token, default user and
//! workdir) and the checks it implies: once a token is set, every call but `/health` carries it
//! in `X-Access-Token`, and `/files` takes the token or a URL signed with it
//! (`v1_` + base64(sha256("path:op:user:token[:expiration]")), unpadded), compared in constant
//! time.

use std::collections::BTreeMap;
use std::sync::RwLock;

use base64::Engine;
use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Default, Clone)]
pub struct Settings {
    pub token: Option<String>,
    pub env: BTreeMap<String, String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
}

/// `POST /init`'s body (every field optional; unknown fields ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Init {
    pub env_vars: Option<BTreeMap<String, String>>,
    pub access_token: Option<String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, or the wrong one.
    Token,
    /// A signature that does not match, or has expired.
    Signature,
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn sign(path: &str, op: &str, user: &str, token: &str, expiration: Option<i64>) -> String {
    let mut raw = format!("{path}:{op}:{user}:{token}");
    if let Some(e) = expiration {
        raw.push_str(&format!(":{e}"));
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[derive(Default)]
pub struct Auth {
    settings: RwLock<Settings>,
}

impl Auth {
    pub fn new(settings: Settings) -> Self {
        Auth {
            settings: RwLock::new(settings),
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings.read().expect("settings").clone()
    }

    fn header_token(headers: &HeaderMap) -> Option<&str> {
        headers.get("x-access-token").and_then(|v| v.to_str().ok())
    }

    /// An RPC or other call: the token when one is set.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let s = self.settings.read().expect("settings");
        match (&s.token, Self::header_token(headers)) {
            (None, _) => Ok(()),
            (Some(t), Some(given)) if same(t, given) => Ok(()),
            _ => Err(Denied::Token),
        }
    }

    /// `/files`: the token, or a signature over (path, op, user[, expiration]).
    pub fn check_file(
        &self,
        headers: &HeaderMap,
        query: &BTreeMap<String, String>,
        op: &str,
        now: i64,
    ) -> Result<(), Denied> {
        let s = self.settings.read().expect("settings");
        let Some(token) = &s.token else {
            return Ok(());
        };
        if let Some(given) = Self::header_token(headers) {
            return if same(token, given) {
                Ok(())
            } else {
                Err(Denied::Token)
            };
        }
        let Some(sig) = query.get("signature") else {
            return Err(Denied::Token);
        };
        let path = query.get("path").map(String::as_str).unwrap_or("");
        let user = query.get("username").map(String::as_str).unwrap_or("");
        let expiration = match query.get("signature_expiration") {
            Some(e) => Some(e.parse::<i64>().map_err(|_| Denied::Signature)?),
            None => None,
        };
        if expiration.is_some_and(|e| e < now) {
            return Err(Denied::Signature);
        }
        if same(&sign(path, op, user, token, expiration), sig) {
            Ok(())
        } else {
            Err(Denied::Signature)
        }
    }

    /// Applies an init. Allowed while no token is set (the first init, from sandgate-api at claim
    /// time) or with the current token; a later init replaces the env vars and may rotate the
    /// token (an absent `accessToken` keeps the current one).
    pub fn init(&self, headers: &HeaderMap, init: Init) -> Result<(), Denied> {
        let mut s = self.settings.write().expect("settings");
        if let Some(current) = &s.token {
            let given = init
                .access_token
                .as_deref()
                .filter(|t| same(t, current))
                .or(Self::header_token(headers).filter(|t| same(t, current)));
            if given.is_none() {
                return Err(Denied::Token);
            }
        }
        if let Some(env) = init.env_vars {
            s.env = env;
        }
        if let Some(t) = init.access_token.filter(|t| !t.is_empty()) {
            s.token = Some(t);
        }
        if let Some(u) = init.default_user.filter(|u| !u.is_empty()) {
            s.default_user = Some(u);
        }
        if let Some(w) = init.default_workdir.filter(|w| !w.is_empty()) {
            s.default_workdir = Some(w);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert("x-access-token", t.parse().unwrap());
        }
        h
    }

    #[test]
    fn signatures_match_the_sdks() {
        // The SDK's own output for these inputs (e2b/sandbox/signature.py).
        assert_eq!(
            sign("/home/user/a b.txt", "read", "user", "tok123", None),
            "v1_GQlIcsb/LwV59+hwZmcXGPPkldguQgCHaWkaRrks0To"
        );
    }

    #[test]
    fn once_a_token_is_set_every_call_needs_it() {
        let a = Auth::default();
        assert_eq!(a.check(&headers(None)), Ok(()));
        a.init(
            &headers(None),
            Init {
                access_token: Some("t1".into()),
                env_vars: Some([("A".to_string(), "1".to_string())].into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(a.check(&headers(None)), Err(Denied::Token));
        assert_eq!(a.check(&headers(Some("t2"))), Err(Denied::Token));
        assert_eq!(a.check(&headers(Some("t1"))), Ok(()));
        // A second init without the token is refused and changes nothing.
        let hijack = Init {
            access_token: Some("evil".into()),
            ..Default::default()
        };
        assert_eq!(a.init(&headers(None), hijack), Err(Denied::Token));
        assert_eq!(a.settings().token.as_deref(), Some("t1"));
        assert_eq!(a.settings().env["A"], "1");
        // With it, the token rotates.
        let rotate = Init {
            access_token: Some("t2".into()),
            ..Default::default()
        };
        a.init(&headers(Some("t1")), rotate).unwrap();
        assert_eq!(a.check(&headers(Some("t2"))), Ok(()));
    }

    #[test]
    fn files_take_the_token_or_a_fresh_signature() {
        let a = Auth::new(Settings {
            token: Some("tok".into()),
            ..Default::default()
        });
        let q = |sig: &str, exp: Option<i64>| {
            let mut q = BTreeMap::new();
            q.insert("path".to_string(), "/f".to_string());
            q.insert("signature".to_string(), sig.to_string());
            if let Some(e) = exp {
                q.insert("signature_expiration".to_string(), e.to_string());
            }
            q
        };
        let good = sign("/f", "read", "", "tok", None);
        assert_eq!(
            a.check_file(&headers(None), &q(&good, None), "read", 0),
            Ok(())
        );
        assert_eq!(
            a.check_file(&headers(None), &q(&good, None), "write", 0),
            Err(Denied::Signature),
            "a read signature does not write"
        );
        let timed = sign("/f", "read", "", "tok", Some(100));
        assert_eq!(
            a.check_file(&headers(None), &q(&timed, Some(100)), "read", 50),
            Ok(())
        );
        assert_eq!(
            a.check_file(&headers(None), &q(&timed, Some(100)), "read", 101),
            Err(Denied::Signature)
        );
        assert_eq!(
            a.check_file(&headers(None), &BTreeMap::new(), "read", 0),
            Err(Denied::Token)
        );
        assert_eq!(
            a.check_file(&headers(Some("tok")), &BTreeMap::new(), "read", 0),
            Ok(())
        );
    }
}
