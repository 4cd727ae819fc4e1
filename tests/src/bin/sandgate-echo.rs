//! The test sandbox as a program, for running the scenarios on a real cluster (the Dockerfile's
//! `echo` target): an HTTP + WebSocket echo server on every port in `ECHO_PORTS` (default 8080),
//! naming `POD_NAME` in every reply, as the API double's kubelet does in-process.

use std::net::Ipv4Addr;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = std::env::var("POD_NAME").unwrap_or_else(|_| "sandgate-echo".into());
    let ports = std::env::var("ECHO_PORTS").unwrap_or_else(|_| "8080".into());
    let mut servers = Vec::new();
    for p in ports.split(',').filter(|p| !p.trim().is_empty()) {
        let port: u16 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("ECHO_PORTS: {p:?} is not a port"))?;
        servers.push(sandgate_tests::echo::bind(Ipv4Addr::UNSPECIFIED, port, name.clone()).await?);
        eprintln!("sandgate-echo: {name} serving :{port}");
    }
    anyhow::ensure!(!servers.is_empty(), "ECHO_PORTS names no port");
    // As PID 1 in its container nothing ends it but its own handler: exit on SIGTERM as a
    // well-behaved app does, so a pod's deletion takes as long as its connections need, not the
    // whole grace period.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => eprintln!("sandgate-echo: {name} stopping on SIGTERM"),
    }
    Ok(())
}
