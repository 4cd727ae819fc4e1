//! Leader election on a coordination.k8s.io/v1 Lease. Only the holder runs ticks.
//!
//! Expiry is judged on this process's own clock: a lease counts as expired when its record has not
//! changed for its duration since we first saw it, so clock skew between pods does not matter.
//! Every write is a replace guarded by resourceVersion, so two candidates never both win.
//!
//! Timing, with D the lease duration: every candidate looks every D/3. A standby takes over at
//! its first look more than D after it first saw the leader's last renewal, which it saw up to
//! D/3 late: between D and 5/3·D after the leader's last renewal. A leader that cannot renew
//! stops acting 2/3·D after its last renewal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

use crate::metrics::Metrics;

pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub is_leader: Arc<AtomicBool>,
    pub metrics: Metrics,
}

impl Elector {
    /// Runs forever, keeping `is_leader` current.
    pub async fn run(self) {
        let mut observed: Option<(String, Instant)> = None;
        let mut last_renew = Instant::now() - self.duration;
        loop {
            match self.step(&mut observed).await {
                Ok(true) => last_renew = Instant::now(),
                Ok(false) => {}
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "lease update failed"),
            }
            // Without a successful renewal for two thirds of the lease duration (two renewals
            // missed), stop acting: a standby takes over no sooner than one lease duration after
            // the last renewal, so two never act at once.
            let leading = last_renew.elapsed() < self.duration * 2 / 3;
            if leading != self.is_leader.swap(leading, Ordering::SeqCst) {
                tracing::info!(identity = %self.identity, leading, "leadership changed");
            }
            self.metrics.leader.set(i64::from(leading));
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// One attempt to acquire or renew. Returns whether we hold the lease now.
    async fn step(&self, observed: &mut Option<(String, Instant)>) -> Result<bool, kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now.clone(), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        // The record's identity: who holds it and when they last renewed.
        let record = format!("{holder}/{:?}", spec.renew_time);
        let first_seen = match observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                *observed = Some((record, Instant::now()));
                Instant::now()
            }
        };
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.identity {
            self.spec(
                spec.acquire_time.unwrap_or_else(|| now.clone()),
                now,
                transitions,
            )
        } else if holder.is_empty() || first_seen.elapsed() > self.duration {
            tracing::info!(previous = %holder, "lease expired; taking over");
            self.spec(now.clone(), now, transitions + 1)
        } else {
            return Ok(false);
        };
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}
