"""Envoy memory per hot host when routes arrive in steps (file-based RDS, not VHDS: no VHDS proto copies).

  python3 docs/fastpath-spike/layouts_memory.py vhost 10000 40    # a virtual host per host
  python3 docs/fastpath-spike/layouts_memory.py bare 10000 40     # the same, its route bare (no header, no gate)
  python3 docs/fastpath-spike/layouts_memory.py comp 10000 40     # 16 shards, composite map, 3 metadata fields
  python3 docs/fastpath-spike/layouts_memory.py comp 10000 40 one # the same with one field
Prints heap in use and RSS growth per host after the last step (memory release on, RSS settled).
"""
import json
import os
import sys
import time

from layouts_common import (
    CATCH_ALL_404, COMPOSITE, READS_METADATA, ROUTE, Envoy, admin, free_port, gate, listener,
    original_dst, per_host_vhost, pod_addr, set_metadata, shard_vhosts,
)

VALID = gate(0, "sandgate.fast_path.valid")
UPDATES = "http.x.rds.sandboxes.update_success"


def host(i):
    return f"49983-sbx-{i:06d}abcdefgh.sandbox.example.com"


def dest(i):
    return pod_addr(i, 49983)


def per_host(n, bare):
    if bare:
        return [
            {"name": f"sandboxes/{host(i)}", "domains": [host(i)], "routes": [{"match": {"prefix": "/"}, "route": ROUTE}]}
            for i in range(n)
        ]
    return [
        per_host_vhost(f"sandboxes/{host(i)}", host(i), f"sbx-{i:06d}abcdefgh", "x-sandgate-destination", dest(i),
                       dict(prefix="/", **VALID))
        for i in range(n)
    ]


def shards(n, one_field):
    def pod(i):
        fields = {"x-sandbox-destination": dest(i)}
        if not one_field:
            fields.update({"sandbox-id": f"sbx-{i:06d}abcdefgh", "port": "49983"})
        return set_metadata(fields)

    return shard_vhosts(n, 16, host, pod, dict(prefix="/", **VALID), prefix="sandboxes/")


def write(path, vhosts, version):
    rc = {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "sandboxes",
        "virtual_hosts": vhosts + [CATCH_ALL_404],
    }
    with open(path + ".tmp", "w") as f:
        json.dump({"version_info": str(version), "resources": [rc]}, f)
    os.rename(path + ".tmp", path)


def main(design, n, steps, one_field):
    admin_port, rds = free_port(), "/tmp/sandgate-layouts-rds.json"
    write(rds, [], 0)
    per_host_design = design in ("vhost", "bare")
    if per_host_design:
        dst = {"use_http_header": True, "http_header_name": "x-sandgate-destination"}
    else:
        dst = READS_METADATA
    config = {
        "node": {"id": "n", "cluster": "c"},
        "admin": admin(admin_port),
        "memory_allocator_manager": {"bytes_to_release": 16777216, "memory_release_interval": "1s"},
        "static_resources": {
            "clusters": [original_dst(dst)],
            "listeners": [listener(
                free_port(),
                [] if per_host_design else [COMPOSITE],
                rds={"route_config_name": "sandboxes",
                     "config_source": {"path_config_source": {"path": rds}, "resource_api_version": "V3"}},
            )],
        },
    }
    envoy = Envoy("memory", config, admin_port, log_level="warning")
    try:
        envoy.wait_ready()
        rss0, heap0 = envoy.settled_rss(), envoy.heap_in_use()
        started = time.monotonic()
        for step in range(1, steps + 1):
            before = envoy.counter(UPDATES)
            count = n * step // steps
            vhosts = per_host(count, design == "bare") if per_host_design else shards(count, one_field)
            write(rds, vhosts, step)
            while envoy.counter(UPDATES) <= before:  # applied: Envoy counted the update
                envoy.check_alive()
                time.sleep(0.02)
        fill = time.monotonic() - started
        rss1, heap1 = envoy.settled_rss(), envoy.heap_in_use()
        rejected = envoy.counter("http.x.rds.sandboxes.update_rejected")
        print(f"design={design} N={n} steps={steps} heap/entry={(heap1 - heap0) / n:.0f} "
              f"rss/entry={(rss1 - rss0) / n:.0f} fill={fill:.1f}s rejected={rejected}")
    finally:
        envoy.stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), len(sys.argv) > 4)
