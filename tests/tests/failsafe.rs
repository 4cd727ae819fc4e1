//! A sandbox in use is never released, whatever hides its requests from sandgate: hot routes in an
//! Envoy whose counters cannot be read (an `--envoy-admin` pointing nowhere or at another Envoy, a
//! second Envoy on one extproc, an admin port that stops answering for a while). Process level:
//! real Envoys, one sandgate-extproc, sandgate-controller and the API. Each scenario runs with the
//! fast path and without it. Timings: controller interval 1 s, idle timeout 3 s.

use std::time::{Duration, Instant};

use sandgate_tests::cluster::Cluster;
use sandgate_tests::envoy::{Envoy, EnvoyPorts};
use sandgate_tests::procs::{eventually, free_port, get, Extproc, Switch};
use sandgate_tests::stack::{spawn_extproc, TEST_ACCESS_LOG_FLUSH};

const SEC: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout + one interval + the fast path's staleness bound (3 s) + a margin for a loaded machine.
const RELEASE_WITHIN: Duration = Duration::from_secs(3 + 1 + 3 + 4);

fn host(id: &str) -> String {
    format!("8080-{id}.sandbox.localhost")
}

/// How an Envoy names its admin address to the extproc.
#[derive(Clone, Copy)]
enum Admin {
    /// In its node metadata (the shipped config).
    Advertised,
    /// Not at all: the extproc falls back to its `--envoy-admin`.
    Silent,
}

/// One extproc serving several Envoys, registered as one replica.
struct Bed {
    c: Cluster,
    extproc: Extproc,
    envoys: Vec<Envoy>,
}

impl Bed {
    /// `envoy_admin`: the extproc's `--envoy-admin` (`None`: a port nothing listens on);
    /// `admins`: each Envoy's own admin port and whether it advertises it.
    async fn start(fast: bool, envoy_admin: Option<u16>, envoys: &[(u16, Admin)]) -> Bed {
        let c = Cluster::start(0).await;
        let grpc = free_port();
        let flag = if fast {
            "--fast-path=true"
        } else {
            "--fast-path=false"
        };
        let extproc = spawn_extproc(
            c.dir.path(),
            &c.target,
            grpc,
            envoy_admin.unwrap_or_else(free_port),
            &[flag],
        )
        .await;
        let mut started = Vec::new();
        for (admin_port, admin) in envoys {
            let ports = EnvoyPorts {
                listen_addr: "127.0.0.1".into(),
                listen_port: free_port(),
                extproc_port: grpc,
                admin_port: *admin_port,
                access_log_flush: TEST_ACCESS_LOG_FLUSH.into(),
                upstream_headers_timeout: "3s".into(),
                advertise_admin: matches!(admin, Admin::Advertised),
            };
            started.push(Envoy::start(c.dir.path(), ports).await.expect("envoy"));
        }
        extproc.wait_ready(40 * SEC).await;
        c.register_replica("gw-0", extproc.control_port).await;
        Bed {
            c,
            extproc,
            envoys: started,
        }
    }

    async fn get(&self, envoy: usize, id: &str) -> (u16, Option<String>, String) {
        let r = get(self.envoys[envoy].addr(), &host(id), "/", &[])
            .await
            .expect("request through envoy");
        (r.status, r.pod(), r.body)
    }

    /// One request every second through `envoy` for `d`, each answered by `pod`, while the pod
    /// stays running.
    async fn keep_busy(&self, envoy: usize, id: &str, pod: &str, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let (status, by, body) = self.get(envoy, id).await;
            assert_eq!(
                (status, by.as_deref()),
                (200, Some(pod)),
                "{id} stopped routing while busy: {body}"
            );
            assert_eq!(self.c.phase(pod).await, "running", "released while busy");
            tokio::time::sleep(SEC).await;
        }
    }

    async fn until_released(&self, pod: &str, within: Duration) -> Duration {
        let start = Instant::now();
        eventually(within, || async {
            match self.c.phase(pod).await.as_str() {
                "stopping" => Ok(()),
                p => Err(format!("{pod} is {p}")),
            }
        })
        .await;
        start.elapsed()
    }

    /// Requests `id` through `envoy` until that Envoy holds it as a hot route.
    async fn until_hot(&self, envoy: usize, id: &str) {
        eventually(10 * SEC, || async {
            assert_eq!(self.get(envoy, id).await.0, 200);
            if self.hot(envoy).await.contains(&host(id)) {
                Ok(())
            } else {
                Err("not hot yet".to_string())
            }
        })
        .await;
    }

    /// Hosts each Envoy holds as hot routes.
    async fn hot(&self, envoy: usize) -> Vec<String> {
        self.envoys[envoy].hot_hosts().await
    }
}

