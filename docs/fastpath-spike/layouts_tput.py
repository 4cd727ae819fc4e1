"""Per-request cost of hot-route layouts in Envoy, static config, 10 000 hosts, 1 000 of them loaded.

Variants (comma list, first arg; rounds, second arg), each its own Envoy (--concurrency 1) behind
one direct_response upstream Envoy, wrk -t1 -c16 -d6s, rounds interleaved:
  direct  one route, destination from x-envoy-original-dst-host (Envoy alone)
  vhnc    a virtual host per hot host whose route sets the ORIGINAL_DST header (what ships)
  vh      the same with a composite filter (default: skip) in the chain
  cm      32 shard virtual hosts, a composite host -> set_metadata map (branch fastpath-shards)
  ch      the same with header_mutation instead of set_metadata
  fs      the same with set_filter_state (original_dst_address) instead
  mx      10 shard virtual hosts (`*<last digit>.<domain>`), each a VirtualHost.matcher exact
          :authority map to a route that sets the ORIGINAL_DST header (what ships since issue 25)
  mxp     the same behind the shipped predicates: four routing headers holding a comma, and a
          gRPC content type, checked before the map
Run from the repo root: python3 docs/fastpath-spike/layouts_tput.py direct,vhnc,vh,cm,fs 4
"""
import re
import statistics
import subprocess
import sys

from layouts_common import (
    CATCH_ALL_404, COMPOSITE, READS_METADATA, ROUTE, Envoy, admin, free_port, gate, listener,
    matcher_shards, original_dst, per_host_vhost, pod_addr, set_metadata, sets_header, shard_vhosts,
)

N, HOT, SHARDS = 10000, 1000, 32
UP = free_port()  # the upstream Envoy every variant sends to
VALID = gate(100)
DEST_HEADER = "x-sandgate-destination"


def host(i):
    return f"{UP}-sbx-{i}.sandbox.localhost"


def dest(i):
    return f"127.0.0.1:{UP}" if i < HOT else pod_addr(i, UP)


def pod_filter(v, i):
    """The filter a shard's map runs for host `i`, and what the cluster then reads."""
    if v == "cm":
        return set_metadata({"x-sandbox-destination": dest(i)})
    if v == "fs":
        return {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
            "on_request_headers": [{
                "object_key": "envoy.network.transport_socket.original_dst_address",
                "format_string": {"text_format_source": {"inline_string": dest(i)}},
            }],
        }
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"append": sets_header(DEST_HEADER, dest(i))}]},
    }


def variant(v, port):
    if v == "direct":
        vhosts = [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": ROUTE}]}]
        return [original_dst({"use_http_header": True})], listener(port, [], {"name": "r", "virtual_hosts": vhosts})
    if v in ("vh", "vhnc"):
        vhosts = [per_host_vhost(f"v{i}", host(i), None, DEST_HEADER, dest(i), dict(prefix="/", **VALID))
                  for i in range(N)]
        cluster = original_dst({"use_http_header": True, "http_header_name": DEST_HEADER})
        filters = [COMPOSITE] if v == "vh" else []
        return [cluster], listener(port, filters, {"name": "r", "virtual_hosts": vhosts + [CATCH_ALL_404]})
    if v in ("mx", "mxp"):
        vhosts = matcher_shards(N, 10, host, DEST_HEADER, dest, dict(prefix="/", **VALID), v == "mxp")
        cluster = original_dst({"use_http_header": True, "http_header_name": DEST_HEADER})
        return [cluster], listener(port, [], {"name": "r", "virtual_hosts": vhosts + [CATCH_ALL_404]})
    vhosts = shard_vhosts(N, SHARDS, host, lambda i: pod_filter(v, i), dict(prefix="/", **VALID))
    reads = {"cm": READS_METADATA, "fs": {}}.get(v, {"use_http_header": True, "http_header_name": DEST_HEADER})
    return [original_dst(reads)], listener(port, [COMPOSITE], {"name": "r", "virtual_hosts": vhosts + [CATCH_ALL_404]})


def start(name, clusters, listener_config):
    admin_port = free_port()
    config = {"admin": admin(admin_port), "static_resources": {"clusters": clusters, "listeners": [listener_config]}}
    return Envoy(name, config, admin_port)


def main(variants, rounds):
    ok = {"name": "u", "domains": ["*"],
          "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}
    envoys = [start("up", [], listener(UP, [], {"name": "u", "virtual_hosts": [ok]}))]
    ports = {}
    try:
        for v in variants:
            ports[v] = free_port()
            envoys.append(start(v, *variant(v, ports[v])))
        for e in envoys:
            e.wait_ready()
        lua = "/tmp/sandgate-layouts-w.lua"
        with open(lua, "w") as f:
            f.write(f'local i = 0\nrequest = function()\n  i = (i + 7919) % {HOT}\n'
                    f'  return wrk.format("GET", "/", {{["Host"] = "{UP}-sbx-" .. i .. ".sandbox.localhost", '
                    f'["x-envoy-original-dst-host"] = "127.0.0.1:{UP}"}})\nend\n')
        results = {v: [] for v in variants}
        for _ in range(rounds):
            for v in variants:
                out = subprocess.run(["wrk", "-t1", "-c16", "-d6s", "-s", lua, f"http://127.0.0.1:{ports[v]}/"],
                                     capture_output=True, text=True).stdout
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                results[v].append(rps)
                print(v, rps, "non2xx", non2xx.group(1) if non2xx else 0, flush=True)
    finally:
        for e in envoys:
            e.stop()
    direct = statistics.median(results["direct"]) if "direct" in results else 1
    for v in variants:
        median = statistics.median(results[v])
        print(v, f"median {median:.0f}", f"vs direct {median / direct:.3f}")


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else 3)
