//! The `last-active` annotation writer: a background queue, coalesced per pod, drained within the
//! global write-rate limit and a concurrency bound.
//!
//! Ticks only enqueue, so a tick's duration does not grow with the number of busy sandboxes, and a
//! backlog never turns into duplicate writes: a pod queued twice is written once, with the later time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::Notify;

use crate::idle::format_time;
use crate::metrics::Metrics;
use crate::tick::RateLimiter;

type PodKey = (String, String);

#[derive(Default)]
pub struct AnnotationWriter {
    pending: Mutex<HashMap<PodKey, SystemTime>>,
    wake: Notify,
}

impl AnnotationWriter {
    /// Queues `at` for a pod; a later time replaces an earlier one still queued.
    pub fn enqueue(&self, namespace: &str, name: &str, at: SystemTime) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.entry((namespace.to_string(), name.to_string()))
            .and_modify(|t| *t = (*t).max(at))
            .or_insert(at);
        drop(p);
        self.wake.notify_one();
    }

    pub fn backlog(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take(&self, n: usize) -> Vec<(PodKey, SystemTime)> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<PodKey> = p.keys().take(n).cloned().collect();
        keys.into_iter()
            .filter_map(|k| p.remove(&k).map(|t| (k, t)))
            .collect()
    }

    /// Drains the queue forever.
    pub async fn run(
        self: Arc<Self>,
        client: kube::Client,
        annotation: String,
        limiter: Arc<RateLimiter>,
        concurrency: usize,
        metrics: Metrics,
    ) {
        loop {
            self.wake.notified().await;
            loop {
                let batch = self.take(256);
                if batch.is_empty() {
                    break;
                }
                stream::iter(batch)
                    .for_each_concurrent(concurrency, |((ns, name), at)| {
                        let (client, annotation, limiter, metrics) = (client.clone(), &annotation, limiter.clone(), metrics.clone());
                        async move {
                            limiter.acquire().await;
                            let patch = crate::patches::annotation(annotation, &format_time(at));
                            let api: Api<Pod> = Api::namespaced(client, &ns);
                            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                                Ok(_) => {
                                    metrics.annotation_writes.inc();
                                }
                                Err(kube::Error::Api(e)) if e.code == 404 => {}
                                Err(e) => {
                                    metrics.annotation_write_errors.inc();
                                    tracing::warn!(pod = %name, error = %e, "last-active annotation write failed");
                                }
                            };
                        }
                    })
                    .await;
                metrics.annotation_backlog.set(self.backlog() as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn queued_writes_coalesce_to_the_latest_time() {
        let w = AnnotationWriter::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        w.enqueue("ns", "p", t);
        w.enqueue("ns", "p", t + Duration::from_secs(5));
        w.enqueue("ns", "p", t);
        w.enqueue("ns", "q", t);
        assert_eq!(w.backlog(), 2);
        let mut batch = w.take(10);
        batch.sort();
        assert_eq!(
            batch[0],
            (("ns".into(), "p".into()), t + Duration::from_secs(5))
        );
        assert_eq!(w.backlog(), 0);
    }
}
