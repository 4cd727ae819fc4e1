//! sandgate-envd: the daemon in a sandbox that the E2B SDKs' `commands`, `files` and `pty` calls
//! reach on port 49983, compatible on the wire with the SDKs the project pins. Connect RPC (JSON)
//! for `process.Process` and `filesystem.Filesystem`, plain HTTP for `/health`, `/files` and
//! `/init`, over HTTP/1.1 or h2c on one port.

// HTTP handlers return their error answer (a whole response) early; boxing it buys nothing.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod connect;
mod files;
pub mod fs;
pub mod process;
pub mod pty;
pub mod users;
mod watch;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::auth::{Auth, Denied, Init, Settings};
use crate::connect::{Body, Code, RpcError, RpcResult};
use crate::users::{Accounts, User};
use crate::wire::*;

/// The envd version reported to the SDK (by sandgate-api, as `envdVersion`): the SDK features it
/// unlocks are the ones implemented here. 0.6.2 and later add file metadata (xattrs), include_entry
/// and network-mount watches, which this envd does not do; the SDK refuses them itself below.
pub const ENVD_VERSION: &str = "0.6.1";

#[derive(Debug, Clone, Parser)]
#[command(name = "sandgate-envd", version, about)]
pub struct Config {
    /// Where to serve (HTTP/1.1 and h2c).
    #[arg(long, env = "SANDGATE_ENVD_LISTEN", default_value = "0.0.0.0:49983")]
    pub listen: SocketAddr,

    /// The user calls run as when they name none (`/init`'s defaultUser overrides it). Default:
    /// the user envd runs as.
    #[arg(long = "default-user", env = "SANDGATE_ENVD_DEFAULT_USER")]
    pub default_user_flag: Option<String>,

    /// The working directory of calls that name none (default: the user's home).
    #[arg(long, env = "SANDGATE_ENVD_DEFAULT_WORKDIR")]
    pub default_workdir: Option<PathBuf>,

    /// A file holding the access token every call must carry (else the first `/init` sets it).
    #[arg(long, env = "SANDGATE_ENVD_ACCESS_TOKEN_FILE")]
    pub access_token_file: Option<PathBuf>,

    /// `text` or `json`.
    #[arg(long, env = "SANDGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    #[arg(skip)]
    pub default_user: String,
}

pub struct Envd {
    pub config: Config,
    pub accounts: Accounts,
    pub auth: Auth,
    processes: Arc<process::Processes>,
    watchers: watch::Watchers,
    own: User,
}

