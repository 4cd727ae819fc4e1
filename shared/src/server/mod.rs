//! Runtime pieces both binaries share (feature `server`): the admin HTTP server and the shutdown
//! signal. Kept behind a feature so the rest of this crate stays pure.

pub mod admin;
pub mod shutdown;

/// Sets up logging for a binary: `RUST_LOG` filtering (default `info`), text or JSON on stderr.
pub fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Reads a bearer token from a file (a mounted Secret). A missing or empty file is an error that
/// names `flag`.
pub fn read_token(path: &std::path::Path, flag: &str) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(!token.is_empty(), "{flag} {} is empty", path.display());
    Ok(token)
}
