use super::*;
use crate::index::{PodRoute, RouteState};
use std::time::{Duration, Instant};

fn running(ip: &str, default_port: Option<u16>, pod: u64) -> PodRoute {
    PodRoute {
        ip: Some(ip.parse().unwrap()),
        default_port,
        h2c: Default::default(),
        state: RouteState::Running,
        pod,
        scope: 0,
    }
}

fn key(s: &str) -> SandboxKey {
    SandboxKey::new(s).unwrap()
}

struct Fixture {
    index: Arc<RouteIndex>,
    activity: Arc<ActivityTable>,
    fast: Arc<FastPath>,
}

fn fixture(enabled: bool, max_routes: usize) -> Fixture {
    let index = Arc::new(RouteIndex::new());
    let activity = Arc::new(ActivityTable::new());
    let mut reg = prometheus_client::registry::Registry::default();
    let fast = FastPath::new(
        FastPathConfig {
            enabled,
            template: RouteTemplate {
                route_config: "sandboxes".into(),
                cluster: "fast".into(),
                cluster_h2: "fast_h2".into(),
                ext_proc_cluster: "pods".into(),
                ext_proc_cluster_h2: "pods_h2".into(),
                response_timeout: Duration::from_secs(300),
                header: "x-dst".into(),
            },
            max_routes,
            ttl: Duration::from_secs(1),
            batch: Duration::from_millis(10),
            activity_interval: Duration::from_secs(1),
            envoy_admin: "127.0.0.1:1".parse().unwrap(),
            envd_port: Some(49983),
        },
        AddressConfig::new(["sandbox.localhost"]).unwrap(),
        Some(80),
        index.clone(),
        activity.clone(),
        FastPathMetrics::new(&mut reg),
        crate::shutdown::channel().1,
    );
    Fixture {
        index,
        activity,
        fast,
    }
}

impl Fixture {
    fn offer(&self, authority: &str, id: &str) {
        let form = if authority.split('.').next().unwrap().contains('-')
            && authority.as_bytes()[0].is_ascii_digit()
        {
            AddressForm::HostWithPort
        } else {
            AddressForm::Host
        };
        self.fast.offer(authority.as_bytes(), form, id);
    }

    fn dest(&self, host: &str) -> Option<String> {
        self.fast.lock_table().get(host).map(|r| r.dest.to_string())
    }
}

#[test]
fn an_offered_host_gets_its_destination_from_the_index() {
    let f = fixture(true, 100);
    f.index
        .apply(key("sbx-a"), running("10.0.0.1", Some(3000), 1));
    f.offer("8080-sbx-a.sandbox.localhost:10000", "sbx-a");
    f.offer("SBX-A.Sandbox.Localhost", "sbx-a");
    // Not in the index (any more): not made hot.
    f.offer("8080-sbx-gone.sandbox.localhost", "sbx-gone");
    f.fast.sync_once();
    assert_eq!(
        f.dest("8080-sbx-a.sandbox.localhost").as_deref(),
        Some("10.0.0.1:8080")
    );
    assert_eq!(
        f.dest("sbx-a.sandbox.localhost").as_deref(),
        Some("10.0.0.1:3000"),
        "the pod's default port"
    );
    assert_eq!(f.dest("8080-sbx-gone.sandbox.localhost"), None);
    assert_eq!(f.fast.len(), 2);
}

#[test]
fn envds_port_is_never_made_hot() {
    let f = fixture(true, 100);
    f.index
        .apply(key("sbx-a"), running("10.0.0.1", Some(49983), 1));
    // By its own port, or as the pod's default port: ext_proc must see every envd path.
    f.offer("49983-sbx-a.sandbox.localhost", "sbx-a");
    f.offer("sbx-a.sandbox.localhost", "sbx-a");
    f.offer("8080-sbx-a.sandbox.localhost", "sbx-a");
    f.fast.sync_once();
    assert_eq!(f.dest("49983-sbx-a.sandbox.localhost"), None);
    assert_eq!(f.dest("sbx-a.sandbox.localhost"), None);
    assert_eq!(
        f.dest("8080-sbx-a.sandbox.localhost").as_deref(),
        Some("10.0.0.1:8080")
    );
}

#[test]
fn only_hosts_are_made_hot() {
    let f = fixture(true, 100);
    f.index.apply(key("sbx-a"), running("10.0.0.1", None, 1));
    for form in [AddressForm::Header, AddressForm::Path] {
        f.fast.offer(b"8080-sbx-a.sandbox.localhost", form, "sbx-a");
    }
    f.fast.offer(
        b"8080-sbx-a.sandbox.localhost.",
        AddressForm::HostWithPort,
        "sbx-a",
    );
    f.fast.offer(b"gateway.example", AddressForm::Host, "sbx-a");
    f.fast.sync_once();
    assert!(f.fast.is_empty());
}

