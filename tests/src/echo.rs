//! The sandbox stand-in: an HTTP + WebSocket echo server. Every reply names the pod that served
//! it, so tests can tell which pod a request reached.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};
use tokio_tungstenite::WebSocketStream;

/// A serving echo server. Dropping it stops it as a container's exit would: the port closes and
/// every open connection, upgraded WebSockets included, is cut.
pub struct Server {
    accept: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = self.stop.send(true);
    }
}

/// The real `sandgate-envd` binary serving `ip:port` (a pod whose image runs it), killed when
/// the server is dropped. Fails if it cannot listen there.
pub async fn envd(ip: impl Into<IpAddr>, port: u16) -> std::io::Result<Server> {
    let addr = std::net::SocketAddr::new(ip.into(), port);
    let mut child = tokio::process::Command::new(crate::procs::bin_path("sandgate-envd"))
        .arg("--listen")
        .arg(addr.to_string())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "sandgate-envd on {addr} exited: {status}"
            )));
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "sandgate-envd does not listen on {addr}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (stop, _) = watch::channel(false);
    // Aborting the task drops the child, which kills it.
    let accept = tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(Server { accept, stop })
}

/// Which HTTP versions a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 with prior knowledge, as the pods of the loopback kubelet.
    Auto,
    /// HTTP/1.1 only (WebSocket upgrades included), as Python's http.server or Node's http: an
    /// HTTP/2 preface is a protocol error.
    Http1,
    /// HTTP/2 cleartext only, as a gRPC server.
    H2c,
}

/// Binds `ip:port` and serves until the returned [`Server`] is dropped.
pub async fn bind(ip: impl Into<IpAddr>, port: u16, name: String) -> std::io::Result<Server> {
    bind_speaking(ip, port, name, Protocol::Auto).await
}

/// [`bind`], speaking only `protocol`.
pub async fn bind_speaking(
    ip: impl Into<IpAddr>,
    port: u16,
    name: String,
    protocol: Protocol,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(SocketAddr::new(ip.into(), port)).await?;
    let (stop, stopped) = watch::channel(false);
    let accept = tokio::spawn(serve_until(
        listener,
        name,
        Arc::new(AtomicUsize::new(0)),
        stopped,
        protocol,
    ));
    Ok(Server { accept, stop })
}

/// Serves on a bound listener, counting every request in `hits`, for as long as the task runs.
pub async fn serve(listener: TcpListener, name: String, hits: Arc<AtomicUsize>) {
    let (_stop, stopped) = watch::channel(false);
    serve_until(listener, name, hits, stopped, Protocol::Auto).await
}

async fn serve_until(
    listener: TcpListener,
    name: String,
    hits: Arc<AtomicUsize>,
    stopped: watch::Receiver<bool>,
    protocol: Protocol,
) {
    let name: Arc<str> = name.into();
    let local = listener.local_addr().ok();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, hits, mut stop) = (name.clone(), hits.clone(), stopped.clone());
        let ws_stop = stopped.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                hits.fetch_add(1, Ordering::SeqCst);
                let (name, stop) = (name.clone(), ws_stop.clone());
                async move {
                    // `/slow/<ms>` answers after that long: an in-flight request for tests.
                    let delay = req
                        .uri()
                        .path()
                        .strip_prefix("/slow/")
                        .and_then(|ms| ms.parse::<u64>().ok());
                    if let Some(ms) = delay {
                        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
                    }
                    // `/stream/<ms>` answers at once, then stays silent that long before its one
                    // event (a quiet SSE stream or long poll).
                    let silent = req
                        .uri()
                        .path()
                        .strip_prefix("/stream/")
                        .and_then(|ms| ms.parse::<u64>().ok());
                    if let Some(ms) = silent {
                        return Ok::<_, Infallible>(event_after(&name, ms.min(60_000)));
                    }
                    Ok::<_, Infallible>(respond(&name, local, stop, req).map(|b| b.boxed()))
                }
            });
            let io = TokioIo::new(stream);
            let conn: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                match protocol {
                    Protocol::Auto => Box::pin(async move {
                        let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        let _ = b.serve_connection_with_upgrades(io, svc).await;
                    }),
                    Protocol::Http1 => Box::pin(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await;
                    }),
                    Protocol::H2c => Box::pin(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    }),
                };
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

/// A `text/event-stream` answer whose one event comes after `ms`.
fn event_after(name: &Arc<str>, ms: u64) -> Response<BoxBody<Bytes, Infallible>> {
    let event = Bytes::from(format!("data: {name}\n\n"));
    let frames = futures::stream::once(async move {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Ok::<_, Infallible>(hyper::body::Frame::data(event))
    });
    Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap_or_default()
}

fn respond(
    name: &Arc<str>,
    local: Option<SocketAddr>,
    mut stop: watch::Receiver<bool>,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let is_ws = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_ws {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return Response::builder()
                .status(400)
                .body(Full::new(Bytes::from("no key")))
                .unwrap_or_default();
        };
        let name = name.clone();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            loop {
                let msg = tokio::select! {
                    m = ws.next() => m,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Some(Ok(msg)) = msg else { break };
                let reply = match msg {
                    Message::Text(t) => Message::text(format!("{name}:{t}")),
                    Message::Binary(b) => Message::Binary(b),
                    Message::Ping(p) => Message::Pong(p),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    let body = json!({
        "pod": name.as_ref(),
        "version": format!("{:?}", req.version()),
        "addr": local.map(|a| a.to_string()),
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
    });
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}
