//! `make bench-streams`: latency to other sandboxes while thousands of WebSockets are open.
//!
//! A real Envoy and sandgate-extproc in front of the API double and the loopback kubelet: 21
//! sandboxes; `--streams` WebSockets spread over the first 20 are opened and kept open (each
//! echoes once), then `--requests` plain requests go to the 21st, one after another, and their
//! latency is measured; the same requests are measured before the streams open, for comparison.
//!
//! The last line is `RESULT streams open=<n> errors=<e> other_sandbox_ms=<p99 with n open>`.

use std::time::Instant;

use clap::Parser;
use futures::{SinkExt, StreamExt};
use sandgate_tests::procs::get;
use sandgate_tests::stack::Stack;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// WebSockets held open during the measurement.
    #[arg(long, default_value_t = 1200)]
    streams: usize,
    /// Sandboxes the streams are spread over.
    #[arg(long, default_value_t = 20)]
    sandboxes: usize,
    /// Requests measured to the other sandbox.
    #[arg(long, default_value_t = 500)]
    requests: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = Stack::start().await;
    for i in 0..=args.sandboxes {
        s.sandbox(&format!("pod-{i}"), &format!("sbx-{i}"), 8080)
            .await;
    }
    let other = format!("8080-sbx-{}.sandbox.localhost", args.sandboxes);
    let before = latencies(&s, &other, args.requests).await?;
    let envoy = s.envoy_addr();
    let mut open = Vec::with_capacity(args.streams);
    let mut errors = 0;
    let started = Instant::now();
    for batch in (0..args.streams).collect::<Vec<_>>().chunks(50) {
        let opened = futures::future::join_all(batch.iter().map(|k| {
            let host = format!("8080-sbx-{}.sandbox.localhost", k % args.sandboxes);
            async move {
                let url = format!("ws://{envoy}/socket");
                let mut req =
                    tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                        url,
                    )?;
                req.headers_mut().insert("host", host.parse()?);
                let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
                ws.send(Message::text("hi")).await?;
                ws.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
                anyhow::Ok(ws)
            }
        }))
        .await;
        for ws in opened {
            match ws {
                Ok(ws) => open.push(ws),
                Err(e) => {
                    errors += 1;
                    eprintln!("stream failed: {e}");
                }
            }
        }
    }
    eprintln!(
        "{} streams open over {} sandboxes in {:.1} s",
        open.len(),
        args.sandboxes,
        started.elapsed().as_secs_f64()
    );
    let during = latencies(&s, &other, args.requests).await?;
    let p = |v: &[f64], q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "other sandbox, {} requests: before p50 {:.2} ms p99 {:.2} ms; with {} streams open p50 {:.2} ms p99 {:.2} ms",
        args.requests,
        p(&before, 0.5),
        p(&before, 0.99),
        open.len(),
        p(&during, 0.5),
        p(&during, 0.99)
    );
    println!(
        "RESULT streams open={} errors={errors} other_sandbox_ms={:.2}",
        open.len(),
        p(&during, 0.99)
    );
    drop(open);
    Ok(())
}

/// Sorted latencies in ms of `n` sequential GETs; any non-200 is an error.
async fn latencies(s: &Stack, host: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = get(s.envoy_addr(), host, "/", &[]).await?;
        anyhow::ensure!(r.status == 200, "{host}: {} {}", r.status, r.body);
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}
