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
