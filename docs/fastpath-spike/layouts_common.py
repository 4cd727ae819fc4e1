"""What the layout probes share: Envoy processes on free loopback ports, and config pieces."""
import json
import os
import socket
import subprocess
import time
import urllib.request

ENVOY = os.environ.get("ENVOY", ".tools/envoy/envoy/_bin/envoy")
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "suppress_envoy_headers": True,
    },
}
HOST_INPUT = {
    "name": "host",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
        "header_name": ":authority",
    },
}
SKIP = {
    "action": {
        "name": "skip",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
        },
    }
}
# The composite filter in the chain; it does nothing unless a route configures it.
COMPOSITE = {
    "name": "composite",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "extension_config": {
            "name": "composite",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
            },
        },
        "xds_matcher": {
            "matcher_tree": {"input": HOST_INPUT, "exact_match_map": {"map": {"none.invalid": SKIP}}}
        },
    },
}
CATCH_ALL_404 = {
    "name": "default",
    "domains": ["*"],
    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}],
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def gate(numerator, key="k"):
    """A route match that holds only while runtime `key` allows it (the validity flag)."""
    return {"runtime_fraction": {"default_value": {"numerator": numerator}, "runtime_key": key}}


def sets_header(header, value):
    return {"header": {"key": header, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def shard_matcher(entries):
    """Per-route composite config: an exact `:authority` map, host -> filter config run for it."""
    actions = {
        host: {
            "action": {
                "name": "r",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                    "typed_config": {"name": "m", "typed_config": filter_config},
                },
            }
        }
        for host, filter_config in entries
    }
    return {
        "composite": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcherPerRoute",
            "xds_matcher": {"matcher_tree": {"input": HOST_INPUT, "exact_match_map": {"map": actions}}},
        }
    }


def pod_addr(i, port):
    """A distinct pod address for host number `i`."""
    return f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:{port}"


# ORIGINAL_DST reading the pod from `envoy.lb` metadata (what set_metadata writes).
READS_METADATA = {"metadata_key": {"key": "envoy.lb", "path": [{"key": "x-sandbox-destination"}]}}
ROUTE = {"cluster": "fast", "timeout": "0s"}


def per_host_vhost(name, domain, route_name, header, dest, match):
    """A virtual host for one hot host: its one route sets the pod in `header`."""
    route = {"match": match, "route": ROUTE, "request_headers_to_add": [sets_header(header, dest)]}
    if route_name:
        route["name"] = route_name
    return {"name": name, "domains": [domain], "routes": [route]}


def shard_vhosts(n, count, host, pod_filter, match, prefix=""):
    """Hosts 0..n in `count` shard virtual hosts (host i in shard i % count): one route each, and
    a composite map from each host to the filter `pod_filter(i)` runs for it."""
    out = []
    for k in range(count):
        ids = range(k, n, count)
        if ids:
            out.append({
                "name": f"{prefix}hot-{k}",
                "domains": [host(i) for i in ids],
                "routes": [{"match": match, "route": ROUTE}],
                "typed_per_filter_config": shard_matcher((host(i), pod_filter(i)) for i in ids),
            })
    return out


def header_input(name):
    return {"name": "h", "typed_config": {
        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
        "header_name": name}}


def matcher_shards(n, count, host, header, dest, match, predicates=False):
    """Hosts 0..n in `count` shard virtual hosts (host i in shard i % count, domain
    `*<i % count>.sandbox.localhost`), each a VirtualHost.matcher: an exact :authority map to a
    route that sets the pod in `header` (the shipped layout), optionally behind the shipped
    predicates (a comma in a routing header; a gRPC content type)."""
    vhosts = []
    for s in range(count):
        entries = {host(i): {"action": {"name": str(i), "typed_config": {
            "@type": "type.googleapis.com/envoy.config.route.v3.Route",
            "name": f"sbx-{i}", "match": match,
            "route": {"cluster": "fast", "timeout": "0s"},
            "request_headers_to_add": [sets_header(header, dest(i))]}}}
            for i in range(s, n, count)}
        miss = {"action": {"name": "miss", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.route.v3.Route",
            "match": {"prefix": "/"}, "direct_response": {"status": 404}}}}
        tree = {"matcher_tree": {"input": header_input(":authority"), "exact_match_map": {"map": entries}},
                "on_no_match": miss}
        if predicates:
            rules = [{"predicate": {"single_predicate": {"input": header_input(h), "value_match": {"contains": ","}}},
                      "on_match": miss}
                     for h in ("x-sandbox-id", "x-sandbox-port", "e2b-sandbox-id", "e2b-sandbox-port")]
            rules.append({"predicate": {"single_predicate": {"input": header_input("content-type"),
                          "value_match": {"safe_regex": {"google_re2": {}, "regex": "application/grpc([+;].*)?"}}}},
                          "on_match": miss})
            matcher = {"matcher_list": {"matchers": rules}, "on_no_match": {"matcher": tree}}
        else:
            matcher = tree
        vhosts.append({"name": f"s{s}", "domains": [f"*{s}.sandbox.localhost"], "matcher": matcher})
    return vhosts


def set_metadata(fields):
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": "envoy.lb", "value": fields}],
    }


def original_dst(lb_config):
    return {
        "name": "fast",
        "type": "ORIGINAL_DST",
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": lb_config,
        "circuit_breakers": {
            "thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]
        },
    }


def listener(port, filters, route_config=None, rds=None):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "x",
        "http_filters": filters + [ROUTER],
    }
    if rds:
        hcm["rds"] = rds
    else:
        hcm["route_config"] = route_config
    return {
        "name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
    }


def admin(port):
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def get(admin_port, path):
    return urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}").read()


class Envoy:
    """One Envoy (--concurrency 1) on `config`, which must give it the admin port `admin_port`."""

    def __init__(self, name, config, admin_port, log_level="error"):
        self.admin_port = admin_port
        self.path = f"/tmp/sandgate-layouts-{name}.json"
        self.log = f"/tmp/sandgate-layouts-{name}.log"
        with open(self.path, "w") as f:
            json.dump(config, f)
        self.proc = subprocess.Popen(
            [ENVOY, "-c", self.path, "--concurrency", "1", "-l", log_level,
             "--disable-hot-restart", "--base-id", str(free_port())],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
        )

    def wait_ready(self, within=60.0):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if get(self.admin_port, "/ready").strip() == b"LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"envoy not ready within {within}s: {self.log}")

    def check_alive(self):
        if self.proc.poll() is not None:
            raise SystemExit(open(self.log).read()[-2000:])

    def counter(self, name):
        for line in get(self.admin_port, f"/stats?filter={name}").decode().splitlines():
            if line.startswith(name + ":"):
                return int(line.split(":")[1])
        return 0

    def heap_in_use(self):
        return int(json.loads(get(self.admin_port, "/memory"))["allocated"])

    def rss(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

    def settled_rss(self, within=30.0):
        """RSS once it has not moved for a second (the background memory release has run)."""
        deadline = time.monotonic() + within
        last = self.rss()
        while time.monotonic() < deadline:
            time.sleep(1)
            now = self.rss()
            if now == last:
                return now
            last = now
        return last

    def stop(self):
        self.proc.kill()
        self.proc.wait()
