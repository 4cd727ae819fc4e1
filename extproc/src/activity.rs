//! The activity table: when each sandbox was last used, as this replica saw it, and how many
//! long-lived streams it has open.
//!
//! Times are signed milliseconds on this process's monotonic clock (a sandbox seeded from an
//! annotation may have been active before the process started); the control API reports idle
//! durations, so no wall clock is compared across machines. A touch for a known sandbox is a
//! lock-free map read and a few atomic operations. The change log behind the cursor form of
//! `GetLastActive` takes a mutex only the first time a sandbox changes in a poll epoch.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::index::SandboxKey;

/// One sandbox's activity.
#[derive(Debug)]
struct Activity {
    last_ms: AtomicI64,
    open_streams: AtomicU32,
    /// The poll epoch in which this sandbox was last written to the change log.
    logged_epoch: AtomicU64,
}

/// What a report says about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub id: SandboxKey,
    pub idle: Duration,
    pub open_streams: u32,
}

/// A `GetLastActive` answer before it becomes protobuf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub full: bool,
    pub cursor: u64,
    pub sandboxes: Vec<Report>,
}

#[derive(Default)]
struct ChangeLog {
    /// Sequence number of the last entry pushed.
    seq: u64,
    /// Entries with a sequence at or below this were dropped: older cursors get a full report.
    dropped_through: u64,
    entries: VecDeque<(u64, SandboxKey)>,
}

pub struct ActivityTable {
    entries: papaya::HashMap<SandboxKey, Activity>,
    epoch: AtomicU64,
    log: Mutex<ChangeLog>,
    start: Instant,
}

impl Default for ActivityTable {
    fn default() -> Self {
        Self::new()
    }
}

impl ActivityTable {
    pub fn new() -> Self {
        ActivityTable {
            entries: papaya::HashMap::new(),
            epoch: AtomicU64::new(1),
            log: Mutex::new(ChangeLog::default()),
            start: Instant::now(),
        }
    }

    /// Milliseconds on this table's clock.
    pub fn now_ms(&self) -> i64 {
        self.start.elapsed().as_millis() as i64
    }

    /// Records activity now. Allocates only the first time a sandbox is seen.
    pub fn touch(&self, key: SandboxKey) {
        self.touch_at(key, self.now_ms());
    }

    pub fn touch_at(&self, key: SandboxKey, now_ms: i64) {
        let entries = self.entries.pin();
        let a = match entries.get(key.as_str()) {
            Some(a) => a,
            None => entries.get_or_insert_with(key, || Activity::new(now_ms)),
        };
        a.last_ms.fetch_max(now_ms, SeqCst);
        self.mark_changed(key, a);
    }

    /// A long-lived stream opened (`+1`) or closed (`-1`); both count as activity.
    pub fn stream_delta(&self, key: SandboxKey, opened: bool) {
        let now = self.now_ms();
        let entries = self.entries.pin();
        let a = entries.get_or_insert_with(key, || Activity::new(now));
        a.last_ms.fetch_max(now, SeqCst);
        if opened {
            a.open_streams.fetch_add(1, SeqCst);
        } else {
            let _ = a
                .open_streams
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
        }
        self.mark_changed(key, a);
    }

