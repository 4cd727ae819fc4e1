//! A pool's failure backoff: pods that fail one after another (an image that crashes, a bad
//! command) are replaced ever more slowly, the first at once, then 2 s, 4 s, 8 s, … up to 60 s, so a broken template does
//! not churn pods against the API. Each failed pod counts once, by name. The clock is passed in.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The longest wait between replacements.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// How long creates wait after `n` consecutive failures: none for the first, then doubling.
pub fn delay(n: usize) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(n - 1).unwrap_or(u32::MAX).min(6);
    (Duration::from_secs(1) * 2u32.pow(exp)).min(MAX_DELAY)
}

#[derive(Debug, Clone)]
pub struct FailureBackoff {
    failed: HashSet<String>,
    last: Instant,
}

impl FailureBackoff {
    pub fn new(now: Instant) -> Self {
        FailureBackoff {
            failed: HashSet::new(),
            last: now,
        }
    }

    /// Takes one pool pass: the failed pods it sees, and whether a pod turned Ready. A pass with
    /// a Ready pod and no failure ends the streak. Returns how much longer creates wait.
    pub fn observe<'a>(
        &mut self,
        failed: impl IntoIterator<Item = &'a str>,
        became_ready: bool,
        now: Instant,
    ) -> Option<Duration> {
        let mut any = false;
        let mut new = false;
        for name in failed {
            any = true;
            new |= self.failed.insert(name.to_string());
        }
        if new {
            self.last = now;
        } else if !any && became_ready {
            self.failed.clear();
        }
        let wait = delay(self.failed.len());
        let since = now.saturating_duration_since(self.last);
        (since < wait).then(|| wait - since)
    }

    /// Consecutive failures counted so far.
    pub fn failures(&self) -> usize {
        self.failed.len()
    }
}

/// Backoff for an action the API refuses (a pod create over quota): the first retry after
/// [`RETRY_FIRST`], doubling up to [`RETRY_MAX`], whatever else wakes the pool meanwhile; a
/// success resets it.
#[derive(Debug, Clone, Default)]
pub struct RetryBackoff {
    refusals: u32,
    until: Option<Instant>,
    why: Option<String>,
}

pub const RETRY_FIRST: Duration = Duration::from_secs(2);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

impl RetryBackoff {
    /// How much longer to hold off, if at all.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let until = self.until?;
        (now < until).then(|| until - now)
    }

    /// The last refusal, until a success.
    pub fn why(&self) -> Option<&str> {
        self.why.as_deref()
    }

    /// Another refusal: returns how long to hold off.
    pub fn refused(&mut self, why: String, now: Instant) -> Duration {
        self.why = Some(why);
        let exp = self.refusals.min(16);
        self.refusals = self.refusals.saturating_add(1);
        let delay = (RETRY_FIRST * 2u32.pow(exp)).min(RETRY_MAX);
        self.until = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        *self = RetryBackoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_a_minute() {
        let secs: Vec<u64> = (0..10).map(|n| delay(n).as_secs()).collect();
        assert_eq!(secs, [0, 0, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(delay(usize::MAX), MAX_DELAY);
    }

    #[test]
    fn a_streak_of_failures_backs_off_and_a_ready_pod_ends_it() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = FailureBackoff::new(t0);
        // (failed pods seen, a pod became ready, seconds since t0) → expected wait.
        let steps: &[(&[&str], bool, u64, Option<Duration>)] = &[
            (&["a"], false, 0, None),            // the first failure is replaced at once
            (&["a", "b"], false, 1, Some(s(2))), // the second waits 2 s
            (&["a", "b"], false, 3, None),       // the same two, 2 s later: over
            (&["a", "b", "c"], false, 3, Some(s(4))), // a third: 4 s
            (&["c"], false, 4, Some(s(3))),      // old ones gone from the cache: still 3
            (&[], false, 10, None),              // waited out, no recovery yet
            (&["d"], false, 10, Some(s(8))),     // the streak goes on
            (&[], true, 20, None),               // a pod became ready: the streak ends
            (&["e"], false, 21, None),           // a new first failure: at once
        ];
        for (i, (failed, ready, at, want)) in steps.iter().enumerate() {
            let got = b.observe(failed.iter().copied(), *ready, t0 + s(*at));
            assert_eq!(got, *want, "step {i}: {failed:?} ready={ready} at {at}s");
        }
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn refusals_hold_off_ever_longer_until_a_success() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = RetryBackoff::default();
        assert_eq!(b.wait(t0), None, "nothing refused yet");
        let delays: Vec<u64> = (0..6)
            .map(|i| b.refused(format!("no {i}"), t0).as_secs())
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 30, 30]);
        assert_eq!(b.wait(t0 + s(10)), Some(s(20)));
        assert_eq!(b.wait(t0 + s(30)), None);
        assert_eq!(b.why(), Some("no 5"), "the refusal outlives the hold-off");
        b.succeeded();
        assert_eq!(b.why(), None);
        assert_eq!(b.wait(t0), None);
        assert_eq!(b.refused("again".into(), t0), s(2), "a success starts over");
    }

    #[test]
    fn a_failing_pass_never_ends_a_streak() {
        let t0 = Instant::now();
        let mut b = FailureBackoff::new(t0);
        b.observe(["a", "b"], false, t0);
        assert!(
            b.observe(["b"], true, t0).is_some(),
            "a failed pod is still in sight"
        );
        assert_eq!(b.failures(), 2);
    }
}
