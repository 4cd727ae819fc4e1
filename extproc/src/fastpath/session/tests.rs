use super::*;
use crate::fastpath::table::HotRoute;
use crate::index::SandboxKey;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use std::sync::Arc;

const TTL: Duration = Duration::from_secs(1);

fn template() -> Arc<RouteTemplate> {
    Arc::new(RouteTemplate {
        route_config: "rc".into(),
        cluster: "fast".into(),
        cluster_h2: "fast_h2".into(),
        header: "x-dst".into(),
        ext_proc_cluster: "pods".into(),
        ext_proc_cluster_h2: "pods_h2".into(),
        response_timeout: Duration::from_secs(300),
    })
}

fn hot(t: &mut HotTable, host: &str, sandbox: &str, dest: &str) {
    t.set(
        host,
        Some(HotRoute {
            sandbox: SandboxKey::new(sandbox).unwrap(),
            dest: dest.parse().unwrap(),
            h2: false,
        }),
    );
}

fn subscribe(type_url: &str, initial: &[(&str, &str)]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: if type_url == RUNTIME_TYPE {
            vec![RUNTIME_LAYER.into()]
        } else {
            vec![]
        },
        initial_resource_versions: initial
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn ack(type_url: &str, nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// A session whose Envoy's counters are read (so it may hold hot routes), as the ADS stream sets it.
fn session(enabled: bool) -> Session {
    let mut s = Session::new(template(), TTL, enabled, "tok".into());
    s.set_serving(enabled);
    s
}

/// The validity flag a runtime push sets: `Some(100.0)` on, `Some(0.0)` off, `None` for a removed
/// layer.
fn flag(r: &DeltaDiscoveryResponse) -> Option<f64> {
    use envoy_types::pb::envoy::service::runtime::v3::Runtime;
    use envoy_types::pb::google::protobuf::value::Kind;
    use prost::Message;
    let res = r.resources.first()?;
    let rt = Runtime::decode(res.resource.as_ref()?.value.as_slice()).ok()?;
    let fields = rt.layer?.fields;
    assert_eq!(
        fields[crate::fastpath::observe::STREAM_KEY].kind,
        Some(Kind::StringValue("tok".into())),
        "every layer carries the stream's token"
    );
    match fields[crate::fastpath::resources::VALID_KEY].kind {
        Some(Kind::NumberValue(v)) => Some(v),
        _ => None,
    }
}

fn names(r: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
    let mut up: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
    let mut rm: Vec<&str> = r.removed_resources.iter().map(String::as_str).collect();
    up.sort();
    rm.sort();
    (up, rm)
}

/// A session subscribed to both types, its first push acknowledged.
fn synced(table: &HotTable, now: Instant) -> Session {
    let mut s = session(true);
    s.on_request(subscribe(RUNTIME_TYPE, &[]), now).unwrap();
    s.on_request(subscribe(VIRTUAL_HOST_TYPE, &[]), now)
        .unwrap();
    let (first, _) = s.push(table, now).unwrap();
    s.on_request(ack(VIRTUAL_HOST_TYPE, &first.nonce), now)
        .unwrap();
    s
}

#[test]
fn the_first_push_answers_even_an_empty_table_and_then_routes_turn_valid() {
    let now = Instant::now();
    let table = HotTable::new(10);
    let mut s = session(true);
    // Envoy asks for the flag first: it is off until the routes are in place.
    let (out, _) = s.on_request(subscribe(RUNTIME_TYPE, &[]), now).unwrap();
    assert_eq!(flag(&out[0]), Some(0.0));
    assert!(s.validity(now, false).is_none());
    s.on_request(subscribe(VIRTUAL_HOST_TYPE, &[]), now)
        .unwrap();
    let (first, stats) = s.push(&table, now).unwrap();
    assert_eq!(first.type_url, VIRTUAL_HOST_TYPE);
    assert_eq!(stats, PushStats::default());
    assert!(
        s.validity(now, false).is_none(),
        "not before Envoy acknowledged"
    );
    let (_, took) = s
        .on_request(
            ack(VIRTUAL_HOST_TYPE, &first.nonce),
            now + Duration::from_millis(3),
        )
        .unwrap();
    assert_eq!(took, Some(Duration::from_millis(3)));
    let on = s.validity(now, false).unwrap();
    assert_eq!(names(&on), (vec![RUNTIME_LAYER], vec![]));
    assert_eq!(flag(&on), Some(100.0));
    assert_eq!(on.resources[0].ttl.unwrap().seconds, 1);
    assert!(s.is_valid());
}

#[test]
fn a_reconnecting_envoy_keeps_what_is_current_and_loses_the_rest() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    hot(&mut table, "80-xa.d", "xa", "10.0.0.1:80");
    hot(&mut table, "80-xb.d", "xb", "10.0.0.2:80");
    hot(&mut table, "80-xc.d", "xc", "10.0.0.3:80");
    let current = template().shard("*a.d", table.shard("*a.d")).version;
    let mut s = session(true);
    let held = [
        ("rc/*a.d", current.as_str()), // current: kept, not resent
        ("rc/*b.d", "0"),              // changed: resent
        ("rc/*g.d", "0"),              // released while we were apart
        ("other/x.d", "1"),            // not ours
    ];
    s.on_request(subscribe(VIRTUAL_HOST_TYPE, &held), now)
        .unwrap();
    let (first, stats) = s.push(&table, now).unwrap();
    assert_eq!(
        names(&first),
        (vec!["rc/*b.d", "rc/*c.d"], vec!["other/x.d", "rc/*g.d"])
    );
    assert_eq!((stats.upserts, stats.removals), (2, 2));
    assert_eq!(s.held(), 3);
}

#[test]
fn a_shard_goes_out_whole_with_every_host_it_holds() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    let mut s = synced(&table, now);
    hot(&mut table, "80-xa.d", "xa", "10.0.0.1:80");
    hot(&mut table, "3000-xa.d", "xa", "10.0.0.1:3000");
    hot(&mut table, "80-ya.d", "ya", "10.0.0.2:80");
    let (p, _) = s.push(&table, now).unwrap();
    assert_eq!(
        names(&p),
        (vec!["rc/*a.d"], vec![]),
        "three hosts, one shard"
    );
    assert_eq!(s.held(), 3);
    assert_eq!(s.held_destinations().len(), 3);
}