impl Envd {
    pub fn new(mut config: Config) -> anyhow::Result<Arc<Self>> {
        let accounts = Accounts::default();
        let own = accounts.own();
        config.default_user = config
            .default_user_flag
            .clone()
            .unwrap_or_else(|| own.name.clone());
        if accounts.lookup(&config.default_user).is_none() && config.default_user != own.name {
            anyhow::bail!(
                "--default-user {}: no such user in /etc/passwd",
                config.default_user
            );
        }
        let token = match &config.access_token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("--access-token-file {}: {e}", p.display()))?;
                let t = t.trim().to_string();
                anyhow::ensure!(
                    !t.is_empty(),
                    "--access-token-file {} is empty",
                    p.display()
                );
                Some(t)
            }
            None => None,
        };
        Ok(Arc::new(Envd {
            auth: Auth::new(Settings {
                token,
                ..Default::default()
            }),
            accounts,
            processes: Arc::default(),
            watchers: Default::default(),
            own,
            config,
        }))
    }

    /// envd runs as root and so acts as the caller's user.
    fn switch_user(&self) -> bool {
        self.own.uid == 0
    }

    /// The user of an RPC (Basic auth, else the default).
    fn rpc_user(&self, req: &Request<Incoming>) -> RpcResult<User> {
        let asked = users::basic_user(req.headers())?;
        let settings = self.auth.settings();
        let default = settings
            .default_user
            .as_deref()
            .unwrap_or(&self.config.default_user)
            .to_string();
        match users::resolve(&self.accounts, asked.as_deref(), &default) {
            // envd's own account may have no passwd entry (a bare container): serve it anyway.
            Err(_) if asked.is_none() && default == self.own.name => Ok(self.own.clone()),
            r => r,
        }
    }

    fn path(&self, raw: &str, user: &User) -> RpcResult<PathBuf> {
        let settings = self.auth.settings();
        let workdir = settings
            .default_workdir
            .map(PathBuf::from)
            .or_else(|| self.config.default_workdir.clone());
        users::resolve_path(raw, user, workdir.as_deref())
    }

    fn env_for(
        &self,
        user: &User,
        request: &std::collections::BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        let mut env = vec![
            ("PATH".to_string(), path),
            ("HOME".to_string(), user.home.display().to_string()),
            ("USER".to_string(), user.name.clone()),
            ("LOGNAME".to_string(), user.name.clone()),
        ];
        env.extend(self.auth.settings().env);
        env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

/// Serves until the listener fails.
pub async fn serve(envd: Arc<Envd>, listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let envd = envd.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let envd = envd.clone();
                async move { Ok::<_, std::convert::Infallible>(route(envd, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

fn denied(d: Denied) -> Response<Body> {
    let message = match d {
        Denied::Token => {
            "unauthorized access, please provide a valid access token or method signing if supported"
        }
        Denied::Signature => "invalid or expired signature",
    };
    files::error(StatusCode::UNAUTHORIZED, message)
}

async fn route(envd: Arc<Envd>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => {
            let mut r = connect::full(StatusCode::NO_CONTENT, "text/plain", "");
            r.headers_mut().insert(
                http::header::CACHE_CONTROL,
                "no-store".parse().expect("valid"),
            );
            r
        }
        (Method::POST, "/init") => init(&envd, req).await,
        (Method::GET, "/files") | (Method::POST, "/files") => {
            let op = if req.method() == Method::GET {
                "read"
            } else {
                "write"
            };
            let now = jiff::Timestamp::now().as_second();
            if let Err(d) = envd
                .auth
                .check_file(req.headers(), &files::query(&req), op, now)
            {
                return denied(d);
            }
            if op == "read" {
                files::download(&envd, req).await
            } else {
                files::upload(&envd, req).await
            }
        }
        (Method::POST, p)
            if p.starts_with("/process.Process/") || p.starts_with("/filesystem.Filesystem/") =>
        {
            if let Err(d) = envd.auth.check(req.headers()) {
                return match d {
                    Denied::Token | Denied::Signature => connect::unary::<()>(Err(RpcError::new(
                        Code::Unauthenticated,
                        "unauthorized access, please provide a valid access token",
                    ))),
                };
            }
            rpc(&envd, req).await
        }
        (_, "/health") | (_, "/init") | (_, "/files") => {
            files::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => files::error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn init(envd: &Envd, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers().clone();
    let body: Init = match connect::read_unary(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return files::error(StatusCode::BAD_REQUEST, e.message),
    };
    if let Some(u) = body.default_user.as_deref().filter(|u| !u.is_empty()) {
        if envd.accounts.lookup(u).is_none() {
            return files::error(
                StatusCode::BAD_REQUEST,
                format!("defaultUser {u}: no such user"),
            );
        }
    }
    match envd.auth.init(&headers, body) {
        Ok(()) => {
            let mut r = connect::full(StatusCode::NO_CONTENT, "text/plain", "");
            r.headers_mut()
                .insert("x-envd-version", ENVD_VERSION.parse().expect("valid"));
            r
        }
        Err(d) => denied(d),
    }
}

const STREAMING: &[&str] = &[
    "/process.Process/Start",
    "/process.Process/Connect",
    "/process.Process/StreamInput",
    "/filesystem.Filesystem/WatchDir",
];

async fn rpc(envd: &Arc<Envd>, req: Request<Incoming>) -> Response<Body> {
    let method = req.uri().path().to_string();
    let streaming = STREAMING.contains(&method.as_str());
    if let Err(r) = connect::check_codec(req.headers(), streaming) {
        return r;
    }
    if streaming {
        return match stream_rpc(envd, &method, req).await {
            Ok(r) => r,
            Err(e) => connect::stream_error(e),
        };
    }
    match method.as_str() {
        "/process.Process/List" => connect::unary(Ok(envd.processes.list())),
        "/process.Process/SendInput" => {
            let r: RpcResult<_> = async {
                let r: SendInputRequest = connect::read_unary(req.into_body()).await?;
                let input = r.input.unwrap_or_default();
                match (input.stdin, input.pty) {
                    (Some(d), _) => envd.processes.send_stdin(r.process.as_ref(), &d).await,
                    (None, Some(d)) => envd.processes.send_pty(r.process.as_ref(), &d).await,
                    (None, None) => Err(RpcError::invalid("no input")),
                }
            }
            .await;
            connect::unary(r.map(|()| serde_json::json!({})))
        }
        "/process.Process/SendSignal" => {
            let r: RpcResult<_> = async {
                let r: SendSignalRequest = connect::read_unary(req.into_body()).await?;
                let sig = match r.signal {
                    Signal::Kill => libc::SIGKILL,
                    Signal::Term => libc::SIGTERM,
                    other => {
                        return Err(RpcError::new(
                            Code::Unimplemented,
                            format!("signal {other:?} is not supported: SIGKILL and SIGTERM are"),
                        ))
                    }
                };
                envd.processes.signal(r.process.as_ref(), sig)
            }
            .await;
            connect::unary(r.map(|()| serde_json::json!({})))
        }
        "/process.Process/CloseStdin" => {
            let r: RpcResult<_> = async {
                let r: CloseStdinRequest = connect::read_unary(req.into_body()).await?;
                envd.processes.close_stdin(r.process.as_ref()).await
            }
            .await;
            connect::unary(r.map(|()| serde_json::json!({})))
        }
        "/process.Process/Update" => {
            let r: RpcResult<_> = async {
                let r: UpdateRequest = connect::read_unary(req.into_body()).await?;
                match r.pty.and_then(|p| p.size) {
                    Some(size) => envd.processes.resize(r.process.as_ref(), size),
                    None => Ok(()),
                }
            }
            .await;
            connect::unary(r.map(|()| serde_json::json!({})))
        }
        m if m.starts_with("/filesystem.Filesystem/") => {
            let r = fs_rpc(envd, &m["/filesystem.Filesystem/".len()..], req).await;
            connect::unary(r)
        }
        _ => connect::unary::<()>(Err(RpcError::new(
            Code::Unimplemented,
            format!("{method} is not implemented"),
        ))),
    }
}

async fn fs_rpc(envd: &Envd, name: &str, req: Request<Incoming>) -> RpcResult<serde_json::Value> {
    let user = envd.rpc_user(&req)?;
    let switch = envd.switch_user();
    let a = &envd.accounts;
    match name {
        "Stat" => {
            let r: PathRequest = connect::read_unary(req.into_body()).await?;
            let p = envd.path(&r.path, &user)?;
            Ok(serde_json::json!({"entry": fs::stat(a, &p)?}))
        }
        "MakeDir" => {
            let r: PathRequest = connect::read_unary(req.into_body()).await?;
            let p = envd.path(&r.path, &user)?;
            Ok(serde_json::json!({"entry": fs::make_dir(a, &p, &user, switch)?}))
        }
        "Move" => {
            let r: MoveRequest = connect::read_unary(req.into_body()).await?;
            let from = envd.path(&r.source, &user)?;
            let to = envd.path(&r.destination, &user)?;
            Ok(serde_json::json!({"entry": fs::rename(a, &from, &to, &user, switch)?}))
        }
        "ListDir" => {
            let r: ListDirRequest = connect::read_unary(req.into_body()).await?;
            let p = envd.path(&r.path, &user)?;
            Ok(serde_json::json!({"entries": fs::list_dir(a, &p, r.depth)?}))
        }
        "Remove" => {
            let r: PathRequest = connect::read_unary(req.into_body()).await?;
            fs::remove(&envd.path(&r.path, &user)?)?;
            Ok(serde_json::json!({}))
        }
        "CreateWatcher" => {
            let r: WatchRequest = connect::read_unary(req.into_body()).await?;
            let p = envd.path(&r.path, &user)?;
            let id = envd.watchers.create(&p, r.recursive)?;
            Ok(serde_json::json!({"watcherId": id}))
        }
        "GetWatcherEvents" => {
            let r: WatcherRequest = connect::read_unary(req.into_body()).await?;
            let events = envd.watchers.drain(&r.watcher_id).await?;
            Ok(serde_json::json!({"events": events}))
        }
        "RemoveWatcher" => {
            let r: WatcherRequest = connect::read_unary(req.into_body()).await?;
            envd.watchers.remove(&r.watcher_id)?;
            Ok(serde_json::json!({}))
        }
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} is not implemented"),
        )),
    }
}

async fn stream_rpc(
    envd: &Arc<Envd>,
    method: &str,
    req: Request<Incoming>,
) -> RpcResult<Response<Body>> {
    let deadline = connect::deadline(req.headers())?;
    let keepalive = connect::keepalive(req.headers());
    match method {
        "/process.Process/Start" => {
            let user = envd.rpc_user(&req)?;
            let mut msgs = connect::Envelopes::new(req.into_body());
            let start: StartRequest = msgs
                .next()
                .await?
                .ok_or_else(|| RpcError::invalid("no start request"))?;
            let config = start.process.clone().unwrap_or_default();
            let cwd = envd.path(config.cwd.as_deref().unwrap_or(""), &user)?;
            let cwd = if config.cwd.is_none() && !cwd.is_dir() {
                PathBuf::from("/")
            } else {
                cwd
            };
            let env = envd.env_for(&user, &config.envs);
            let launch = process::Launch {
                user: &user,
                cwd,
                env,
                switch_user: envd.switch_user(),
                deadline,
            };
            let rx = envd.processes.start(start, launch)?;
            let (resp, sink) = connect::stream();
            tokio::spawn(process::stream_events(rx, sink, keepalive, deadline));
            Ok(resp)
        }
        "/process.Process/Connect" => {
            let mut msgs = connect::Envelopes::new(req.into_body());
            let r: ConnectRequest = msgs.next().await?.unwrap_or_default();
            let rx = envd.processes.connect(r.process.as_ref())?;
            let (resp, sink) = connect::stream();
            tokio::spawn(process::stream_events(rx, sink, keepalive, deadline));
            Ok(resp)
        }
        "/process.Process/StreamInput" => {
            let mut msgs = connect::Envelopes::new(req.into_body());
            let first: StreamInputRequest = msgs
                .next()
                .await?
                .ok_or_else(|| RpcError::invalid("no start message"))?;
            let sel = first
                .start
                .and_then(|s| s.process)
                .ok_or_else(|| RpcError::invalid("the first message must be start"))?;
            // Input is forwarded as each message arrives: the caller may hold the stream open.
            let until = deadline.map(|d| tokio::time::Instant::now() + d);
            loop {
                let next = match until {
                    Some(t) => tokio::time::timeout_at(t, msgs.next::<StreamInputRequest>())
                        .await
                        .map_err(|_| {
                            RpcError::new(Code::DeadlineExceeded, "the call's deadline passed")
                        })?,
                    None => msgs.next::<StreamInputRequest>().await,
                }?;
                let Some(m) = next else { break };
                if let Some(input) = m.data.and_then(|d| d.input) {
                    match (input.stdin, input.pty) {
                        (Some(d), _) => envd.processes.send_stdin(Some(&sel), &d).await?,
                        (None, Some(d)) => envd.processes.send_pty(Some(&sel), &d).await?,
                        (None, None) => {}
                    }
                }
            }
            let (resp, sink) = connect::stream();
            tokio::spawn(async move {
                if sink.send(&serde_json::json!({})).await {
                    sink.finish(Ok(())).await;
                }
            });
            Ok(resp)
        }
        "/filesystem.Filesystem/WatchDir" => {
            let user = envd.rpc_user(&req)?;
            let mut msgs = connect::Envelopes::new(req.into_body());
            let r: WatchRequest = msgs.next().await?.unwrap_or_default();
            let dir = envd.path(&r.path, &user)?;
            let w = watch::watch(&dir, r.recursive)?;
            let (resp, sink) = connect::stream();
            tokio::spawn(stream_watch(w, sink, keepalive, deadline));
            Ok(resp)
        }
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("{other} is not implemented"),
        )),
    }
}

async fn stream_watch(
    mut w: watch::Watch,
    sink: connect::Sink,
    keepalive: Duration,
    deadline: Option<Duration>,
) {
    if !sink.send(&WatchEvent::Start {}).await {
        return;
    }
    let until = deadline.map(|d| tokio::time::Instant::now() + d);
    loop {
        let limit = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = w.events.recv() => match ev {
                Some(ev) => {
                    if !sink.send(&WatchEvent::Filesystem(Box::new(ev))).await {
                        return;
                    }
                }
                None => {
                    sink.finish(Err(RpcError::internal("the watch ended"))).await;
                    return;
                }
            },
            _ = tokio::time::sleep(keepalive) => {
                if !sink.send(&WatchEvent::Keepalive {}).await {
                    return;
                }
            }
            _ = limit => {
                sink.finish(Err(RpcError::new(Code::DeadlineExceeded, "the call's deadline passed"))).await;
                return;
            }
            _ = sink.closed() => return,
        }
    }
}