/// A busy sandbox through `busy_envoy`, an idle canary that must still be released on time (the
/// controller is not simply blocked), and (with the fast path) a check that the Envoys in `read`
/// hold the busy host as a hot route and the one whose counters are not read never does.
async fn busy_kept_idle_released(
    b: &mut Bed,
    fast: bool,
    busy_envoy: usize,
    read: &[usize],
    unread: Option<usize>,
) {
    b.c.sandbox("pod-busy", "busy").await;
    // The canary's idle time counts from its pod's creation (it has no claim and no request):
    // on a real node that is a second or two before it has an address and its sandbox ID.
    let canary_created = Instant::now();
    b.c.sandbox("pod-idle", "idle").await;
    for e in 0..b.envoys.len() {
        assert_eq!(b.get(e, "busy").await.0, 200);
    }
    if fast {
        for &e in read {
            eventually(5 * SEC, || async {
                assert_eq!(b.get(e, "busy").await.0, 200);
                if b.hot(e).await.contains(&host("busy")) {
                    Ok(())
                } else {
                    Err(format!("envoy {e} holds no hot route"))
                }
            })
            .await;
        }
    }
    b.c.start_controller("ctrl", &[]);
    let busy = b.keep_busy(busy_envoy, "busy", "pod-busy", 4 * TIMEOUT);
    let idle = async {
        b.until_released("pod-idle", RELEASE_WITHIN).await;
        canary_created.elapsed()
    };
    let ((), took) = tokio::join!(busy, idle);
    assert!(took >= TIMEOUT - SEC, "the idle canary went after {took:?}");
    if let Some(e) = unread {
        assert!(
            b.hot(e).await.is_empty(),
            "an Envoy whose counters are not read holds hot routes"
        );
    }
    // Then idle: released on time.
    let took = b.until_released("pod-busy", RELEASE_WITHIN).await;
    assert!(
        took >= TIMEOUT - SEC,
        "released {took:?} after its last request"
    );
}

async fn admin_points_nowhere(fast: bool) {
    let mut b = Bed::start(fast, None, &[(free_port(), Admin::Silent)]).await;
    busy_kept_idle_released(&mut b, fast, 0, &[], Some(0)).await;
    if fast {
        assert_eq!(
            b.extproc
                .metric("sandgate_extproc_fast_path_unobserved_streams")
                .await,
            1.0
        );
    }
}

async fn admin_points_at_another_envoy(fast: bool) {
    // Both Envoys are silent; --envoy-admin is the first one's: only it gets hot routes.
    let first = free_port();
    let mut b = Bed::start(
        fast,
        Some(first),
        &[(first, Admin::Silent), (free_port(), Admin::Silent)],
    )
    .await;
    busy_kept_idle_released(&mut b, fast, 1, &[0], Some(1)).await;
}

async fn two_envoys_each_advertising_their_admin(fast: bool) {
    let mut b = Bed::start(
        fast,
        None,
        &[
            (free_port(), Admin::Advertised),
            (free_port(), Admin::Advertised),
        ],
    )
    .await;
    // Both are read, so both hold hot routes.
    busy_kept_idle_released(&mut b, fast, 1, &[0, 1], None).await;
}