#[test]
fn later_pushes_carry_only_changes_one_at_a_time() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    hot(&mut table, "80-xa.d", "a", "10.0.0.1:80");
    let mut s = synced(&table, now);
    assert!(s.push(&table, now).is_none(), "nothing changed");
    hot(&mut table, "80-xb.d", "b", "10.0.0.2:80");
    let (p1, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&p1), (vec!["rc/*b.d"], vec![]));
    // A release while that push is in flight waits for its acknowledgement.
    table.set("80-xa.d", None);
    assert!(s.push(&table, now).is_none());
    s.on_request(ack(VIRTUAL_HOST_TYPE, "stale-nonce"), now)
        .unwrap();
    assert!(s.push(&table, now).is_none(), "a stale ack is no ack");
    s.on_request(ack(VIRTUAL_HOST_TYPE, &p1.nonce), now)
        .unwrap();
    let (p2, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&p2), (vec![], vec!["rc/*a.d"]));
    // A host added and removed between pushes costs nothing.
    s.on_request(ack(VIRTUAL_HOST_TYPE, &p2.nonce), now)
        .unwrap();
    hot(&mut table, "80-xc.d", "c", "10.0.0.3:80");
    table.set("80-xc.d", None);
    assert!(s.push(&table, now).is_none());
}

#[test]
fn a_stream_far_behind_is_compared_in_full() {
    let now = Instant::now();
    let mut table = HotTable::new(1);
    let mut s = synced(&table, now);
    for i in 0..3000 {
        hot(
            &mut table,
            "80-xh.d",
            "h",
            &format!("10.0.{}.{}:80", i / 200, i % 200),
        );
    }
    table.trim(0);
    let (p, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&p), (vec!["rc/*h.d"], vec![]));
}

#[test]
fn a_rejected_push_ends_the_stream() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    let mut s = synced(&table, now);
    hot(&mut table, "80-xa.d", "a", "10.0.0.1:80");
    let (p, _) = s.push(&table, now).unwrap();
    let mut nack = ack(VIRTUAL_HOST_TYPE, &p.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "duplicate domain".into(),
        details: vec![],
    });
    let err = s.on_request(nack, now).unwrap_err();
    assert!(err.to_string().contains("duplicate domain"), "{err}");
}

#[test]
fn validity_is_refreshed_while_pushes_land_and_withdrawn_when_one_is_late() {
    let t0 = Instant::now();
    let mut table = HotTable::new(10);
    let mut s = synced(&table, t0);
    assert!(s.validity(t0, false).is_some(), "turned on");
    assert!(s.validity(t0 + TTL / 8, false).is_none(), "not due yet");
    assert!(s.validity(t0 + TTL / 4, false).is_some(), "refreshed");
    hot(&mut table, "80-xa.d", "a", "10.0.0.1:80");
    let t1 = t0 + TTL / 4;
    let (p, _) = s.push(&table, t1).unwrap();
    // Still applying it (a large table): the flag is refreshed meanwhile.
    assert!(s.validity(t1 + 2 * TTL, false).is_some());
    // Not acknowledged within five TTLs: Envoy is stuck, its table may be stale.
    let late = t1 + TTL * UNACKNOWLEDGED_TTLS;
    let off = s.validity(late, false).unwrap();
    assert_eq!(flag(&off), Some(0.0));
    assert!(!s.is_valid());
    assert!(s.validity(late, false).is_none(), "turned off once");
    // The layer (and the stream's token in it) is still refreshed while off.
    assert_eq!(flag(&s.validity(late + TTL / 4, false).unwrap()), Some(0.0));
    s.on_request(ack(VIRTUAL_HOST_TYPE, &p.nonce), late)
        .unwrap();
    assert_eq!(flag(&s.validity(late, false).unwrap()), Some(100.0));
    assert_eq!(names(&s.withdraw().unwrap()), (vec![], vec![RUNTIME_LAYER]));
}

