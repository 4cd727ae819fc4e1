use super::*;
use crate::index::RouteState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A lookup source whose answer and delay the test controls, counting calls.
struct FakeSource {
    calls: AtomicUsize,
    answer: Mutex<Result<Option<PodRoute>, LookupError>>,
    delay: Duration,
}

impl PodLookup for Arc<FakeSource> {
    fn lookup(&self, _id: SandboxKey) -> BoxFuture<'static, Result<Option<PodRoute>, LookupError>> {
        let this = self.clone();
        Box::pin(async move {
            this.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(this.delay).await;
            this.answer.lock().unwrap().clone()
        })
    }
}

fn route(ip: &str) -> PodRoute {
    PodRoute {
        ip: Some(ip.parse().unwrap()),
        default_port: None,
        h2c: Default::default(),
        state: RouteState::Running,
        pod: 7,
        scope: 0,
    }
}

fn setup(
    answer: Result<Option<PodRoute>, LookupError>,
    delay_ms: u64,
) -> (Arc<FakeSource>, Resolver) {
    let src = Arc::new(FakeSource {
        calls: AtomicUsize::new(0),
        answer: Mutex::new(answer),
        delay: Duration::from_millis(delay_ms),
    });
    let mut reg = prometheus_client::registry::Registry::default();
    let r = Resolver::new(
        Arc::new(RouteIndex::new()),
        Arc::new(src.clone()),
        Duration::from_secs(60),
        Duration::from_millis(500),
        Metrics::new(&mut reg),
    );
    (src, r)
}

#[tokio::test]
async fn concurrent_misses_share_one_lookup() {
    let (src, r) = setup(Ok(Some(route("10.0.0.1"))), 50);
    let r = Arc::new(r);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.resolve("abc").await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Resolved::Found(route("10.0.0.1")));
    }
    assert_eq!(src.calls.load(Ordering::SeqCst), 1);
    // The result went into the index: the next read is a hit.
    assert!(r.index().get("abc").is_some());
}

#[tokio::test]
async fn unknown_ids_are_negatively_cached_until_the_watch_sees_them() {
    let (src, r) = setup(Ok(None), 0);
    assert_eq!(r.resolve("ghost").await, Resolved::Absent);
    assert_eq!(r.resolve("ghost").await, Resolved::Absent);
    assert_eq!(src.calls.load(Ordering::SeqCst), 1);
    // The watch sees the pod appear: the negative entry is dropped and the index answers.
    let key = SandboxKey::new("ghost").unwrap();
    r.index().apply(key, route("10.0.0.2"));
    r.forget_lookup(&key).await;
    assert_eq!(r.resolve("ghost").await, Resolved::Found(route("10.0.0.2")));
}

#[tokio::test]
async fn failures_and_timeouts_are_not_cached() {
    let (src, r) = setup(Err(LookupError::Api("boom".into())), 0);
    assert_eq!(r.resolve("abc").await, Resolved::Failed);
    assert_eq!(r.resolve("abc").await, Resolved::Failed);
    assert_eq!(src.calls.load(Ordering::SeqCst), 2);
    let (_, slow) = setup(Ok(Some(route("10.0.0.1"))), 2_000);
    assert_eq!(slow.resolve("abc").await, Resolved::Failed);
}
