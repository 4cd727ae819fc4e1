//! What the loopback kubelet makes of a pod: the pure part. A pod's `kubelet.sandgate.dev/*`
//! annotations say what its container should do (run, turn NotReady, exit, never start); this
//! module turns a pod and that wish into the status the kubelet writes. No client, no I/O.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

/// The annotation prefix a test uses to steer the kubelet.
pub const PREFIX: &str = "kubelet.sandgate.dev/";

/// What a pod's container does, from its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Runs and serves its ports; Ready unless `ready` is false.
    Run { ready: bool },
    /// Exited with `code` (`reason` such as OOMKilled, Error, Completed): phase Failed, or
    /// Succeeded for code 0. The pod keeps its IP, as on a real node.
    Exit { reason: String, code: i32 },
    /// Evicted by the node: phase Failed, `status.reason` Evicted.
    Evicted { message: String },
    /// Never starts: the container waits with `reason` (ErrImagePull, ImagePullBackOff,
    /// CrashLoopBackOff, …); phase Pending.
    Waiting { reason: String, message: String },
}

/// A test's instructions for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sim {
    pub behaviour: Behaviour,
    /// How long after binding the container starts.
    pub start_delay: Duration,
    /// The pod IP to use (to hand a dead pod's IP to another pod).
    pub pod_ip: Option<std::net::Ipv4Addr>,
    /// Not bound to the node: PodScheduled False, reason Unschedulable, with this message.
    pub unschedulable: Option<String>,
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(&format!("{PREFIX}{key}"))
        .map(String::as_str)
}

/// Reads a pod's instructions. Unparseable values are ignored (the default: run and be Ready).
pub fn sim(pod: &Pod) -> Sim {
    let split = |v: &str| match v.split_once(':') {
        Some((a, b)) => (a.trim().to_string(), b.trim().to_string()),
        None => (v.trim().to_string(), String::new()),
    };
    let behaviour = if let Some(v) = annotation(pod, "exit") {
        let (reason, code) = split(v);
        Behaviour::Exit {
            code: code.parse().unwrap_or(1),
            reason,
        }
    } else if let Some(message) = annotation(pod, "evict") {
        Behaviour::Evicted {
            message: message.to_string(),
        }
    } else if let Some(v) = annotation(pod, "waiting") {
        let (reason, message) = split(v);
        Behaviour::Waiting { reason, message }
    } else {
        Behaviour::Run {
            ready: annotation(pod, "ready") != Some("false"),
        }
    };
    Sim {
        behaviour,
        start_delay: annotation(pod, "start-delay")
            .and_then(|d| sandgate_shared::duration::parse_duration(d).ok())
            .unwrap_or_default(),
        pod_ip: annotation(pod, "pod-ip").and_then(|ip| ip.parse().ok()),
        unschedulable: annotation(pod, "unschedulable").map(str::to_string),
    }
}

impl Behaviour {
    /// Whether the container's ports are served.
    pub fn serves(&self) -> bool {
        matches!(self, Behaviour::Run { .. })
    }
}

/// The part of a pod's status the kubelet decides, to compare what is written with what is wanted
/// (timestamps left out, so a written status is not written again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub phase: String,
    pub pod_ip: Option<String>,
    pub ready: bool,
    /// Each container's state kind and reason, e.g. `running`, `terminated:OOMKilled:137`.
    pub containers: Vec<String>,
}

/// What a pod's status says now.
pub fn current(pod: &Pod) -> Summary {
    let status = pod.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let containers = status
        .container_statuses
        .iter()
        .flatten()
        .map(|c| {
            let s = c.state.clone().unwrap_or_default();
            if let Some(t) = s.terminated {
                format!(
                    "terminated:{}:{}",
                    t.reason.unwrap_or_default(),
                    t.exit_code
                )
            } else if let Some(w) = s.waiting {
                format!("waiting:{}", w.reason.unwrap_or_default())
            } else if s.running.is_some() {
                "running".to_string()
            } else {
                String::new()
            }
        })
        .collect();
    Summary {
        phase: status.phase.unwrap_or_default(),
        pod_ip: status.pod_ip,
        ready,
        containers,
    }
}

/// What the status should say for `behaviour` with the pod at `ip`.
pub fn wanted(pod: &Pod, behaviour: &Behaviour, ip: &str) -> Summary {
    let n = containers(pod).len();
    let (phase, ready, state) = match behaviour {
        Behaviour::Run { ready } => ("Running", *ready, "running".to_string()),
        Behaviour::Exit { reason, code } => (
            if *code == 0 { "Succeeded" } else { "Failed" },
            false,
            format!("terminated:{reason}:{code}"),
        ),
        Behaviour::Evicted { .. } => ("Failed", false, "terminated:Error:137".to_string()),
        Behaviour::Waiting { reason, .. } => ("Pending", false, format!("waiting:{reason}")),
    };
    Summary {
        phase: phase.to_string(),
        pod_ip: Some(ip.to_string()),
        ready,
        containers: vec![state; n],
    }
}

fn containers(pod: &Pod) -> Vec<(String, String)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect()
}

/// The container ports the kubelet serves, sorted and without duplicates.
pub fn container_ports(pod: &Pod) -> Vec<u16> {
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The container ports served by sandgate-envd: port 49983 of containers whose image is
/// `sandgate-envd` (or `sandgate-envd:<tag>`), which the kubelet runs as the real binary.
pub fn envd_ports(pod: &Pod) -> Vec<u16> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter(|c| {
            c.image
                .as_deref()
                .is_some_and(|i| i == "sandgate-envd" || i.starts_with("sandgate-envd:"))
        })
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .filter(|p| *p == 49983)
        .collect()
}

