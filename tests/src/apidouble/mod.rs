//! A Kubernetes API double, reached over HTTP with a kubeconfig like a real cluster.
//!
//! It serves any resource at the usual REST paths (`/api/v1/...`, `/apis/<group>/<version>/...`):
//! list and watch (resourceVersion, bookmarks, label selectors, 410 for expired versions), get,
//! create, replace, merge and JSON patch (resourceVersion preconditions → 409, failed `test` → 422),
//! status subresources, pod binding, delete with finalizers. Pods run on the loopback kubelet
//! ([`crate::kubelet`]), which reaches the double over HTTP as it would a real API server.
//! Test-only knobs (a list delay, a bearer token) live here, never in the binaries.

pub mod http;
pub mod selector;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub use store::Store;

/// Behaviour a test can change while the double runs.
#[derive(Default)]
pub struct Hooks {
    list_delay: Mutex<Option<Duration>>,
    /// Runs once, just before the next JSON patch is applied (to stage a race).
    before_json_patch: Mutex<Option<BeforePatch>>,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// The last requests served, oldest first, for a failing test to print.
    requests: Mutex<std::collections::VecDeque<String>>,
    /// Every request served.
    total: std::sync::atomic::AtomicU64,
    /// Requests served by verb and resource (`PATCH pods/status`), for a bench to break down.
    by_kind: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// How many requests [`Hooks::recent_requests`] keeps.
const REQUEST_LOG_LEN: usize = 4000;

/// A one-shot action on the store.
pub type BeforePatch = Box<dyn FnOnce(&Store) + Send>;

impl Hooks {
    pub fn take_before_json_patch(&self) -> Option<BeforePatch> {
        self.before_json_patch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The last requests served (method, path and query, status), oldest first.
    pub fn recent_requests(&self) -> Vec<String> {
        let log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    /// How many requests the double has served.
    pub fn total_requests(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests served so far by verb and resource.
    pub fn requests_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        self.by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, method: &hyper::Method, uri: &hyper::Uri) {
        let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
        let at = segs.iter().position(|s| *s == "namespaces");
        let (resource, sub) = match at {
            Some(i) if segs.len() > i + 2 => (segs[i + 2], segs.get(i + 4).copied()),
            _ => (segs.last().copied().unwrap_or(""), None),
        };
        let watch = uri.query().is_some_and(|q| q.contains("watch=true"));
        let verb = if watch {
            "WATCH".to_string()
        } else {
            method.to_string()
        };
        let key = match sub {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        let mut m = self.by_kind.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(key).or_default() += 1;
    }

    fn record(&self, line: String) {
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == REQUEST_LOG_LEN {
            log.pop_front();
        }
        log.push_back(line);
    }

    pub fn list_delay(&self) -> Option<Duration> {
        *self.list_delay.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running double.
pub struct ApiDouble {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    pub hooks: Arc<Hooks>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ApiDouble {
    /// Starts the double on an ephemeral port.
    pub async fn start() -> std::io::Result<ApiDouble> {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<ApiDouble> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::new());
        let hooks = Arc::new(Hooks::default());
        let serve = {
            let (store, hooks) = (store.clone(), hooks.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (store, hooks) = (store.clone(), hooks.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: hyper::Request<_>| {
                            let (store, hooks) = (store.clone(), hooks.clone());
                            async move {
                                let now = std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .unwrap_or_default();
                                let line = format!(
                                    "{:.3} {} {}",
                                    now.as_secs_f64() % 1000.0,
                                    req.method(),
                                    req.uri()
                                );
                                hooks.count(req.method(), req.uri());
                                let resp = http::handle(store, hooks.clone(), req).await;
                                if let Ok(r) = &resp {
                                    hooks.record(format!("{line} -> {}", r.status().as_u16()));
                                }
                                resp
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        };
        Ok(ApiDouble {
            addr,
            store,
            hooks,
            tasks: vec![serve],
        })
    }

    /// Makes every list answer only after `d` (None to stop).
    pub fn set_list_delay(&self, d: Option<Duration>) {
        *self
            .hooks
            .list_delay
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = d;
    }
    /// Runs `f` once, just before the next JSON patch is applied.
    pub fn before_next_json_patch(&self, f: impl FnOnce(&Store) + Send + 'static) {
        *self
            .hooks
            .before_json_patch
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Stores `n` running, Ready sandbox pods in `default` for the benchmarks: `pod-<i>` with ID
    /// `sbx-<i>`, all on 127.0.0.1, with `annotations`.
    pub fn running_sandboxes(
        &self,
        n: usize,
        annotations: serde_json::Value,
    ) -> anyhow::Result<()> {
        for i in 0..n {
            let pod = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod-{i}"), "namespace": "default",
                    "labels": {"sandgate.dev/sandbox-id": format!("sbx-{i}"),
                               "sandgate.dev/phase": "running", "sandgate.dev/pool": "bench"},
                    "annotations": annotations},
                "spec": {"containers": [{"name": "s", "image": "x"}]},
                "status": {"phase": "Running", "podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            });
            self.store
                .create("pods", "default", pod)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        Ok(())
    }

    /// Writes a kubeconfig pointing at the double.
    pub fn write_kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig(self.addr))?;
        Ok(path)
    }
}

impl Drop for ApiDouble {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\ncurrent-context: double\nusers:\n- name: double\n  user: {{}}\n"
    )
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