    /// Seeds a sandbox from its `last-active` annotation (wall clock), never moving it back.
    pub fn seed(&self, key: SandboxKey, last_active: SystemTime) {
        let now_ms = self.now_ms();
        let ago = SystemTime::now()
            .duration_since(last_active)
            .unwrap_or_default();
        let at = now_ms - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX / 2);
        let entries = self.entries.pin();
        let a = entries.get_or_insert_with(key, || Activity::new(at));
        a.last_ms.fetch_max(at, SeqCst);
        self.mark_changed(key, a);
    }

    /// Long-lived streams the sandbox has open on this replica.
    pub fn open_streams(&self, id: &str) -> u32 {
        self.entries
            .pin()
            .get(id)
            .map_or(0, |a| a.open_streams.load(SeqCst))
    }

    /// When the sandbox was last active on this table's clock (`i64::MAX` with a stream open).
    pub fn last_active_ms(&self, id: &str) -> Option<i64> {
        self.entries.pin().get(id).map(|a| {
            if a.open_streams.load(SeqCst) > 0 {
                i64::MAX
            } else {
                a.last_ms.load(SeqCst)
            }
        })
    }

    /// Forgets a sandbox (released or deleted).
    pub fn remove(&self, id: &str) -> bool {
        self.entries.pin().remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The write to `last_ms` above happens before the epoch is read here, and a poll bumps the
    /// epoch before it reads `last_ms` (all SeqCst): either this touch sees the new epoch and logs
    /// itself again, or the poll sees this touch's time. No change is lost between polls.
    fn mark_changed(&self, key: SandboxKey, a: &Activity) {
        let epoch = self.epoch.load(SeqCst);
        if a.logged_epoch.load(SeqCst) != epoch && a.logged_epoch.swap(epoch, SeqCst) != epoch {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            log.seq += 1;
            let seq = log.seq;
            log.entries.push_back((seq, key));
        }
    }

    /// A report: everything when `cursor` is 0 or too old, else what changed after it.
    pub fn snapshot(&self, cursor: u64) -> Snapshot {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, SeqCst);
        let now_ms = self.now_ms();
        let entries = self.entries.pin();
        let report = |key: SandboxKey, a: &Activity| {
            let open = a.open_streams.load(SeqCst);
            let last = a.last_ms.load(SeqCst);
            Report {
                id: key,
                idle: if open > 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(now_ms.saturating_sub(last).max(0) as u64)
                },
                open_streams: open,
            }
        };
        let full = cursor == 0 || cursor < log.dropped_through || cursor > log.seq;
        let sandboxes = if full {
            entries.iter().map(|(k, a)| report(*k, a)).collect()
        } else {
            let mut seen = HashSet::new();
            let from = log.entries.partition_point(|(seq, _)| *seq <= cursor);
            log.entries
                .range(from..)
                .filter(|(_, k)| seen.insert(*k))
                .filter_map(|(_, k)| entries.get(k.as_str()).map(|a| report(*k, a)))
                .collect()
        };
        // Bounded by size only, never by one caller's cursor: another controller (a standby that
        // leads again, the next one in a rollout) may still hold an older cursor, and entries it
        // has not seen must not vanish from its incremental report. A cursor older than what
        // was dropped gets a full report.
        let cap = (entries.len() * 2).max(4096);
        while log.entries.len() > cap {
            if let Some((seq, _)) = log.entries.pop_front() {
                log.dropped_through = seq;
            }
        }
        Snapshot {
            full,
            cursor: log.seq,
            sandboxes,
        }
    }
}