#[test]
fn with_the_fast_path_off_envoy_is_answered_emptied_and_never_told_routes_are_valid() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    hot(&mut table, "80-xa.d", "a", "10.0.0.1:80");
    let mut s = session(false);
    s.on_request(subscribe(RUNTIME_TYPE, &[]), now).unwrap();
    s.on_request(
        subscribe(VIRTUAL_HOST_TYPE, &[("rc/*a.d", "10.0.0.1:80")]),
        now,
    )
    .unwrap();
    let (first, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&first), (vec![], vec!["rc/*a.d"]));
    s.on_request(ack(VIRTUAL_HOST_TYPE, &first.nonce), now)
        .unwrap();
    assert!(s.validity(now, false).is_none());
    assert!(!s.is_valid());
}

#[test]
fn a_stream_that_stops_serving_loses_every_hot_route_and_gets_them_back_later() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    hot(&mut table, "80-xa.d", "sbx-a", "10.0.0.1:80");
    hot(&mut table, "80-xb.d", "sbx-b", "10.0.0.2:80");
    // Not read yet: Envoy is answered, with no route.
    let mut s = Session::new(template(), TTL, true, "tok".into());
    s.on_request(subscribe(VIRTUAL_HOST_TYPE, &[]), now)
        .unwrap();
    let (first, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&first), (vec![], vec![]));
    s.on_request(ack(VIRTUAL_HOST_TYPE, &first.nonce), now)
        .unwrap();
    assert!(s.holds_nothing());
    assert_eq!(s.applied(), u64::MAX, "holds nothing stale");
    assert_eq!(s.needed(), u64::MAX);
    // Read: everything goes out.
    assert!(s.set_serving(true));
    assert!(!s.set_serving(true), "no change");
    let (p, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&p), (vec!["rc/*a.d", "rc/*b.d"], vec![]));
    assert!(!s.holds_nothing());
    assert_eq!(s.held_destinations().len(), 2);
    s.on_request(ack(VIRTUAL_HOST_TYPE, &p.nonce), now).unwrap();
    // Unread: everything is removed; until that applies, Envoy still holds it.
    assert!(s.set_serving(false));
    let (p, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&p), (vec![], vec!["rc/*a.d", "rc/*b.d"]));
    assert!(!s.holds_nothing(), "the removal is in flight");
    assert!(s.applied() < u64::MAX, "an eviction waits for it");
    s.on_request(ack(VIRTUAL_HOST_TYPE, &p.nonce), now).unwrap();
    assert!(s.holds_nothing());
    // Changes meanwhile are not sent; serving again sends the table as it is then.
    table.set("80-xa.d", None);
    assert!(s.push(&table, now).is_none());
    s.set_serving(true);
    let (p, _) = s.push(&table, now).unwrap();
    assert_eq!(names(&p), (vec!["rc/*b.d"], vec![]));
}

#[test]
fn envoy_has_applied_the_table_once_it_acknowledges_the_push_that_carried_it() {
    let now = Instant::now();
    let mut table = HotTable::new(10);
    let mut s = session(true);
    // Not subscribed to hot routes: holds none, so it holds nothing stale either.
    assert_eq!(s.applied(), u64::MAX);
    s.on_request(subscribe(VIRTUAL_HOST_TYPE, &[("sandboxes/old", "x")]), now)
        .unwrap();
    // Subscribed with routes from an earlier stream: nothing is confirmed yet.
    assert_eq!(s.applied(), 0);
    hot(&mut table, "80-xa.example", "sbx-a", "10.0.0.1:80");
    let (first, _) = s.push(&table, now).unwrap();
    hot(&mut table, "80-xb.example", "sbx-b", "10.0.0.2:80");
    // The second change waits for the first push's answer.
    assert!(s.push(&table, now).is_none());
    assert_eq!(s.applied(), 0);
    s.on_request(ack(VIRTUAL_HOST_TYPE, &first.nonce), now)
        .unwrap();
    assert_eq!(s.applied(), 1);
    let (second, _) = s.push(&table, now).unwrap();
    s.on_request(ack(VIRTUAL_HOST_TYPE, &second.nonce), now)
        .unwrap();
    assert_eq!(s.applied(), table.cursor());
    // A change that cancels out needs no push, and Envoy already holds the result.
    table.set("80-xb.example", None);
    hot(&mut table, "80-xb.example", "sbx-b", "10.0.0.2:80");
    assert!(s.push(&table, now).is_none());
    assert_eq!(s.applied(), table.cursor());
    // A rejected push never counts as applied.
    table.set("80-xa.example", None);
    let (third, _) = s.push(&table, now).unwrap();
    let mut nack = ack(VIRTUAL_HOST_TYPE, &third.nonce);
    nack.error_detail = Some(RpcStatus {
        message: "bad".into(),
        ..Default::default()
    });
    assert!(s.on_request(nack, now).is_err());
    assert!(s.applied() < table.cursor());
}
