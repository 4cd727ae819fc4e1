//! The pod contract: which labels and annotations sandgate reads and writes on sandbox pods.
//!
//! The prefix is configurable so sandgate can run on pods labelled by another pool manager.

use std::fmt;
use std::str::FromStr;

/// Default prefix of every contract key.
pub const DEFAULT_PREFIX: &str = "sandgate.dev/";

/// Lifecycle phase of a pool pod, stored in the `phase` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Idle,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Idle,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `phase` label value that is not one of the contract's phases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown phase {0:?} (expected idle, starting, running, stopping or failed)")]
pub struct UnknownPhase(pub String);

impl FromStr for Phase {
    type Err = UnknownPhase;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPhase(s.to_string()))
    }
}

/// The fully-qualified contract keys for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    pub prefix: String,
    pub label_pool: String,
    pub label_phase: String,
    pub label_sandbox_id: String,
    pub ann_idle_timeout: String,
    pub ann_last_active: String,
    pub ann_claimed_at: String,
    pub ann_port: String,
    /// Ports the sandbox serves as HTTP/2 cleartext (comma-separated), beside named ones.
    pub ann_h2c_ports: String,
    pub ann_stop_reason: String,
    pub ann_stopped_at: String,
}

/// A label prefix that Kubernetes would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid label prefix {0:?}: expected a DNS subdomain followed by '/', e.g. \"sandgate.dev/\""
)]
pub struct InvalidPrefix(pub String);

impl Contract {
    /// Builds the keys for `prefix`, which must be a DNS subdomain followed by `/`.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let domain = prefix
            .strip_suffix('/')
            .ok_or_else(|| InvalidPrefix(prefix.to_string()))?;
        let valid = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !valid {
            return Err(InvalidPrefix(prefix.to_string()));
        }
        let k = |s: &str| format!("{prefix}{s}");
        Ok(Contract {
            prefix: prefix.to_string(),
            label_pool: k("pool"),
            label_phase: k("phase"),
            label_sandbox_id: k("sandbox-id"),
            ann_idle_timeout: k("idle-timeout"),
            ann_last_active: k("last-active"),
            ann_claimed_at: k("claimed-at"),
            ann_port: k("port"),
            ann_h2c_ports: k("h2c-ports"),
            ann_stop_reason: k("stop-reason"),
            ann_stopped_at: k("stopped-at"),
        })
    }
}

impl Default for Contract {
    fn default() -> Self {
        Contract::new(DEFAULT_PREFIX).expect("default prefix is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
        assert!("Running".parse::<Phase>().is_err());
    }

    #[test]
    fn prefix_builds_keys() {
        let c = Contract::new("agents.example.com/").unwrap();
        assert_eq!(c.label_sandbox_id, "agents.example.com/sandbox-id");
        assert_eq!(c.ann_last_active, "agents.example.com/last-active");
        assert_eq!(Contract::default().label_phase, "sandgate.dev/phase");
    }

    #[test]
    fn bad_prefixes_are_rejected() {
        for p in [
            "sandgate.dev",
            "/",
            "Sandgate.dev/",
            "-a.dev/",
            "a..b/",
            "a b/",
        ] {
            assert!(Contract::new(p).is_err(), "{p} should be rejected");
        }
    }
}