async fn an_admin_port_that_stops_answering_for_a_while(fast: bool) {
    // The Envoy's admin is reached through a switch: cut for 8 s (past the 3 s staleness bound
    // and the 3 s idle timeout) while its sandbox is busy, then back.
    let admin = free_port();
    // The extproc reads this Envoy's counters only through the switch.
    let switch = Switch::start(([127, 0, 0, 1], admin).into()).await;
    let mut b = Bed::start(fast, Some(switch.addr.port()), &[(admin, Admin::Silent)]).await;
    b.c.sandbox("pod-busy", "busy").await;
    b.c.start_controller("ctrl", &[]);
    if fast {
        b.until_hot(0, "busy").await;
    }
    b.keep_busy(0, "busy", "pod-busy", 2 * SEC).await;
    switch.set(false);
    b.keep_busy(0, "busy", "pod-busy", 8 * SEC).await;
    if fast {
        assert!(b.hot(0).await.is_empty(), "hot routes kept while unread");
    }
    switch.set(true);
    b.keep_busy(0, "busy", "pod-busy", 4 * SEC).await;
    if fast {
        assert!(
            b.hot(0).await.contains(&host("busy")),
            "hot routes back once read again"
        );
    }
    let took = b.until_released("pod-busy", RELEASE_WITHIN).await;
    assert!(
        took >= TIMEOUT - SEC,
        "released {took:?} after its last request"
    );
}

async fn an_admin_port_that_fails_now_and_then(fast: bool) {
    // Every other reading of the Envoy's counters fails (the admin is cut right after a reading
    // succeeds and restored as soon as the next one has failed), never two in a row, so the view
    // stays complete. An idle sandbox must still go on time: a failed reading alone is no
    // activity (the next one's counters cover the gap), or an Envoy whose admin hiccups would
    // keep every sandbox it holds forever.
    let admin = free_port();
    let switch = Switch::start(([127, 0, 0, 1], admin).into()).await;
    let mut b = Bed::start(fast, Some(switch.addr.port()), &[(admin, Admin::Silent)]).await;
    b.c.sandbox("pod-quiet", "quiet").await;
    b.c.start_controller("ctrl", &[]);
    if fast {
        b.until_hot(0, "quiet").await;
    }
    b.keep_busy(0, "quiet", "pod-quiet", 2 * SEC).await;
    let polls = |result: &'static str| {
        let extproc = &b.extproc;
        async move {
            extproc
                .metric(&format!(
                    "sandgate_extproc_fast_path_activity_polls_total{{result=\"{result}\"}}"
                ))
                .await
        }
    };
    // Waits (polling) until the `result` count passes `from`; returns it.
    let passes = |result: &'static str, from: f64| async move {
        loop {
            let n = polls(result).await;
            if n > from {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let flap = async {
        let (mut ok, mut failed) = (polls("ok").await, polls("error").await);
        loop {
            ok = passes("ok", ok).await;
            switch.set(false);
            failed = passes("error", failed).await;
            switch.set(true);
        }
    };
    let took = tokio::select! {
        took = b.until_released("pod-quiet", RELEASE_WITHIN) => took,
        () = flap => unreachable!(),
    };
    assert!(
        took >= TIMEOUT - SEC,
        "released {took:?} after its last request"
    );
    if fast {
        let failed = b
            .extproc
            .metric("sandgate_extproc_fast_path_activity_polls_total{result=\"error\"}")
            .await;
        // At least one reading failed while the sandbox waited, with good ones on either side.
        assert!(failed >= 1.0, "no reading failed: the admin never flapped");
    }
}

macro_rules! both_modes {
    ($scenario:ident, $fast:ident, $ext_proc:ident) => {
        #[tokio::test]
        async fn $fast() {
            $scenario(true).await
        }
        #[tokio::test]
        async fn $ext_proc() {
            $scenario(false).await
        }
    };
}

both_modes!(
    admin_points_nowhere,
    admin_nowhere_fast_path,
    admin_nowhere_ext_proc_only
);
both_modes!(
    admin_points_at_another_envoy,
    wrong_envoy_fast_path,
    wrong_envoy_ext_proc_only
);
both_modes!(
    two_envoys_each_advertising_their_admin,
    two_envoys_fast_path,
    two_envoys_ext_proc_only
);
both_modes!(
    an_admin_port_that_stops_answering_for_a_while,
    admin_outage_fast_path,
    admin_outage_ext_proc_only
);
both_modes!(
    an_admin_port_that_fails_now_and_then,
    admin_flaps_fast_path,
    admin_flaps_ext_proc_only
);
