//! One idle-timeout tick: find the replicas, poll them all, annotate, and release.
//!
//! If any replica fails, times out or is not warm, nothing is released this tick; annotations
//! still move forward from the replicas that answered. A release is a JSON patch whose `test`
//! operations pin the pod to the sandbox that was judged idle, so a pod re-claimed or changed in
//! the meantime is left alone (409/422 are skips, not errors).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::Resource;
use sandgate_shared::{Contract, Phase};
use tracing::instrument;

use crate::idle::{self, Evidence, IdleTimeout, Verdict};
use crate::metrics::Metrics;
use crate::poller::{PollResult, Poller};
use crate::replicas::replica_addrs;
use crate::writer::AnnotationWriter;

/// A global limit on pod writes per second.
pub struct RateLimiter(tokio::sync::Mutex<tokio::time::Interval>);

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let mut i = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        RateLimiter(tokio::sync::Mutex::new(i))
    }
    pub async fn acquire(&self) {
        self.0.lock().await.tick().await;
    }
}

pub struct Context {
    pub client: kube::Client,
    pub pods: Vec<Store<Pod>>,
    pub contract: Contract,
    pub default_timeout: IdleTimeout,
    pub refresh: Option<Duration>,
    pub slices: Api<EndpointSlice>,
    pub service: String,
    pub port_name: String,
    pub poller: tokio::sync::Mutex<Poller>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub write_concurrency: usize,
    pub limiter: Arc<RateLimiter>,
    pub writer: Arc<AnnotationWriter>,
    /// The last-active this controller has seen for each running sandbox, kept between ticks. A
    /// replica that restarts forgets activity its last-active annotation has not caught up with
    /// yet (up to a refresh interval); the controller still knows it.
    pub seen: std::sync::Mutex<std::collections::HashMap<String, SystemTime>>,
}

/// The decision for one running sandbox pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub sandbox_id: String,
    pub claimed_at: Option<String>,
    pub has_annotations: bool,
    pub last_active: SystemTime,
    pub verdict: Verdict,
    /// Queue a `last-active` write with this value.
    pub annotate: Option<SystemTime>,
    /// The latest activity the replicas (and earlier ticks) reported.
    pub reported: Option<SystemTime>,
}

/// Plans one pod from the tick's evidence. `None` for pods that are not running sandboxes.
pub fn plan_pod(
    pod: &Pod,
    contract: &Contract,
    reports: Option<&Vec<SystemTime>>,
    default_timeout: IdleTimeout,
    refresh: Option<Duration>,
    now: SystemTime,
) -> Option<PodPlan> {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref()?;
    if labels.get(&contract.label_phase)?.parse::<Phase>().ok()? != Phase::Running
        || meta.deletion_timestamp.is_some()
    {
        return None;
    }
    let sandbox_id = labels.get(&contract.label_sandbox_id)?.clone();
    let ann = meta.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).map(String::as_str);
    let evidence = Evidence {
        reports: reports.cloned().unwrap_or_default(),
        annotation: get(&contract.ann_last_active).and_then(idle::parse_time),
        claimed_at: get(&contract.ann_claimed_at).and_then(idle::parse_time),
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
    };
    let last_active = evidence.last_active().unwrap_or(now);
    let (timeout, bad) =
        idle::effective_timeout(get(&contract.ann_idle_timeout), None, default_timeout);
    if let Some(e) = bad {
        tracing::warn!(pod = meta.name.as_deref().unwrap_or_default(), error = %e, "idle-timeout annotation ignored");
    }
    let refresh = idle::refresh_interval(timeout, refresh);
    let reported = evidence.reports.iter().max().copied();
    let annotate = reported
        .filter(|&t| idle::annotation_due(evidence.annotation, t, refresh) && t >= last_active);
    Some(PodPlan {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        sandbox_id,
        claimed_at: get(&contract.ann_claimed_at).map(str::to_string),
        has_annotations: ann.is_some(),
        last_active,
        verdict: idle::verdict(now, last_active, timeout),
        annotate,
        reported,
    })
}

/// What a tick did.
#[derive(Debug, Default)]
pub struct TickReport {
    pub outcome: &'static str,
    pub released: Vec<String>,
    /// `last-active` writes queued.
    pub annotated: usize,
}

#[instrument(skip_all)]
pub async fn tick(ctx: &Context) -> TickReport {
    let start = Instant::now();
    let report = run_tick(ctx).await;
    ctx.metrics.tick(report.outcome);
    ctx.metrics
        .tick_seconds
        .observe(start.elapsed().as_secs_f64());
    tracing::info!(
        outcome = report.outcome,
        released = report.released.len(),
        annotated = report.annotated,
        took_ms = start.elapsed().as_millis() as u64,
        "tick"
    );
    report
}