impl Activity {
    fn new(now_ms: i64) -> Self {
        Activity {
            last_ms: AtomicI64::new(now_ms),
            open_streams: AtomicU32::new(0),
            logged_epoch: AtomicU64::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SandboxKey {
        SandboxKey::new(s).unwrap()
    }

    fn ids(s: &Snapshot) -> Vec<&str> {
        let mut v: Vec<&str> = s.sandboxes.iter().map(|r| r.id.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn full_then_delta_reports_only_changes() {
        let t = ActivityTable::new();
        for i in 0..5 {
            t.touch(key(&format!("s{i}")));
        }
        let full = t.snapshot(0);
        assert!(full.full);
        assert_eq!(full.sandboxes.len(), 5);
        t.touch(key("s1"));
        t.touch(key("s1"));
        t.touch(key("s3"));
        let delta = t.snapshot(full.cursor);
        assert!(!delta.full);
        assert_eq!(ids(&delta), ["s1", "s3"]);
        // Nothing changed: an empty delta.
        let again = t.snapshot(delta.cursor);
        assert!(again.sandboxes.is_empty() && !again.full);
    }

    #[test]
    fn idle_is_measured_on_the_table_clock_and_zero_with_open_streams() {
        let t = ActivityTable::new();
        t.touch_at(key("a"), 0);
        let s = t.snapshot(0);
        assert!(
            s.sandboxes[0].idle
                >= Duration::from_millis(t.now_ms().saturating_sub(1).max(0) as u64)
        );
        t.stream_delta(key("a"), true);
        let s = t.snapshot(s.cursor);
        assert_eq!(
            (s.sandboxes[0].idle, s.sandboxes[0].open_streams),
            (Duration::ZERO, 1)
        );
        t.stream_delta(key("a"), false);
        t.stream_delta(key("a"), false); // never below zero
        let s = t.snapshot(s.cursor);
        assert_eq!(s.sandboxes[0].open_streams, 0);
    }

    #[test]
    fn two_pollers_each_see_every_change_after_their_own_cursor() {
        let t = ActivityTable::new();
        t.stream_delta(key("ws"), true);
        // Both pollers have seen the stream open.
        let b = t.snapshot(0).cursor;
        t.stream_delta(key("ws"), false);
        // Poller A sees it close, and polls again with the cursor it was given.
        let a = t.snapshot(b);
        assert_eq!(a.sandboxes[0].open_streams, 0);
        assert!(
            t.snapshot(a.cursor).sandboxes.is_empty(),
            "nothing new for A"
        );
        // Poller B, with its older cursor, must see the close too, or it keeps the stream open
        // (or an old idle time) for as long as it gets incremental reports.
        let seen_by_b = t.snapshot(b);
        assert!(!seen_by_b.full);
        assert_eq!(
            seen_by_b
                .sandboxes
                .iter()
                .map(|r| (r.id.as_str(), r.open_streams))
                .collect::<Vec<_>>(),
            [("ws", 0)]
        );
    }

    #[test]
    fn a_stale_or_foreign_cursor_gets_a_full_report() {
        let t = ActivityTable::new();
        t.touch(key("a"));
        let s = t.snapshot(0);
        assert!(t.snapshot(s.cursor + 100).full);
    }

    #[test]
    fn seeding_never_moves_activity_back() {
        let t = ActivityTable::new();
        std::thread::sleep(Duration::from_millis(5));
        t.touch(key("a"));
        t.seed(key("a"), SystemTime::now() - Duration::from_secs(3600));
        assert!(t.snapshot(0).sandboxes[0].idle < Duration::from_secs(1));
        t.seed(key("b"), SystemTime::now() - Duration::from_secs(3600));
        let b = t
            .snapshot(0)
            .sandboxes
            .into_iter()
            .find(|r| r.id.as_str() == "b")
            .unwrap();
        // An hour before this process started is still an hour ago.
        assert!(b.idle >= Duration::from_secs(3599), "{:?}", b.idle);
    }

    #[test]
    fn a_touch_between_two_polls_is_always_in_the_second() {
        use std::sync::Arc;
        // Touch n happens at a time that names it: 100 s apart, far in the past, so the idle time
        // a poll reports tells which touch it saw despite a few ms of clock reading.
        const BASE: i64 = -1_000_000_000_000;
        const STEP: i64 = 100_000;
        let at = |n: u64| BASE + n as i64 * STEP;
        let touch_number = |idle: Duration, now_ms: i64| {
            let last = now_ms - idle.as_millis() as i64;
            ((last - BASE + STEP / 2) / STEP) as u64
        };
        let t = Arc::new(ActivityTable::new());
        let k = key("busy");
        t.touch_at(k, at(0));
        let mut cursor = t.snapshot(0).cursor;
        // Touch n sets `done` to n when it returns.
        let started = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (t, started, done, stop) = (t.clone(), started.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let n = started.fetch_add(1, SeqCst) + 1;
                    t.touch_at(k, at(n));
                    done.fetch_add(1, SeqCst);
                    // Pauses, so that a touch is sometimes the last one before a poll.
                    if n % 8 == 0 {
                        std::thread::sleep(Duration::from_micros(30));
                    }
                }
            })
        };
        // Every touch that returned before a poll began was reported by that poll or an earlier
        // one, with its own time or a later one.
        let mut reported = 0;
        let mut checked = 0;
        for _ in 0..300 {
            std::thread::sleep(Duration::from_micros(100));
            let done_before = done.load(SeqCst);
            let s = t.snapshot(cursor);
            let now = t.now_ms();
            cursor = s.cursor;
            if let Some(r) = s.sandboxes.first() {
                reported = reported.max(touch_number(r.idle, now));
            }
            if done_before > 0 {
                checked += 1;
                assert!(
                    reported >= done_before,
                    "touch {done_before} had returned, but the latest reported is touch {reported}"
                );
            }
        }
        stop.store(true, SeqCst);
        writer.join().unwrap();
        assert!(checked > 0, "the writer never ran between polls");
    }
}
