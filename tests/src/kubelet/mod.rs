//! A loopback kubelet that works against any API server through a kubeconfig: the real
//! kube-apiserver, the API double, or (for `make run`) either.
//!
//! It registers a Node, schedules the pods of its namespace onto it through the `binding`
//! subresource, runs an HTTP + WebSocket echo server on each container port at a free loopback pod
//! IP, writes `pods/status` (phase, IP, conditions, container statuses) and finishes graceful
//! deletions, as a node's kubelet does. Tests steer it through pod annotations (see [`sim`]): a
//! container that exits, a pod that turns NotReady, a container that never starts, a slow start,
//! a chosen pod IP, a pod that cannot be scheduled.
//!
//! It never runs a real container, so what it proves stops at the API: a real kubelet, a CNI and
//! image pulls stay unproven here.

pub mod sim;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::echo;
use sim::Behaviour;

/// A running kubelet; dropping it stops it and every pod server it runs.
pub struct Kubelet {
    pub node: String,
    task: JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Registers node `node` and runs the pods of `namespace` (every namespace if `None`) on it.
    /// Pod IPs come from 127.<net>.0.0/16, skipping any address another process already serves.
    pub async fn start(
        client: kube::Client,
        namespace: Option<&str>,
        node: &str,
        net: u8,
    ) -> anyhow::Result<Kubelet> {
        register_node(&client, node).await?;
        let pods: Api<Pod> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let state = State {
            client,
            node: node.to_string(),
            net,
            next_ip: 0,
            pods: HashMap::new(),
        };
        let task = tokio::spawn(run(pods, state));
        Ok(Kubelet {
            node: node.to_string(),
            task,
        })
    }
}

/// Creates the Node (if missing) and marks it Ready.
async fn register_node(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                              "sandgate.dev/loopback-kubelet": "true"}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(anyhow::anyhow!("register node {name}: {e}")),
    }
    let now = now();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "loopback kubelet is posting ready status",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                      {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "10000"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "10000"},
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| anyhow::anyhow!("node {name} status: {e}"))?;
    Ok(())
}

/// One pod the kubelet runs.
struct Running {
    ip: Ipv4Addr,
    /// The pod's servers; dropping them closes its ports and cuts its connections.
    servers: Vec<echo::Server>,
    started: String,
}

struct State {
    client: kube::Client,
    node: String,
    net: u8,
    next_ip: u32,
    /// By pod UID.
    pods: HashMap<String, Running>,
}

