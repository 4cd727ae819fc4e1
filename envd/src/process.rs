//! `process.Process`: real processes with their output streamed to every subscriber (the Start
//! stream, later Connect streams), stdin as a pipe, `/dev/null` or a terminal, signals, and the
//! end of each process kept 30 s for a late Connect. A process outlives the streams that watch
//! it; only its own deadline (`connect-timeout-ms` on Start, as envd does) or a signal ends it.

use std::collections::HashMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;

use crate::connect::{Code, RpcError, RpcResult, Sink};
use crate::pty::{self, Master};
use crate::users::User;
use crate::wire::{
    EndEvent, EventResponse, ListResponse, Output, ProcessConfig, ProcessEvent, ProcessInfo,
    ProcessSelector, PtySize, StartEvent, StartRequest,
};

/// How long an ended process's end event is kept for a Connect.
const KEEP_ENDED: Duration = Duration::from_secs(30);
/// How long output is still read after the process exits.
const DRAIN: Duration = Duration::from_millis(200);
/// Events queued per subscriber before output waits for it.
const QUEUE: usize = 64;

enum Input {
    Pipe(Option<ChildStdin>),
    Pty,
    Null,
}

struct Subscribers {
    list: Vec<mpsc::Sender<ProcessEvent>>,
    /// Set with the end event: no subscriber is added after it.
    end: Option<EndEvent>,
}

struct Proc {
    pid: u32,
    config: ProcessConfig,
    tag: Option<String>,
    input: tokio::sync::Mutex<Input>,
    pty: Option<Arc<Master>>,
    subs: Mutex<Subscribers>,
}

impl Proc {
    async fn publish(&self, ev: ProcessEvent) {
        let subs = self.subs.lock().expect("subscribers").list.clone();
        let mut gone = Vec::new();
        for (i, s) in subs.iter().enumerate() {
            if s.send(ev.clone()).await.is_err() {
                gone.push(i);
            }
        }
        if !gone.is_empty() {
            self.subs
                .lock()
                .expect("subscribers")
                .list
                .retain(|s| !s.is_closed());
        }
    }

    async fn finish(&self, end: EndEvent) {
        let subs = {
            let mut s = self.subs.lock().expect("subscribers");
            s.end = Some(end.clone());
            std::mem::take(&mut s.list)
        };
        for s in subs {
            let _ = s.send(ProcessEvent::End(end.clone())).await;
        }
    }

    /// A new subscriber: it gets `start` first, then live output, then the end.
    fn subscribe(&self) -> mpsc::Receiver<ProcessEvent> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let start = ProcessEvent::Start(StartEvent { pid: self.pid });
        tx.try_send(start).expect("a new queue has room");
        let mut s = self.subs.lock().expect("subscribers");
        match &s.end {
            Some(end) => {
                let _ = tx.try_send(ProcessEvent::End(end.clone()));
            }
            None => s.list.push(tx),
        }
        rx
    }
}

/// What a process is started with, beyond the request.
pub struct Launch<'a> {
    pub user: &'a User,
    pub cwd: std::path::PathBuf,
    /// PATH, HOME, USER, LOGNAME, the sandbox's env vars (from init), then the request's.
    pub env: Vec<(String, String)>,
    /// envd runs as root and may switch to `user`.
    pub switch_user: bool,
    pub deadline: Option<Duration>,
}

#[derive(Default)]
pub struct Processes {
    live: Mutex<HashMap<u32, Arc<Proc>>>,
    ended: Mutex<HashMap<u32, (Instant, Arc<Proc>)>>,
}

