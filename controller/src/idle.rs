//! Idle-release rules, as pure functions of their inputs and a clock passed in.
//!
//! Nothing here reads the time, talks to Kubernetes or knows protobuf: the tick gathers facts,
//! these functions decide, and the tick acts.

use std::time::{Duration, SystemTime};

use sandgate_shared::duration::parse_duration;

/// How long a sandbox may sit idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleTimeout {
    Never,
    After(Duration),
}

/// An `idle-timeout` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idle timeout {0:?}: expected a duration such as 15m, or 0 / never")]
pub struct InvalidTimeout(pub String);

/// `0`, `0s` and `never` mean "never release"; anything else is a duration.
pub fn parse_idle_timeout(s: &str) -> Result<IdleTimeout, InvalidTimeout> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("never") {
        return Ok(IdleTimeout::Never);
    }
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Ok(IdleTimeout::Never),
        Ok(d) => Ok(IdleTimeout::After(d)),
        Err(_) => Err(InvalidTimeout(s.to_string())),
    }
}

/// The pod's annotation, else the pool's default, else the flag. A bad annotation is reported and
/// skipped, never read as "release now".
pub fn effective_timeout(
    annotation: Option<&str>,
    pool_default: Option<IdleTimeout>,
    flag: IdleTimeout,
) -> (IdleTimeout, Option<InvalidTimeout>) {
    let fallback = pool_default.unwrap_or(flag);
    match annotation.map(parse_idle_timeout) {
        Some(Ok(t)) => (t, None),
        Some(Err(e)) => (fallback, Some(e)),
        None => (fallback, None),
    }
}

/// Everything known about when a sandbox was last active, on the controller's clock.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// One entry per replica that answered this tick.
    pub reports: Vec<SystemTime>,
    pub annotation: Option<SystemTime>,
    pub claimed_at: Option<SystemTime>,
    pub created: Option<SystemTime>,
}

impl Evidence {
    /// The latest of every source.
    pub fn last_active(&self) -> Option<SystemTime> {
        self.reports
            .iter()
            .copied()
            .chain(self.annotation)
            .chain(self.claimed_at)
            .chain(self.created)
            .max()
    }
}