async fn run(pods: Api<Pod>, mut state: State) {
    // Pods whose start is delayed come back through this channel when their time has come.
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Pod>();
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut latest: HashMap<String, Pod> = HashMap::new();
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    loop {
        let pod = tokio::select! {
            e = events.next() => match e {
                Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => p,
                Some(Ok(watcher::Event::Delete(p))) => {
                    let uid = p.metadata.uid.clone().unwrap_or_default();
                    state.pods.remove(&uid);
                    latest.remove(&uid);
                    first_seen.remove(&uid);
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kubelet: pod watch error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                None => return,
            },
            Some(p) = retry_rx.recv() => {
                // Only if nothing newer arrived meanwhile.
                let uid = p.metadata.uid.clone().unwrap_or_default();
                match latest.get(&uid) {
                    Some(l) if l.metadata.resource_version == p.metadata.resource_version => p,
                    _ => continue,
                }
            }
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        latest.insert(uid.clone(), pod.clone());
        let seen = *first_seen.entry(uid).or_insert_with(Instant::now);
        if let Err(e) = state.handle(&pod, seen, &retry_tx).await {
            tracing::debug!(pod = ?pod.metadata.name, error = %e, "kubelet: will retry on the next event");
        }
    }
}

impl State {
    async fn handle(
        &mut self,
        pod: &Pod,
        first_seen: Instant,
        retry: &mpsc::UnboundedSender<Pod>,
    ) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let sim = sim::sim(pod);

        if pod.metadata.deletion_timestamp.is_some() {
            // The containers stop, then the kubelet confirms the deletion (grace 0, this UID only).
            self.pods.remove(&uid);
            if node.as_deref() == Some(self.node.as_str()) {
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(());
        }
        let Some(node) = node else {
            return self.schedule(&api, pod, &sim).await;
        };
        if node != self.node {
            return Ok(());
        }
        let remaining = sim.start_delay.saturating_sub(first_seen.elapsed());
        if !self.pods.contains_key(&uid) && !remaining.is_zero() {
            let (retry, pod) = (retry.clone(), pod.clone());
            tokio::spawn(async move {
                tokio::time::sleep(remaining).await;
                let _ = retry.send(pod);
            });
            return Ok(());
        }
        self.converge(&api, pod, &sim).await
    }

    /// Binds an unscheduled pod to this node, or says why it cannot be placed.
    async fn schedule(&self, api: &Api<Pod>, pod: &Pod, sim: &sim::Sim) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(message) = &sim.unschedulable {
            let already = pod
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"));
            if !already {
                let patch = sim::unschedulable_patch(message, &now());
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            return Ok(());
        }
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        });
        let body = serde_json::to_vec(&binding)?;
        let req = http::Request::post(format!(
            "/api/v1/namespaces/{}/pods/{name}/binding",
            pod.metadata.namespace.clone().unwrap_or_default()
        ))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)?;
        match self.client.request_text(req).await {
            Ok(_) => Ok(()),
            // Already bound (a watch event older than the binding): the next event shows it.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the pod's servers and status match what its annotations ask for.
    async fn converge(&mut self, api: &Api<Pod>, pod: &Pod, sim: &sim::Sim) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Failed" | "Succeeded")
        );
        if terminal {
            // A finished pod never runs again (the API refuses the transition anyway).
            if let Some(r) = self.pods.get_mut(&uid) {
                r.servers.clear();
            }
            return Ok(());
        }
        if !self.pods.contains_key(&uid) {
            let written = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            let wanted_ip = sim.pod_ip.or(written.and_then(|ip| ip.parse().ok()));
            let servers = if sim.behaviour.serves() {
                Some(self.start_servers(pod, wanted_ip).await)
            } else {
                None
            };
            let (ip, servers) = match servers {
                Some((ip, s)) => (ip, s),
                None => (wanted_ip.unwrap_or_else(|| self.next_address()), Vec::new()),
            };
            self.pods.insert(
                uid.clone(),
                Running {
                    ip,
                    servers,
                    started: now(),
                },
            );
        }
        let running = self.pods.get_mut(&uid).expect("inserted above");
        if !sim.behaviour.serves() {
            running.servers.clear();
        }
        let ip = running.ip.to_string();
        if sim::current(pod) == sim::wanted(pod, &sim.behaviour, &ip) {
            return Ok(());
        }
        let patch = sim::status_patch(pod, &sim.behaviour, &ip, &running.started, &now());
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if let Behaviour::Exit { reason, code } = &sim.behaviour {
            tracing::info!(pod = %name, %reason, code, "kubelet: container exited");
        }
        Ok(())
    }

    /// Starts echo servers on the pod's ports at `wanted` or at the next loopback address where
    /// all of them bind (other test processes use loopback addresses too).
    async fn start_servers(
        &mut self,
        pod: &Pod,
        wanted: Option<Ipv4Addr>,
    ) -> (Ipv4Addr, Vec<echo::Server>) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ports = sim::container_ports(pod);
        let envd_ports = sim::envd_ports(pod);
        let mut candidates = wanted.into_iter().collect::<Vec<_>>();
        for _ in 0..64 {
            candidates.push(self.next_address());
        }
        for ip in candidates {
            let mut servers = Vec::new();
            for &port in &ports {
                let server = if envd_ports.contains(&port) {
                    echo::envd(ip, port).await
                } else {
                    echo::bind(ip, port, name.clone()).await
                };
                match server {
                    Ok(s) => servers.push(s),
                    Err(e) => {
                        tracing::debug!(%ip, port, error = %e, "kubelet: address taken");
                        break;
                    }
                }
            }
            if servers.len() == ports.len() {
                return (ip, servers);
            }
        }
        tracing::warn!(pod = %name, ?ports, "kubelet: cannot bind the pod's ports; it runs without servers");
        (self.next_address(), Vec::new())
    }

    /// The next address in 127.<net>/16, skipping .0 and .255 in the last octet.
    fn next_address(&mut self) -> Ipv4Addr {
        self.next_ip += 1;
        let n = self.next_ip;
        let n = n + 2 * (n / 254) + 1;
        Ipv4Addr::new(127, self.net, (n >> 8) as u8, (n & 0xff) as u8)
    }
}

fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    crate::apidouble::rfc3339(d.as_secs())
}