impl Processes {
    fn find(&self, sel: Option<&ProcessSelector>) -> RpcResult<Arc<Proc>> {
        let sel = sel.ok_or_else(|| RpcError::invalid("no process selected"))?;
        let live = self.live.lock().expect("processes");
        let found = match (&sel.pid, &sel.tag) {
            (Some(pid), _) => live.get(pid).cloned(),
            (None, Some(tag)) => live
                .values()
                .find(|p| p.tag.as_deref() == Some(tag))
                .cloned(),
            (None, None) => return Err(RpcError::invalid("no process selected")),
        };
        found.ok_or_else(|| match (&sel.pid, &sel.tag) {
            (Some(pid), _) => RpcError::not_found(format!("process with pid {pid} not found")),
            (_, tag) => RpcError::not_found(format!(
                "process with tag {} not found",
                tag.as_deref().unwrap_or("")
            )),
        })
    }

    /// A live process, or one that ended in the last 30 s (for Connect).
    fn find_or_ended(&self, sel: Option<&ProcessSelector>) -> RpcResult<Arc<Proc>> {
        match self.find(sel) {
            Ok(p) => Ok(p),
            Err(e) => {
                let mut ended = self.ended.lock().expect("ended");
                ended.retain(|_, (at, _)| at.elapsed() < KEEP_ENDED);
                sel.and_then(|s| s.pid)
                    .and_then(|pid| ended.get(&pid).map(|(_, p)| p.clone()))
                    .ok_or(e)
            }
        }
    }