#[test]
fn every_index_change_to_a_hot_sandbox_reaches_its_hosts() {
    let f = fixture(true, 100);
    f.index
        .apply(key("sbx-a"), running("10.0.0.1", Some(3000), 1));
    f.index.apply(key("sbx-b"), running("10.0.0.2", None, 2));
    f.index.apply(key("sbx-c"), running("10.0.0.3", None, 3));
    f.offer("8080-sbx-a.sandbox.localhost", "sbx-a");
    f.offer("sbx-a.sandbox.localhost", "sbx-a");
    f.offer("8080-sbx-b.sandbox.localhost", "sbx-b");
    f.offer("8080-sbx-c.sandbox.localhost", "sbx-c");
    f.fast.sync_once();
    assert_eq!(f.fast.len(), 4);

    // A new IP and a new default port.
    f.index
        .apply(key("sbx-a"), running("10.0.0.9", Some(4000), 1));
    // Released (not routable), and deleted.
    let mut released = running("10.0.0.2", None, 2);
    released.state = RouteState::Gone;
    f.index.apply(key("sbx-b"), released);
    f.index.delete(&key("sbx-c"), 3);
    f.fast.sync_once();
    assert_eq!(
        f.dest("8080-sbx-a.sandbox.localhost").as_deref(),
        Some("10.0.0.9:8080")
    );
    assert_eq!(
        f.dest("sbx-a.sandbox.localhost").as_deref(),
        Some("10.0.0.9:4000")
    );
    assert_eq!(f.dest("8080-sbx-b.sandbox.localhost"), None);
    assert_eq!(f.dest("8080-sbx-c.sandbox.localhost"), None);

    // An eviction from the control API, and a re-list that no longer holds the sandbox.
    f.index.evict(&key("sbx-a"));
    f.fast.sync_once();
    assert!(f.fast.is_empty());
}

#[test]
fn a_change_between_offer_and_sync_is_seen() {
    let f = fixture(true, 100);
    f.index.apply(key("sbx-a"), running("10.0.0.1", None, 1));
    f.offer("8080-sbx-a.sandbox.localhost", "sbx-a");
    // Released after ext_proc routed it, before the sync task ran.
    f.index.evict(&key("sbx-a"));
    f.fast.sync_once();
    assert!(f.fast.is_empty());
}

#[test]
fn past_its_bound_the_table_drops_the_least_recently_active_sandboxes() {
    let f = fixture(true, 20);
    for i in 0..25 {
        let id = format!("sbx-{i}");
        f.index
            .apply(key(&id), running(&format!("10.0.0.{i}"), None, i));
        f.activity.touch_at(key(&id), i as i64 * 1000);
        f.offer(&format!("8080-{id}.sandbox.localhost"), &id);
    }
    f.fast.sync_once();
    // 95% of 20 kept: the six least recently active went.
    assert_eq!(f.fast.len(), 19);
    for i in 0..6 {
        assert_eq!(f.dest(&format!("8080-sbx-{i}.sandbox.localhost")), None);
    }
    assert!(f.dest("8080-sbx-24.sandbox.localhost").is_some());
}

#[test]
fn one_sandbox_cannot_fill_the_table_port_by_port() {
    let f = fixture(true, 1000);
    f.index.apply(key("sbx-a"), running("10.0.0.1", None, 1));
    for port in 1..=40 {
        f.offer(&format!("{port}-sbx-a.sandbox.localhost"), "sbx-a");
    }
    f.fast.sync_once();
    assert_eq!(f.fast.len(), MAX_HOSTS_PER_SANDBOX);
    // Its hot hosts stay hot, and follow the index.
    f.index.apply(key("sbx-a"), running("10.0.0.2", None, 1));
    f.fast.sync_once();
    assert_eq!(f.fast.len(), MAX_HOSTS_PER_SANDBOX);
    assert!(f
        .fast
        .lock_table()
        .iter()
        .all(|(_, r)| r.dest.ip().to_string() == "10.0.0.2"));
}

#[test]
fn switched_off_nothing_is_made_hot() {
    let f = fixture(false, 100);
    f.index.apply(key("sbx-a"), running("10.0.0.1", None, 1));
    f.offer("8080-sbx-a.sandbox.localhost", "sbx-a");
    f.fast.sync_once();
    assert!(f.fast.is_empty());
}

