//! Long-lived streams (WebSockets, SSE, long polls) open on this replica's Envoy, by request ID.
//!
//! A stream opens when ext_proc routes an upgrade request (so a silent WebSocket counts from its
//! first byte, whatever Envoy's access-log flush interval), or at the first periodic access-log
//! entry of any other long request. It closes at its DownstreamEnd entry, when the Envoy that
//! reported it disconnects, or when nothing refreshed it for its expiry: the expiry its last
//! refresher gave (three of that Envoy's flush intervals and a little, when the Envoy says its
//! interval), else the table's. Each stream counts in its sandbox's open streams in the
//! [`ActivityTable`]; an open stream is activity. An expiry is logged: it means an end entry was
//! lost (Envoy dropped access-log entries) or periodic ones stopped coming.
//!
//! Keys are (sandbox, request ID): a client that reuses request IDs can only confuse the count of
//! its own sandbox. Upgrade requests are rare beside plain ones, so a mutex is fine here; the
//! per-request hot path never takes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::activity::ActivityTable;
use crate::index::SandboxKey;

type Key = (SandboxKey, String);

/// When a stream was last seen, on the activity table's clock, and how long it may go unseen.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at_ms: i64,
    expiry_ms: i64,
}

pub struct StreamTable {
    activity: Arc<ActivityTable>,
    open: Mutex<HashMap<Key, Seen>>,
    expiry: Duration,
}

impl StreamTable {
    pub fn new(activity: Arc<ActivityTable>, expiry: Duration) -> Self {
        StreamTable {
            activity,
            open: Mutex::new(HashMap::new()),
            expiry,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Seen>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The expiry of streams whose refresher does not say its own.
    pub fn default_expiry(&self) -> Duration {
        self.expiry
    }

    /// A stream is open (an upgrade just routed, or a periodic access-log entry); refreshes it if
    /// it already is. Returns whether it was new.
    pub fn seen(&self, sandbox: SandboxKey, request_id: &str) -> bool {
        self.seen_within(sandbox, request_id, self.expiry)
    }

    /// As [`Self::seen`], by a refresher that will refresh it again within `expiry` while it is
    /// open.
    pub fn seen_within(&self, sandbox: SandboxKey, request_id: &str, expiry: Duration) -> bool {
        let now = self.activity.now_ms();
        let seen = Seen {
            at_ms: now,
            expiry_ms: i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX),
        };
        let mut open = self.lock();
        match open.get_mut(&(sandbox, request_id.to_string())) {
            Some(t) => {
                *t = seen;
                drop(open);
                self.activity.touch_at(sandbox, now);
                false
            }
            None => {
                open.insert((sandbox, request_id.to_string()), seen);
                drop(open);
                tracing::debug!(sandbox_id = sandbox.as_str(), request_id, "stream open");
                self.activity.stream_delta(sandbox, true);
                true
            }
        }
    }

    /// A stream ended. Returns whether it was open.
    pub fn ended(&self, sandbox: SandboxKey, request_id: &str) -> bool {
        let was_open = self
            .lock()
            .remove(&(sandbox, request_id.to_string()))
            .is_some();
        if was_open {
            tracing::debug!(sandbox_id = sandbox.as_str(), request_id, "stream closed");
            self.activity.stream_delta(sandbox, false);
        }
        was_open
    }

    /// Closes streams nothing refreshed within their expiry. Returns how many.
    pub fn expire(&self) -> usize {
        let now = self.activity.now_ms();
        let mut gone = Vec::new();
        self.lock().retain(|(sandbox, id), seen| {
            let keep = now.saturating_sub(seen.at_ms) <= seen.expiry_ms;
            if !keep {
                gone.push((*sandbox, id.clone(), now - seen.at_ms));
            }
            keep
        });
        for (sandbox, request_id, unseen_ms) in &gone {
            tracing::warn!(
                sandbox_id = sandbox.as_str(),
                request_id,
                unseen_ms,
                "stream taken as closed: no access-log entry refreshed it in time (its end entry was lost, or envoy stopped sending periodic ones)"
            );
            self.activity.stream_delta(*sandbox, false);
        }
        gone.len()
    }

    /// Every open stream.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(expiry: Duration) -> (Arc<ActivityTable>, StreamTable) {
        let activity = Arc::new(ActivityTable::new());
        (activity.clone(), StreamTable::new(activity, expiry))
    }

    fn open_streams(a: &ActivityTable, id: &str) -> u32 {
        a.snapshot(0)
            .sandboxes
            .iter()
            .find(|r| r.id.as_str() == id)
            .map(|r| r.open_streams)
            .unwrap_or(0)
    }

    fn key(id: &str) -> SandboxKey {
        SandboxKey::new(id).unwrap()
    }

    #[test]
    fn a_stream_counts_once_from_its_open_to_its_end() {
        let (a, t) = table(Duration::from_secs(60));
        assert!(t.seen(key("ws"), "r1"));
        assert!(!t.seen(key("ws"), "r1"), "a refresh is not a new stream");
        assert!(t.seen(key("ws"), "r2"));
        assert_eq!((open_streams(&a, "ws"), a.open_streams("ws")), (2, 2));
        assert!(t.ended(key("ws"), "r1"));
        assert!(!t.ended(key("ws"), "r1"), "ended twice");
        assert!(!t.ended(key("ws"), "never-opened"));
        assert_eq!((open_streams(&a, "ws"), t.len()), (1, 1));
    }

    #[test]
    fn the_same_request_id_in_another_sandbox_is_another_stream() {
        let (a, t) = table(Duration::from_secs(60));
        t.seen(key("a"), "r");
        t.seen(key("b"), "r");
        t.ended(key("a"), "r");
        assert_eq!((open_streams(&a, "a"), open_streams(&a, "b")), (0, 1));
    }

    #[test]
    fn each_stream_expires_by_what_its_last_refresher_said() {
        let (a, t) = table(Duration::from_secs(60));
        t.seen_within(key("ws"), "quick", Duration::ZERO);
        t.seen_within(key("ws"), "slow", Duration::from_secs(60));
        // Refreshed by a refresher without an expiry of its own: the table's.
        t.seen_within(key("ws"), "refreshed", Duration::ZERO);
        t.seen(key("ws"), "refreshed");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.expire(), 1);
        assert_eq!((open_streams(&a, "ws"), t.len()), (2, 2));
    }

    #[test]
    fn unrefreshed_streams_expire() {
        let (a, t) = table(Duration::ZERO);
        t.seen(key("ws"), "r1");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.expire(), 1);
        assert_eq!((open_streams(&a, "ws"), t.len()), (0, 0));
    }
}