    pub fn list(&self) -> ListResponse {
        let live = self.live.lock().expect("processes");
        let mut processes: Vec<ProcessInfo> = live
            .values()
            .map(|p| ProcessInfo {
                config: p.config.clone(),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        ListResponse { processes }
    }

    /// Starts the process; the receiver's first event is its `start`.
    pub fn start(
        self: &Arc<Self>,
        req: StartRequest,
        launch: Launch<'_>,
    ) -> RpcResult<mpsc::Receiver<ProcessEvent>> {
        let config = req
            .process
            .ok_or_else(|| RpcError::invalid("no process to start"))?;
        if config.cmd.is_empty() {
            return Err(RpcError::invalid("no command to start"));
        }
        if !launch.cwd.is_dir() {
            return Err(RpcError::invalid(format!(
                "cwd '{}' does not exist",
                launch.cwd.display()
            )));
        }
        let mut cmd = std::process::Command::new(&config.cmd);
        cmd.args(&config.args)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.cwd);
        let terminal = match &req.pty {
            Some(p) => Some(
                pty::open(p.size.unwrap_or(PtySize { cols: 80, rows: 24 }))
                    .map_err(|e| RpcError::internal(format!("opening a terminal: {e}")))?,
            ),
            None => None,
        };
        let (master, input) = match terminal {
            Some((master, [i, o, e])) => {
                cmd.stdin(i).stdout(o).stderr(e);
                (Some(Arc::new(master)), Input::Pty)
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                if req.stdin == Some(false) {
                    cmd.stdin(Stdio::null());
                    (None, Input::Null)
                } else {
                    cmd.stdin(Stdio::piped());
                    (None, Input::Pipe(None))
                }
            }
        };
        let with_pty = master.is_some();
        let ids = launch
            .switch_user
            .then(|| (launch.user.uid, launch.user.gid, launch.user.groups.clone()));
        // SAFETY: the closure makes only async-signal-safe calls (setsid, ioctl, setgroups,
        // setgid, setuid) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if with_pty {
                    pty::make_controlling()?;
                }
                if let Some((uid, gid, groups)) = &ids {
                    let groups: Vec<libc::gid_t> = groups.clone();
                    if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                        || libc::setgid(*gid) < 0
                        || libc::setuid(*uid) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| RpcError::invalid(format!("failed to start {}: {e}", config.cmd)))?;
        let pid = child.id().unwrap_or(0);
        let input = match input {
            Input::Pipe(_) => Input::Pipe(child.stdin.take()),
            other => other,
        };
        let proc = Arc::new(Proc {
            pid,
            config,
            tag: req.tag,
            input: tokio::sync::Mutex::new(input),
            pty: master.clone(),
            subs: Mutex::new(Subscribers {
                list: Vec::new(),
                end: None,
            }),
        });
        let rx = proc.subscribe();
        self.live
            .lock()
            .expect("processes")
            .insert(pid, proc.clone());

        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(proc.clone(), out, Output::Stdout)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(proc.clone(), err, Output::Stderr)));
        }
        if let Some(m) = master {
            readers.push(tokio::spawn(pump_pty(proc.clone(), m)));
        }
        if let Some(limit) = launch.deadline {
            let this = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                if let Some(this) = this.upgrade() {
                    if this.live.lock().expect("processes").contains_key(&pid) {
                        tracing::info!(pid, ?limit, "process deadline passed: killed");
                        // SAFETY: kill on a pid this envd started and has not reaped.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            });
        }
        let this = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Output still in the pipes is read, but not what a child left running (holding
            // the pipes open) prints later: the end is the process's, as envd (Go's Wait) has it.
            for mut r in readers {
                if tokio::time::timeout(DRAIN, &mut r).await.is_err() {
                    r.abort();
                }
            }
            let end = end_event(status);
            this.live.lock().expect("processes").remove(&pid);
            this.ended
                .lock()
                .expect("ended")
                .insert(pid, (Instant::now(), proc.clone()));
            proc.finish(end).await;
        });
        Ok(rx)
    }

    pub fn connect(
        &self,
        sel: Option<&ProcessSelector>,
    ) -> RpcResult<mpsc::Receiver<ProcessEvent>> {
        Ok(self.find_or_ended(sel)?.subscribe())
    }

    pub async fn send_stdin(&self, sel: Option<&ProcessSelector>, data: &[u8]) -> RpcResult<()> {
        let p = self.find(sel)?;
        let mut input = p.input.lock().await;
        match &mut *input {
            Input::Pipe(Some(stdin)) => stdin
                .write_all(data)
                .await
                .map_err(|e| RpcError::internal(format!("writing stdin: {e}"))),
            Input::Pty => Err(RpcError::internal(
                "the process has a terminal: send its input as pty",
            )),
            _ => Err(RpcError::internal("stdin not enabled or closed")),
        }
    }

    pub async fn send_pty(&self, sel: Option<&ProcessSelector>, data: &[u8]) -> RpcResult<()> {
        let p = self.find(sel)?;
        let Some(m) = &p.pty else {
            return Err(RpcError::internal("the process has no terminal"));
        };
        m.write_all(data)
            .await
            .map_err(|e| RpcError::internal(format!("writing to the terminal: {e}")))
    }

    pub async fn close_stdin(&self, sel: Option<&ProcessSelector>) -> RpcResult<()> {
        let p = self.find(sel)?;
        let mut input = p.input.lock().await;
        match &mut *input {
            Input::Pty => Err(RpcError::new(
                Code::Unknown,
                "the process has a terminal: send Ctrl+D (0x04) instead",
            )),
            Input::Pipe(stdin) => {
                if let Some(mut s) = stdin.take() {
                    let _ = s.shutdown().await;
                }
                Ok(())
            }
            Input::Null => Ok(()),
        }
    }

    pub fn signal(&self, sel: Option<&ProcessSelector>, sig: libc::c_int) -> RpcResult<()> {
        let p = self.find(sel)?;
        // SAFETY: kill on a pid this envd started and has not reaped (it is still live).
        if unsafe { libc::kill(p.pid as i32, sig) } < 0 {
            return Err(RpcError::internal(format!(
                "signal to {}: {}",
                p.pid,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    pub fn resize(&self, sel: Option<&ProcessSelector>, size: PtySize) -> RpcResult<()> {
        let p = self.find(sel)?;
        let Some(m) = &p.pty else {
            return Err(RpcError::internal("the process has no terminal"));
        };
        m.resize(size)
            .map_err(|e| RpcError::internal(format!("resizing the terminal: {e}")))
    }
}

async fn pump(proc: Arc<Proc>, mut from: impl AsyncRead + Unpin, wrap: fn(Vec<u8>) -> Output) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                proc.publish(ProcessEvent::Data(wrap(buf[..n].to_vec())))
                    .await
            }
        }
    }
}

