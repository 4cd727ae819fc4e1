//! A small "kubelet": gives every new pod a loopback IP, starts an HTTP + WebSocket echo server on
//! each of its container ports, and marks it Running and Ready. Deleting the pod stops its servers.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::store::{EventType, PatchKind, Store};
use crate::echo;

/// Runs until the store is dropped. `net` picks the /16 the pod IPs come from: 127.<net>.x.y.
pub async fn run(store: Arc<Store>, net: u8) {
    let mut changes = store.subscribe();
    let mut next: u32 = 0;
    let mut servers: HashMap<(String, String), Vec<JoinHandle<()>>> = HashMap::new();
    // Changes to act on: the feed, or after falling behind it, the pods as they are now.
    let mut backlog: std::collections::VecDeque<(EventType, Value)> = Default::default();
    loop {
        let (kind, object) = match backlog.pop_front() {
            Some(c) => c,
            None => match changes.recv().await {
                Ok(c) if c.resource == "pods" => (c.kind, c.object.clone()),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let (pods, _) = store.list("pods", None, &Default::default());
                    let live: std::collections::HashSet<(String, String)> =
                        pods.iter().map(pod_key).collect();
                    servers.retain(|k, hs| {
                        let keep = live.contains(k);
                        if !keep {
                            hs.iter().for_each(JoinHandle::abort);
                        }
                        keep
                    });
                    backlog.extend(pods.into_iter().map(|p| (EventType::Added, p)));
                    continue;
                }
                Err(_) => return,
            },
        };
        let key = pod_key(&object);
        if kind == EventType::Deleted {
            for h in servers.remove(&key).unwrap_or_default() {
                h.abort();
            }
            continue;
        }
        if object["status"]["podIP"].is_string()
            || servers.contains_key(&key)
            || object["metadata"]["deletionTimestamp"].is_string()
        {
            continue;
        }
        let (ip, handles) = start_servers(net, &mut next, &container_ports(&object), &key.1).await;
        let (namespace, name) = key.clone();
        servers.insert(key, handles);
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ],
        }});
        if let Err(e) = store.patch("pods", &namespace, &name, PatchKind::Merge, &status, true) {
            tracing::warn!(pod = %name, error = ?e, "kubelet: status update failed");
        }
    }
}

/// Starts echo servers on `ports` at the next loopback address where all of them bind (another
/// test process may use the same /16 at the same time).
async fn start_servers(
    net: u8,
    next: &mut u32,
    ports: &[u16],
    name: &str,
) -> (Ipv4Addr, Vec<JoinHandle<()>>) {
    for _ in 0..64 {
        *next += 1;
        let ip = address(net, *next);
        let mut handles = Vec::new();
        for &port in ports {
            match echo::bind(ip, port, name.to_string()).await {
                Ok(h) => handles.push(h),
                Err(e) => {
                    tracing::debug!(%ip, port, error = %e, "kubelet: address taken; next one");
                    break;
                }
            }
        }
        if handles.len() == ports.len() {
            return (ip, handles);
        }
        handles.iter().for_each(JoinHandle::abort);
    }
    tracing::warn!(pod = %name, ?ports, "kubelet: cannot bind the pod's ports; it runs without servers");
    *next += 1;
    (address(net, *next), Vec::new())
}

/// The `n`th pod address in 127.<net>/16, skipping .0 and .255 in the last octet.
fn address(net: u8, n: u32) -> Ipv4Addr {
    let n = n + 2 * (n / 254) + 1;
    Ipv4Addr::new(127, net, (n >> 8) as u8, (n & 0xff) as u8)
}

fn pod_key(pod: &Value) -> (String, String) {
    let m = &pod["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&m["namespace"]), s(&m["name"]))
}

fn container_ports(pod: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            p["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
