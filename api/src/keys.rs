//! API keys: shaped `e2b_` + 40 lowercase hex (older SDKs refused other shapes), kept in
//! Kubernetes Secrets as a SHA-256 only, each belonging to a team.
//!
//! A key Secret (in the API's namespace) carries the label `sandgate.dev/e2b-api-key: "true"` and
//! the data `sha256` (hex of the key's SHA-256) and `team`; an optional `max-sandboxes` caps the
//! team's concurrent sandboxes below `--team-max-sandboxes`. `sandgate-api keygen --team <t>`
//! prints a new key once and the Secret to apply. Lookups compare hashes in constant time.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The label that marks key Secrets.
pub const SECRET_LABEL: &str = "sandgate.dev/e2b-api-key";

/// One key's owner, as read from its Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub name: String,
    /// The team's own cap on concurrent sandboxes, if its Secret sets one.
    pub max_sandboxes: Option<u32>,
}

/// Whether `key` has the shape every SDK accepts.
pub fn well_formed(key: &str) -> bool {
    key.strip_prefix("e2b_").is_some_and(|hex| {
        hex.len() == 40
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Lowercase hex SHA-256 of a key.
pub fn hash(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new key from the thread's CSPRNG (160 bits).
pub fn generate() -> String {
    let bytes: [u8; 20] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("e2b_{hex}")
}

/// Why a key Secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSecret {
    #[error("data.sha256 is missing or not 64 lowercase hex")]
    Hash,
    #[error("data.team is missing or not a valid label value")]
    Team,
    #[error("data.max-sandboxes is not a positive integer")]
    Limit,
}

/// Reads a key Secret's decoded data: (hash, team).
pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<(String, Team), BadSecret> {
    let text = |k: &str| {
        data.get(k)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    let hash = text("sha256")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or(BadSecret::Hash)?;
    let name = text("team")
        .filter(|t| !t.is_empty() && sandgate_shared::meta::check_label_value("team", t).is_ok())
        .ok_or(BadSecret::Team)?;
    let max_sandboxes = match text("max-sandboxes") {
        None => None,
        Some(v) => Some(
            v.parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(BadSecret::Limit)?,
        ),
    };
    Ok((
        hash.to_string(),
        Team {
            name: name.to_string(),
            max_sandboxes,
        },
    ))
}

/// The keys the API knows: hash → team. Rebuilt from the Secrets watch.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: Vec<(String, Team)>,
}

impl KeyRing {
    pub fn new(keys: impl IntoIterator<Item = (String, Team)>) -> Self {
        KeyRing {
            keys: keys.into_iter().collect(),
        }
    }

    /// The team owning `key`, comparing hashes in constant time.
    pub fn team(&self, key: &str) -> Option<&Team> {
        if !well_formed(key) {
            return None;
        }
        let h = hash(key);
        let mut found = None;
        for (k, team) in &self.keys {
            if bool::from(k.as_bytes().ct_eq(h.as_bytes())) {
                found = Some(team);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// `sandgate-api keygen`: a new key, and the Secret that holds only its hash.
#[derive(Debug, Clone, clap::Args)]
pub struct Keygen {
    /// The team the key belongs to (a label value).
    #[arg(long)]
    pub team: String,
    /// Namespace of the Secret (the API's `--namespace`).
    #[arg(long, default_value = "sandgate-system")]
    pub namespace: String,
    /// Caps this team's concurrent sandboxes.
    #[arg(long)]
    pub max_sandboxes: Option<u32>,
}

pub fn keygen(k: &Keygen) -> anyhow::Result<()> {
    sandgate_shared::meta::check_label_value("--team", &k.team)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(!k.team.is_empty(), "--team must not be empty");
    let key = generate();
    eprintln!(
        "API key for team {} (shown once; store it now):\n{key}\n",
        k.team
    );
    println!(
        "{}",
        secret_yaml(&k.team, &k.namespace, &hash(&key), k.max_sandboxes)
    );
    Ok(())
}

/// The Secret holding a key's hash, as YAML.
pub fn secret_yaml(team: &str, namespace: &str, hash: &str, max: Option<u32>) -> String {
    let name = format!("e2b-key-{team}-{}", &hash[..8]);
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {SECRET_LABEL}: \"true\"\nstringData:\n  team: {team}\n  sha256: {hash}\n"
    );
    if let Some(m) = max {
        out.push_str(&format!("  max-sandboxes: \"{m}\"\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_shape_every_sdk_accepts() {
        let k = generate();
        assert!(well_formed(&k), "{k}");
        assert_ne!(generate(), k);
        for bad in [
            "",
            "e2b_",
            "E2B_0123456789abcdef0123456789abcdef01234567",
            "e2b_0123456789ABCDEF0123456789abcdef01234567",
            "e2b_0123456789abcdef0123456789abcdef0123456",
            "e2b_0123456789abcdef0123456789abcdef012345678",
            "sk_0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn only_the_hash_is_stored_and_it_finds_the_team() {
        let key = generate();
        let data: BTreeMap<String, Vec<u8>> = [
            ("sha256".to_string(), hash(&key).into_bytes()),
            ("team".to_string(), b"alpha".to_vec()),
        ]
        .into();
        let (h, team) = from_secret_data(&data).unwrap();
        assert!(!h.contains(&key[4..]));
        let ring = KeyRing::new([(h, team)]);
        assert_eq!(ring.team(&key).map(|t| t.name.as_str()), Some("alpha"));
        assert_eq!(ring.team(&generate()), None);
        assert_eq!(ring.team("not-a-key"), None);
    }

    #[test]
    fn malformed_secrets_are_refused_with_a_reason() {
        let base = |k: &str, v: &str| -> BTreeMap<String, Vec<u8>> {
            let mut d: BTreeMap<String, Vec<u8>> = [
                ("sha256".to_string(), "a".repeat(64).into_bytes()),
                ("team".to_string(), b"t".to_vec()),
            ]
            .into();
            d.insert(k.into(), v.as_bytes().to_vec());
            d
        };
        assert_eq!(
            from_secret_data(&base("sha256", "xyz")),
            Err(BadSecret::Hash)
        );
        assert_eq!(
            from_secret_data(&base("team", "not a label")),
            Err(BadSecret::Team)
        );
        assert_eq!(
            from_secret_data(&base("max-sandboxes", "0")),
            Err(BadSecret::Limit)
        );
        assert_eq!(
            from_secret_data(&base("max-sandboxes", "5"))
                .unwrap()
                .1
                .max_sandboxes,
            Some(5)
        );
    }
}