async fn pump_pty(proc: Arc<Proc>, m: Arc<Master>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match m.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                proc.publish(ProcessEvent::Data(Output::Pty(buf[..n].to_vec())))
                    .await
            }
        }
    }
}

/// The end event as envd (Go's `ProcessState`) words it.
fn end_event(status: std::io::Result<ExitStatus>) -> EndEvent {
    match status {
        Err(e) => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some(e.to_string()),
        },
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => EndEvent {
                exit_code: code,
                exited: true,
                status: format!("exit status {code}"),
                error: (code != 0).then(|| format!("exit status {code}")),
            },
            (None, sig) => {
                let text = format!("signal: {}", signal_name(sig.unwrap_or(0)));
                EndEvent {
                    exit_code: -1,
                    exited: false,
                    status: text.clone(),
                    error: Some(text),
                }
            }
        },
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGQUIT => "quit".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGPIPE => "broken pipe".into(),
        n => format!("signal {n}"),
    }
}

/// Feeds a Start or Connect stream: events as they come, keepalives after `start` when nothing
/// else went out for `keepalive`, the end, then the end-stream envelope. A deadline ends the
/// stream with `deadline_exceeded` (the process's own deadline is separate).
pub async fn stream_events(
    mut rx: mpsc::Receiver<ProcessEvent>,
    sink: Sink,
    keepalive: Duration,
    deadline: Option<Duration>,
) {
    let until = deadline.map(|d| tokio::time::Instant::now() + d);
    let mut started = false;
    loop {
        let tick = tokio::time::sleep(keepalive);
        let limit = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    let end = matches!(ev, ProcessEvent::End(_));
                    started |= matches!(ev, ProcessEvent::Start(_));
                    if !sink.send(&EventResponse { event: &ev }).await {
                        return;
                    }
                    if end {
                        sink.finish(Ok(())).await;
                        return;
                    }
                }
                None => {
                    sink.finish(Err(RpcError::new(Code::Unknown, "the process is gone"))).await;
                    return;
                }
            },
            _ = tick, if started => {
                if !sink.send(&EventResponse { event: &ProcessEvent::Keepalive {} }).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(user: &User) -> Launch<'_> {
        Launch {
            user,
            cwd: std::env::temp_dir(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            switch_user: false,
            deadline: None,
        }
    }

    fn sh(cmd: &str, stdin: Option<bool>) -> StartRequest {
        StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), cmd.into()],
                ..Default::default()
            }),
            pty: None,
            tag: None,
            stdin,
        }
    }

    async fn collect(mut rx: mpsc::Receiver<ProcessEvent>) -> (Vec<u8>, Vec<u8>, EndEvent) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(matches!(rx.recv().await, Some(ProcessEvent::Start(_))));
        loop {
            match rx.recv().await.expect("an end event") {
                ProcessEvent::Data(Output::Stdout(d)) => out.extend(d),
                ProcessEvent::Data(Output::Stderr(d)) => err.extend(d),
                ProcessEvent::End(e) => return (out, err, e),
                _ => {}
            }
        }
    }

    fn user() -> User {
        crate::users::Accounts::default().own()
    }

    #[tokio::test]
    async fn output_and_exit_codes_come_back() {
        let p = Arc::new(Processes::default());
        let u = user();
        let rx = p
            .start(
                sh("echo out; echo err >&2; exit 3", Some(false)),
                launch(&u),
            )
            .unwrap();
        let (out, err, end) = collect(rx).await;
        assert_eq!((out, err), (b"out\n".to_vec(), b"err\n".to_vec()));
        assert_eq!((end.exit_code, end.exited), (3, true));
        assert_eq!(end.error.as_deref(), Some("exit status 3"));
    }

    #[tokio::test]
    async fn stdin_signals_and_late_connects() {
        let p = Arc::new(Processes::default());
        let u = user();
        // The shell's child keeps the pipes open after the shell is killed: the end comes anyway.
        let mut rx = p
            .start(sh("read l; echo got $l; sleep 30", None), launch(&u))
            .unwrap();
        let pid = p.list().processes[0].pid;
        let sel = ProcessSelector {
            pid: Some(pid),
            tag: None,
        };
        p.send_stdin(Some(&sel), b"hi\n").await.unwrap();
        assert!(matches!(rx.recv().await, Some(ProcessEvent::Start(_))));
        match rx.recv().await {
            Some(ProcessEvent::Data(Output::Stdout(d))) => assert_eq!(d, b"got hi\n"),
            other => panic!("{other:?}"),
        }
        let late = p.connect(Some(&sel)).unwrap();
        p.signal(Some(&sel), libc::SIGKILL).unwrap();
        let end = loop {
            if let Some(ProcessEvent::End(e)) = rx.recv().await {
                break e;
            }
        };
        assert_eq!(end.status, "signal: killed");
        let (_, _, end) = collect(late).await;
        assert_eq!(end.exit_code, -1);
        // Ended: a Connect still gets start and the end, for a while.
        let (_, _, end) = collect(p.connect(Some(&sel)).unwrap()).await;
        assert_eq!(end.status, "signal: killed");
        assert_eq!(
            p.signal(Some(&sel), libc::SIGKILL).unwrap_err().code,
            Code::NotFound
        );
        assert!(p.list().processes.is_empty());
    }

    #[tokio::test]
    async fn stdin_false_is_dev_null_and_a_bad_cwd_is_refused() {
        let p = Arc::new(Processes::default());
        let u = user();
        let (out, _, _) = collect(
            p.start(sh("cat; echo done", Some(false)), launch(&u))
                .unwrap(),
        )
        .await;
        assert_eq!(out, b"done\n");
        let mut l = launch(&u);
        l.cwd = "/no/such/dir".into();
        let e = p.start(sh("true", None), l).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("does not exist"), "{e}");
    }

    #[tokio::test]
    async fn a_deadline_kills_the_process() {
        let p = Arc::new(Processes::default());
        let u = user();
        let mut l = launch(&u);
        l.deadline = Some(Duration::from_millis(300));
        let (_, _, end) = collect(p.start(sh("sleep 30", Some(false)), l).unwrap()).await;
        assert_eq!(end.status, "signal: killed");
    }

    #[tokio::test]
    async fn a_terminal_echoes_input_and_resizes() {
        let p = Arc::new(Processes::default());
        let u = user();
        let mut req = sh("stty size; read l; echo got:$l", None);
        req.pty = Some(crate::wire::Pty {
            size: Some(PtySize {
                cols: 100,
                rows: 30,
            }),
        });
        let mut rx = p.start(req, launch(&u)).unwrap();
        let pid = p.list().processes[0].pid;
        let sel = ProcessSelector {
            pid: Some(pid),
            tag: None,
        };
        p.resize(
            Some(&sel),
            PtySize {
                cols: 120,
                rows: 40,
            },
        )
        .unwrap();
        p.send_pty(Some(&sel), b"x\n").await.unwrap();
        let mut text = Vec::new();
        loop {
            match rx.recv().await.unwrap() {
                ProcessEvent::Data(Output::Pty(d)) => text.extend(d),
                ProcessEvent::End(_) => break,
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("30 100") || text.contains("40 120"), "{text}");
        assert!(text.contains("got:x"), "{text}");
        assert_eq!(
            p.send_stdin(Some(&sel), b"x").await.unwrap_err().code,
            Code::NotFound
        );
    }
}