/// A replica's report, moved onto the controller's clock. `received` is when the answer arrived
/// (the latest instant it can describe), so a slow answer can only make a sandbox look busier.
pub fn report_time(received: SystemTime, idle: Duration, open_streams: u32) -> SystemTime {
    if open_streams > 0 {
        received
    } else {
        received.checked_sub(idle).unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// How far last-active must move before the annotation is rewritten: the flag, else
/// min(60 s, timeout / 4).
pub fn refresh_interval(timeout: IdleTimeout, flag: Option<Duration>) -> Duration {
    flag.unwrap_or(match timeout {
        IdleTimeout::After(t) => (t / 4).min(Duration::from_secs(60)),
        IdleTimeout::Never => Duration::from_secs(60),
    })
}

/// Whether to write `last-active`: only forward, and only by more than `refresh`.
pub fn annotation_due(
    annotated: Option<SystemTime>,
    last_active: SystemTime,
    refresh: Duration,
) -> bool {
    match annotated {
        None => true,
        Some(a) => last_active > a + refresh,
    }
}

/// What to do with a running sandbox this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it; it becomes releasable in `release_in` (None: never).
    Keep {
        release_in: Option<Duration>,
    },
    Release {
        idle: Duration,
    },
}

pub fn verdict(now: SystemTime, last_active: SystemTime, timeout: IdleTimeout) -> Verdict {
    let idle = now.duration_since(last_active).unwrap_or_default();
    match timeout {
        IdleTimeout::Never => Verdict::Keep { release_in: None },
        IdleTimeout::After(t) if idle > t => Verdict::Release { idle },
        IdleTimeout::After(t) => Verdict::Keep {
            release_in: Some(t - idle),
        },
    }
}

/// RFC 3339 at whole seconds, rounded up so a written last-active is never earlier than the truth.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    jiff::Timestamp::from_second(secs as i64)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// Escapes a map key for a JSON pointer (RFC 6901).
pub fn json_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

pub fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;
    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }
    fn mins(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    #[test]
    fn timeouts_parse_and_fall_back() {
        assert_eq!(parse_idle_timeout("15m"), Ok(IdleTimeout::After(mins(15))));
        for never in ["0", "0s", "never", "Never"] {
            assert_eq!(parse_idle_timeout(never), Ok(IdleTimeout::Never), "{never}");
        }
        let flag = IdleTimeout::After(mins(10));
        let pool = Some(IdleTimeout::After(mins(30)));
        assert_eq!(
            effective_timeout(Some("5m"), pool, flag).0,
            IdleTimeout::After(mins(5))
        );
        assert_eq!(
            effective_timeout(None, pool, flag).0,
            IdleTimeout::After(mins(30))
        );
        assert_eq!(effective_timeout(None, None, flag).0, flag);
        let (t, err) = effective_timeout(Some("soon"), None, flag);
        assert_eq!(t, flag);
        assert!(err.is_some());
    }

    #[test]
    fn last_active_is_the_latest_evidence() {
        let e = Evidence {
            reports: vec![at(10), at(50)],
            annotation: Some(at(40)),
            claimed_at: Some(at(5)),
            created: Some(at(0)),
        };
        assert_eq!(e.last_active(), Some(at(50)));
        let e = Evidence {
            reports: vec![],
            annotation: Some(at(40)),
            claimed_at: Some(at(60)),
            created: Some(at(0)),
        };
        assert_eq!(e.last_active(), Some(at(60)));
        assert_eq!(Evidence::default().last_active(), None);
    }

    #[test]
    fn reports_move_onto_the_controller_clock() {
        assert_eq!(report_time(at(100), Duration::from_secs(30), 0), at(70));
        assert_eq!(report_time(at(100), Duration::from_secs(30), 2), at(100));
    }

    #[test]
    fn verdicts() {
        let t = IdleTimeout::After(mins(10));
        assert_eq!(
            verdict(at(600), at(0), t),
            Verdict::Keep {
                release_in: Some(Duration::ZERO)
            }
        );
        assert_eq!(
            verdict(at(601), at(0), t),
            Verdict::Release {
                idle: Duration::from_secs(601)
            }
        );
        assert_eq!(
            verdict(at(100), at(0), t),
            Verdict::Keep {
                release_in: Some(Duration::from_secs(500))
            }
        );
        assert_eq!(
            verdict(at(99_999), at(0), IdleTimeout::Never),
            Verdict::Keep { release_in: None }
        );
        // Clock skew that puts last-active in the future is "just active".
        assert_eq!(
            verdict(at(0), at(50), t),
            Verdict::Keep {
                release_in: Some(mins(10))
            }
        );
    }

    #[test]
    fn annotations_move_forward_by_more_than_the_refresh_interval() {
        let refresh = refresh_interval(IdleTimeout::After(mins(10)), None);
        assert_eq!(refresh, Duration::from_secs(60)); // min(60 s, 150 s)
        assert_eq!(
            refresh_interval(IdleTimeout::After(mins(2)), None),
            Duration::from_secs(30)
        );
        assert!(annotation_due(None, at(0), refresh));
        assert!(!annotation_due(Some(at(100)), at(160), refresh));
        assert!(annotation_due(Some(at(100)), at(161), refresh));
        assert!(
            !annotation_due(Some(at(100)), at(50), refresh),
            "never backwards"
        );
    }

    #[test]
    fn times_round_up_to_whole_seconds() {
        let t = at(5) + Duration::from_millis(1);
        let s = format_time(t);
        assert!(parse_time(&s).unwrap() >= t, "{s}");
        assert_eq!(parse_time(&format_time(at(5))), Some(at(5)));
    }
}