/// The `pods/status` merge patch for `behaviour`. `started` is when the container started, `now`
/// the time of this write (both RFC 3339).
pub fn status_patch(pod: &Pod, behaviour: &Behaviour, ip: &str, started: &str, now: &str) -> Value {
    let want = wanted(pod, behaviour, ip);
    let flag = |b: bool| if b { "True" } else { "False" };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let statuses: Vec<Value> = containers(pod)
        .into_iter()
        .map(|(name, image)| {
            let state = match behaviour {
                Behaviour::Run { .. } => json!({"running": {"startedAt": started}}),
                Behaviour::Exit { reason, code } => json!({"terminated": {
                    "exitCode": code, "reason": reason, "startedAt": started, "finishedAt": now,
                    "containerID": format!("sandgate://{uid}/{name}"),
                }}),
                Behaviour::Evicted { .. } => json!({"terminated": {
                    "exitCode": 137, "reason": "Error", "startedAt": started, "finishedAt": now,
                    "containerID": format!("sandgate://{uid}/{name}"),
                }}),
                Behaviour::Waiting { reason, message } => {
                    json!({"waiting": {"reason": reason, "message": message}})
                }
            };
            let ran = !matches!(behaviour, Behaviour::Waiting { .. });
            let mut s = json!({
                "name": name, "image": image, "imageID": if ran { format!("sandgate://{image}") } else { String::new() },
                "ready": want.ready, "started": matches!(behaviour, Behaviour::Run { .. }),
                "restartCount": 0, "state": state,
            });
            if ran {
                s["containerID"] = json!(format!("sandgate://{uid}/{name}"));
            }
            s
        })
        .collect();
    let condition = |type_: &str, status: bool| json!({"type": type_, "status": flag(status), "lastTransitionTime": now});
    let mut status = json!({
        "phase": want.phase,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": started,
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", want.ready),
            condition("Ready", want.ready),
        ],
        "containerStatuses": statuses,
    });
    if let Behaviour::Evicted { message } = behaviour {
        status["reason"] = json!("Evicted");
        status["message"] = json!(message);
    }
    json!({ "status": status })
}

/// The status patch of a pod the scheduler cannot place.
pub fn unschedulable_patch(message: &str, now: &str) -> Value {
    json!({"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastTransitionTime": now,
    }]}})
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-12-01T10:00:00Z";
    const T1: &str = "2026-12-01T10:00:05Z";

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), json!(v)))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u1", "annotations": annotations},
            "spec": {"containers": [{"name": "c", "image": "img", "ports": [
                {"containerPort": 8080}, {"containerPort": 3000}, {"containerPort": 8080}]}]},
        }))
        .unwrap()
    }

    #[test]
    fn annotations_say_what_the_container_does() {
        let cases: &[(&[(&str, &str)], Behaviour)] = &[
            (&[], Behaviour::Run { ready: true }),
            (&[("ready", "false")], Behaviour::Run { ready: false }),
            (
                &[("exit", "OOMKilled:137")],
                Behaviour::Exit {
                    reason: "OOMKilled".into(),
                    code: 137,
                },
            ),
            (
                &[("exit", "Completed:0"), ("ready", "false")],
                Behaviour::Exit {
                    reason: "Completed".into(),
                    code: 0,
                },
            ),
            (
                &[("waiting", "ErrImagePull: no such image")],
                Behaviour::Waiting {
                    reason: "ErrImagePull".into(),
                    message: "no such image".into(),
                },
            ),
            (
                &[("evict", "low on memory")],
                Behaviour::Evicted {
                    message: "low on memory".into(),
                },
            ),
        ];
        for (annotations, want) in cases {
            assert_eq!(&sim(&pod(annotations)).behaviour, want, "{annotations:?}");
        }
        let s = sim(&pod(&[
            ("start-delay", "2s"),
            ("pod-ip", "127.9.0.7"),
            ("unschedulable", "0/1 nodes"),
        ]));
        assert_eq!(s.start_delay, Duration::from_secs(2));
        assert_eq!(s.pod_ip, Some("127.9.0.7".parse().unwrap()));
        assert_eq!(s.unschedulable.as_deref(), Some("0/1 nodes"));
    }

    #[test]
    fn a_written_status_reads_back_as_wanted() {
        for b in [
            Behaviour::Run { ready: true },
            Behaviour::Run { ready: false },
            Behaviour::Exit {
                reason: "OOMKilled".into(),
                code: 137,
            },
            Behaviour::Exit {
                reason: "Completed".into(),
                code: 0,
            },
            Behaviour::Evicted {
                message: "x".into(),
            },
            Behaviour::Waiting {
                reason: "ImagePullBackOff".into(),
                message: String::new(),
            },
        ] {
            let mut p = pod(&[]);
            let patch = status_patch(&p, &b, "127.1.0.2", T0, T1);
            p.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
            assert_eq!(current(&p), wanted(&p, &b, "127.1.0.2"), "{b:?}");
        }
        let mut p = pod(&[]);
        let patch = status_patch(&p, &Behaviour::Run { ready: true }, "127.1.0.2", T0, T0);
        p.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        assert_ne!(
            current(&p),
            wanted(&p, &Behaviour::Run { ready: false }, "127.1.0.2")
        );
    }

    #[test]
    fn ports_are_sorted_and_unique() {
        assert_eq!(container_ports(&pod(&[])), vec![3000, 8080]);
    }
}