#[test]
fn canonical_hosts_are_lower_case_without_a_port() {
    let c = |a: &str| canonical_host(a.as_bytes()).map(|h| h.into_owned());
    assert_eq!(c("A.B:8080").as_deref(), Some("a.b"));
    assert_eq!(c("a.b").as_deref(), Some("a.b"));
    assert_eq!(c("a.b."), None);
    assert_eq!(c(""), None);
    assert_eq!(c("[::1]").as_deref(), Some("[::1]"));
}

#[test]
fn only_a_destination_taken_away_is_urgent() {
    let f = fixture(true, 100);
    f.index.apply(key("sbx-a"), running("10.0.0.1", None, 1));
    f.offer("8080-sbx-a.sandbox.localhost", "sbx-a");
    f.fast.sync_once();
    // A new host can wait for the batch.
    assert!(!f.fast.urgent_since(0));
    let after_add = f.fast.lock_table().cursor();
    // A new IP cannot, nor can a release.
    f.index.apply(key("sbx-a"), running("10.0.0.2", None, 1));
    f.fast.sync_once();
    assert!(f.fast.urgent_since(after_add));
    let after_move = f.fast.lock_table().cursor();
    assert!(!f.fast.urgent_since(after_move));
    f.index.evict(&key("sbx-a"));
    f.fast.sync_once();
    assert!(f.fast.urgent_since(after_move));
}

#[tokio::test]
async fn settling_waits_for_every_stream_to_apply_the_table() {
    let f = fixture(true, 100);
    f.index.apply(key("sbx-a"), running("10.0.0.1", None, 1));
    f.offer("8080-sbx-a.sandbox.localhost", "sbx-a");
    f.fast.sync_once();
    let added = f.fast.lock_table().cursor();
    // No Envoy connected: nothing to wait for.
    assert!(f.fast.settle(Duration::from_millis(10)).await);
    f.fast.note_stream(1, mark(added, added, None));
    f.fast.note_stream(2, mark(added, u64::MAX, None)); // takes no hot routes
    assert!(f.fast.settle(Duration::from_millis(10)).await);

    // Evicted: the table moves on and stream 1 has not applied it yet.
    f.index.evict(&key("sbx-a"));
    let fast = f.fast.clone();
    let waiter = tokio::spawn(async move { fast.settle(Duration::from_secs(10)).await });
    tokio::time::timeout(Duration::from_secs(5), async {
        while f.fast.lock_table().cursor() == added {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the eviction reaches the table");
    assert!(!waiter.is_finished());
    let removed = f.fast.lock_table().cursor();
    f.fast.note_stream(1, mark(removed, removed, None));
    assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("settled once applied")
        .unwrap());

    // A stream that never applies it: a bounded wait, then false.
    f.index.apply(key("sbx-b"), running("10.0.0.2", None, 2));
    f.offer("8080-sbx-b.sandbox.localhost", "sbx-b");
    assert!(!f.fast.settle(Duration::from_millis(50)).await);
    // A stream that ends is not waited for.
    f.fast.forget_stream(1);
    assert!(f.fast.settle(Duration::from_millis(50)).await);
}

fn mark(needed: u64, applied: u64, seen_until: Option<Instant>) -> StreamMark {
    StreamMark {
        needed,
        applied,
        seen_until,
        unread: seen_until.map(|_| "connection refused".into()),
    }
}

#[test]
fn the_view_is_as_old_as_the_least_recently_read_envoy_holding_hot_routes() {
    let f = fixture(true, 100);
    let now = Instant::now();
    let ago = |ms: u64| now - Duration::from_millis(ms);
    let view = f.fast.completeness(now);
    assert_eq!((view.lag, view.incomplete), (Duration::ZERO, None));
    // Holding nothing does not count; a reading 1 s old is a 1 s gap, still complete.
    f.fast.note_stream(1, mark(0, 0, None));
    f.fast.note_stream(2, mark(0, 0, Some(ago(1000))));
    let view = f.fast.completeness(now);
    assert_eq!(
        (view.lag, view.incomplete),
        (Duration::from_millis(1000), None)
    );
    // Past three reading intervals (3 s here): incomplete, naming the stream and why.
    f.fast.note_stream(3, mark(0, 0, Some(ago(3500))));
    let view = f.fast.completeness(now);
    assert_eq!(view.lag, Duration::from_millis(3500));
    let why = view.incomplete.expect("incomplete");
    assert!(
        why.contains("stream 3") && why.contains("connection refused"),
        "{why}"
    );
    f.fast.forget_stream(3);
    assert!(f.fast.completeness(now).incomplete.is_none());
}
