//! Starting real sandgate binaries, and the small helpers process-level tests share:
//! ephemeral ports, eventual assertions with deadlines, and an HTTP client.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::process::{Child, Command};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A workspace binary built by `cargo build` (the Makefile builds them before tests run).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A free port on 127.0.0.1, held for this test process.
///
/// Tests run as parallel processes, and a port is only reserved once its owner binds it. Two
/// things could take it in that gap: another test process, and any outgoing connection (which
/// takes ports from the kernel's ephemeral range). So ports come from below the ephemeral range,
/// and each is claimed with a file lock that other test processes respect and that the kernel
/// drops when this process exits.
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join("sandgate-test-ports");
    if low > 12_000 && std::fs::create_dir_all(&dir).is_ok() {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..1000 {
            let port = rand::random_range(10_000..low);
            let Ok(lock) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(port.to_string()))
            else {
                continue;
            };
            if lock.try_lock().is_ok() && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                held.push(lock);
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub async fn wait_for_tcp(
    addr: impl ToSocketAddrs + Clone,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect(addr.clone()).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listening after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns `Ok`, or fails with its last error after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("not true within {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Polls `check` for the whole of `window` and fails at once if it is ever `Err` (for "must not
/// happen yet" assertions; the window is what is asserted, not a sleep).
pub async fn holds<F, Fut>(window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        if let Err(e) = check().await {
            panic!("stopped holding before {window:?} had passed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A response as tests look at it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The status, headers and whole body of `resp`.
    pub async fn read(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// The pod that served it (echo server replies only).
    pub fn pod(&self) -> Option<String> {
        self.json()["pod"].as_str().map(str::to_string)
    }
}

/// One HTTP/1.1 GET with the given Host and extra headers.
pub async fn get(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header(http::header::HOST, host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    Reply::read(resp).await
}

/// One HTTP/2 GET with prior knowledge (h2c) to `host`, with extra headers.
pub async fn get_h2(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let mut req = http::Request::get(format!("http://{host}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    Reply::read(resp).await
}

/// A WebSocket over HTTP/2 (extended CONNECT, RFC 8441) to `host` through Envoy at `envoy`; the
/// HTTP status when it is refused.
pub async fn websocket_h2(
    envoy: std::net::SocketAddr,
    host: &str,
) -> anyhow::Result<
    Result<
        tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
        u16,
    >,
> {
    let stream = TcpStream::connect(envoy).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{host}/socket"))
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = sender.send_request(req).await?;
    if resp.status() != http::StatusCode::OK {
        return Ok(Err(resp.status().as_u16()));
    }
    let upgraded = hyper::upgrade::on(resp).await?;
    Ok(Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await))
}

/// A WebSocket through Envoy.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `host` through Envoy at `envoy`; the HTTP status when it is refused.
pub async fn websocket(envoy: std::net::SocketAddr, host: &str) -> Result<Ws, u16> {
    let url = format!("ws://{envoy}/socket");
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("websocket request");
    req.headers_mut()
        .insert("host", host.parse().expect("host header"));
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("websocket to {host}: {e}"),
    }
}

/// One HTTP/1.1 request with a JSON body (or none).
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    if !bytes.is_empty() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let resp = sender
        .send_request(req.body(http_body_util::Full::new(Bytes::from(bytes)))?)
        .await?;
    Reply::read(resp).await
}

/// A running sandgate-extproc, killed on drop.
pub struct Extproc {
    pub grpc_port: u16,
    pub admin_port: u16,
    pub control_port: u16,
    child: Child,
}

impl Extproc {
    /// Starts the binary against `kubeconfig`, with `extra` flags. Does not wait for readiness.
    pub fn spawn(
        dir: &Path,
        kubeconfig: &Path,
        grpc_port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Extproc> {
        let admin_port = free_port();
        let control_port = free_port();
        let token = write_token(dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("extproc-{grpc_port}.log")))?;
        let child = Command::new(bin_path("sandgate-extproc"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,sandgate_extproc=debug")
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--control-addr", &format!("127.0.0.1:{control_port}")])
            .arg("--control-token-file")
            .arg(&token)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Extproc {
            grpc_port,
            admin_port,
            control_port,
            child,
        })
    }

    pub async fn admin_get(&self, path: &str) -> anyhow::Result<Reply> {
        get(
            ([127, 0, 0, 1], self.admin_port).into(),
            "localhost",
            path,
            &[],
        )
        .await
    }

    /// A counter or gauge from its /metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .admin_get("/metrics")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        crate::cluster::metric_value(&text, series)
    }

    pub async fn is_ready(&self) -> bool {
        self.admin_get("/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    }

    pub async fn wait_ready(&self, within: Duration) {
        eventually(within, || async {
            if self.is_ready().await {
                Ok(())
            } else {
                Err("extproc not ready".to_string())
            }
        })
        .await
    }

    /// Sends a signal by name (`STOP` freezes it with its connections open, `CONT` resumes it).
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// Kills the process and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??)
    }
}

/// Sends `child` a signal by name.
pub fn signal(child: &Child, name: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status();
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn ctrl_c() {
    sandgate_extproc::shutdown::signal().await
}

/// The control-API token every test process shares.
pub const TEST_TOKEN: &str = "sandgate-test-token";

/// Writes the test token to `dir/control-token` (what a mounted Secret would hold). Atomically:
/// a process started a moment earlier may be reading it (a truncated file read as empty once
/// made a controller exit at start).
pub fn write_token(dir: &Path) -> std::io::Result<PathBuf> {
    let p = dir.join("control-token");
    let tmp = dir.join(format!("control-token.{}", rand::random::<u64>()));
    std::fs::write(&tmp, format!("{TEST_TOKEN}\n"))?;
    std::fs::rename(&tmp, &p)?;
    Ok(p)
}

/// For a failing test: what a gateway says of long-lived streams and activity, before its logs
/// (the extproc's stream, access-log and activity metrics; its Envoy's gRPC access-log counters
/// and every open request on a sandbox host).
pub fn dump_gateway(extproc_admin: u16, envoy_admin: u16) {
    let pick = |text: String, keep: &dyn Fn(&str) -> bool| {
        text.lines()
            .filter(|l| !l.starts_with('#') && keep(l))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let metrics = blocking_get(extproc_admin, "/metrics").map(|t| {
        pick(t, &|l: &str| {
            ["stream", "access_log", "activity", "touch"]
                .iter()
                .any(|w| l.contains(w))
        })
    });
    let stats = blocking_get(envoy_admin, "/stats?filter=access_log").map(|t| pick(t, &|_| true));
    let open = blocking_get(envoy_admin, "/clusters").map(|t| {
        pick(t, &|l: &str| {
            (l.contains("::rq_active::") || l.contains("::rq_pending_active::"))
                && !l.ends_with("::0")
        })
    });
    eprintln!("----- gateway: extproc admin {extproc_admin}, envoy admin {envoy_admin} -----");
    for (what, lines) in [
        ("extproc metrics", metrics),
        ("envoy access-log stats", stats),
        ("envoy open requests", open),
    ] {
        match lines {
            Ok(lines) => eprintln!("{what}: {}", lines.join(" | ")),
            Err(e) => eprintln!("{what}: unreadable: {e}"),
        }
    }
}

/// A plain HTTP/1.1 GET on a loopback port, the connection closed after it, bounded to 2 s (for
/// use in `Drop`; a chunked body keeps its size lines).
fn blocking_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let t = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .split_once("\r\n\r\n")
        .map_or(body.as_str(), |(_, b)| b)
        .to_string())
}

/// Prints the last lines of every `*.log` in `dir` (for failing tests).
pub fn dump_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // SANDGATE_TEST_LOG_LINES: how many last lines of each log (40).
    let tail: usize = std::env::var("SANDGATE_TEST_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            // The first lines say how a process started (or why it exited at once).
            let head = lines.len().saturating_sub(tail).min(10);
            eprintln!(
                "----- {} (first {head} and last {tail} lines) -----",
                p.display()
            );
            for l in &lines[..head] {
                eprintln!("{l}");
            }
            for l in &lines[lines.len().saturating_sub(tail).max(head)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// A TCP forwarder from a loopback port to `target` that can be cut: while off, it closes every
/// connection at once (a port that refuses to serve), and drops the ones it forwards.
pub struct Switch {
    pub addr: std::net::SocketAddr,
    on: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Switch {
    pub async fn start(target: std::net::SocketAddr) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let on = std::sync::Arc::new(tokio::sync::watch::channel(true).0);
        let state = on.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*state.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.wait_for(|on| !on) => {}
                    }
                });
            }
        });
        Switch { addr, on }
    }

    pub fn set(&self, on: bool) {
        self.on.send_replace(on);
    }
}