async fn run_tick(ctx: &Context) -> TickReport {
    let params =
        ListParams::default().labels(&format!("kubernetes.io/service-name={}", ctx.service));
    let slices = match ctx.slices.list(&params).await {
        Ok(l) => l.items,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list extproc EndpointSlices; tick failed");
            return TickReport {
                outcome: "failed",
                ..Default::default()
            };
        }
    };
    let addrs = replica_addrs(&slices, &ctx.port_name);
    let mut poller = ctx.poller.lock().await;
    let poll = poller.poll(&addrs).await;
    record_poll(ctx, &poll, addrs.is_empty());

    let now = SystemTime::now();
    let plans: Vec<PodPlan> = {
        let mut seen = ctx.seen.lock().unwrap_or_else(|e| e.into_inner());
        let plans: Vec<PodPlan> = ctx
            .pods
            .iter()
            .flat_map(|s| s.state())
            .filter_map(|p| {
                let id = sandbox_id(&p, &ctx.contract);
                let mut reports = poll.activity.get(id).cloned().unwrap_or_default();
                reports.extend(seen.get(id).copied());
                plan_pod(
                    &p,
                    &ctx.contract,
                    Some(&reports),
                    ctx.default_timeout,
                    ctx.refresh,
                    now,
                )
            })
            .collect();
        // Only running sandboxes stay remembered.
        *seen = plans
            .iter()
            .filter_map(|p| Some((p.sandbox_id.clone(), p.reported?)))
            .collect();
        plans
    };
    ctx.metrics.sandboxes_tracked.set(plans.len() as i64);
    let next = plans
        .iter()
        .filter_map(|p| match p.verdict {
            Verdict::Keep { release_in } => release_in,
            Verdict::Release { .. } => Some(Duration::ZERO),
        })
        .min();
    ctx.metrics
        .next_release_seconds
        .set(next.map(|d| d.as_secs() as i64).unwrap_or(-1));

    let annotated = annotate(ctx, &plans);
    if !poll.complete {
        tracing::warn!(failed = ?poll.failed, polled = poll.polled, "not every extproc replica answered warm: no releases this tick");
        return TickReport {
            outcome: if poll.polled == 0 {
                "failed"
            } else {
                "skipped_partial"
            },
            annotated,
            ..Default::default()
        };
    }
    let released = release(ctx, &poller, &plans).await;
    TickReport {
        outcome: "ok",
        released,
        annotated,
    }
}

fn sandbox_id<'a>(p: &'a Pod, c: &Contract) -> &'a str {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(&c.label_sandbox_id))
        .map(String::as_str)
        .unwrap_or_default()
}

fn record_poll(ctx: &Context, poll: &PollResult, none_found: bool) {
    ctx.metrics.replicas_polled.inc_by(poll.polled as u64);
    for (addr, e) in &poll.failed {
        ctx.metrics
            .replicas_failed
            .get_or_create(&crate::metrics::Labels { label: e.label() })
            .inc();
        tracing::warn!(replica = %addr, error = ?e, "extproc replica poll failed");
    }
    if none_found {
        tracing::warn!(service = %ctx.service, "no extproc replicas found in the control Service's EndpointSlices");
    }
}

/// Queues `last-active` writes where due; the writer drains them within the limits.
fn annotate(ctx: &Context, plans: &[PodPlan]) -> usize {
    let mut n = 0;
    for p in plans {
        if let Some(at) = p.annotate {
            ctx.writer.enqueue(&p.namespace, &p.name, at);
            n += 1;
        }
    }
    ctx.metrics
        .annotation_backlog
        .set(ctx.writer.backlog() as i64);
    n
}

/// The guarded release patch for one plan (see [`crate::patches::idle_release`]).
pub fn release_patch(c: &Contract, p: &PodPlan, now: SystemTime) -> serde_json::Value {
    let pod = crate::patches::IdlePod {
        sandbox_id: &p.sandbox_id,
        claimed_at: p.claimed_at.as_deref(),
        has_annotations: p.has_annotations,
        last_active: p.last_active,
    };
    crate::patches::idle_release(c, &pod, now)
}

async fn release(ctx: &Context, poller: &Poller, plans: &[PodPlan]) -> Vec<String> {
    let idle: Vec<(&PodPlan, Duration)> = plans
        .iter()
        .filter_map(|p| match p.verdict {
            Verdict::Release { idle } => Some((p, idle)),
            Verdict::Keep { .. } => None,
        })
        .collect();
    let patched: Vec<Option<(Pod, &PodPlan, Duration)>> = stream::iter(idle)
        .map(|(p, idle)| async move {
            ctx.limiter.acquire().await;
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace);
            let patch: json_patch::Patch = serde_json::from_value(release_patch(&ctx.contract, p, SystemTime::now())).ok()?;
            match api.patch(&p.name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
                Ok(pod) => Some((pod, p, idle)),
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => {
                    ctx.metrics.releases_skipped.get_or_create(&crate::metrics::Labels { label: "conflict" }).inc();
                    tracing::info!(pod = %p.name, sandbox_id = %p.sandbox_id, "pod changed since the decision (re-claimed?): not released");
                    None
                }
                Err(e) => {
                    ctx.metrics.releases_skipped.get_or_create(&crate::metrics::Labels { label: "error" }).inc();
                    tracing::warn!(pod = %p.name, error = %e, "release patch failed");
                    None
                }
            }
        })
        .buffer_unordered(ctx.write_concurrency)
        .collect()
        .await;
    let mut released = Vec::new();
    for (pod, p, idle) in patched.into_iter().flatten() {
        ctx.metrics.releases.inc();
        tracing::info!(pod = %p.name, sandbox_id = %p.sandbox_id, idle_s = idle.as_secs(), "sandbox released for idleness");
        let ev = Event {
            type_: EventType::Normal,
            reason: "IdleTimeout".into(),
            note: Some(format!(
                "sandbox {} released after {}s idle",
                p.sandbox_id,
                idle.as_secs()
            )),
            action: "Release".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &pod.object_ref(&())).await {
            tracing::warn!(pod = %p.name, error = %e, "cannot publish release event");
        }
        released.push(p.sandbox_id.clone());
    }
    // Each eviction answers once the replicas' Envoys hold no hot route to the sandbox.
    futures::stream::iter(&released)
        .for_each_concurrent(ctx.write_concurrency, |id| async move {
            poller.evict_everywhere(id).await;
        })
        .await;
    released
}

#[cfg(test)]
mod tests;
