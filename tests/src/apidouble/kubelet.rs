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
    let mut backlog: std::collections::VecDeque<(EventType, String, Value)> = Default::default();
    loop {
        let (kind, namespace, object) = match backlog.pop_front() {
            Some(c) => c,
            None => match changes.recv().await {
                Ok(c) if c.resource == "pods" => (c.kind, c.namespace.clone(), c.object.clone()),
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
                    backlog.extend(pods.into_iter().map(|p| {
                        let ns = pod_key(&p).0;
                        (EventType::Added, ns, p)
                    }));
                    continue;
                }
                Err(_) => return,
            },
        };
        let change = PodChange {
            kind,
            namespace,
            object,
        };
        let name = change.object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = (change.namespace.clone(), name.clone());
        if change.kind == EventType::Deleted {
            for h in servers.remove(&key).unwrap_or_default() {
                h.abort();
            }
            continue;
        }
        let has_ip = change.object["status"]["podIP"].is_string();
        if has_ip
            || servers.contains_key(&key)
            || change.object["metadata"]["deletionTimestamp"].is_string()
        {
            continue;
        }
        // The first address where every container port binds: another test process may use
        // the same /16 at the same time.
        let ports = container_ports(&change.object);
        let mut attempts = 0;
        let (ip, handles) = loop {
            attempts += 1;
            next += 1;
            // Skip .0 and .255 in the last octet.
            let n = next + 2 * (next / 254) + 1;
            let ip = Ipv4Addr::new(127, net, (n >> 8) as u8, (n & 0xff) as u8);
            let mut handles = Vec::new();
            for &port in &ports {
                match echo::bind(ip, port, name.clone()).await {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        tracing::debug!(%ip, port, error = %e, "kubelet: address taken; next one");
                        break;
                    }
                }
            }
            if handles.len() == ports.len() {
                break (ip, handles);
            }
            if attempts == 64 {
                tracing::warn!(pod = %name, ?ports, "kubelet: cannot bind the pod's ports; it runs without servers");
                break (ip, handles);
            }
            for h in handles {
                h.abort();
            }
        };
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
        if let Err(e) = store.patch(
            "pods",
            &change.namespace,
            &name,
            PatchKind::Merge,
            &status,
            true,
        ) {
            tracing::warn!(pod = %name, error = ?e, "kubelet: status update failed");
        }
    }
}

/// One change the kubelet acts on.
struct PodChange {
    kind: EventType,
    namespace: String,
    object: Value,
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
