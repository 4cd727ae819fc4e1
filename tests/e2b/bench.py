"""`make bench-e2b`: the SDK's create, then the first 200 through the gateway, for N sandboxes one
after another (each killed after it is measured). Prints `RESULT e2b create_p50_ms=… create_p99_ms=…`.
Environment as in scenario.py; N from argv (default 100)."""

import os
import statistics
import sys
import time
import urllib.request

from e2b import Sandbox

GATEWAY = os.environ["SANDGATE_GATEWAY"]
n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
times, misses = [], 0
for i in range(n):
    t0 = time.perf_counter()
    sbx = Sandbox.create(template="base", timeout=60)
    req = urllib.request.Request(f"http://{GATEWAY}/", headers={"Host": sbx.get_host(8080)})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    break
        except urllib.error.HTTPError:
            misses += 1
    times.append((time.perf_counter() - t0) * 1000)
    sbx.kill()
times.sort()
p = lambda q: times[min(len(times) - 1, round((len(times) - 1) * q))]
print(f"{n} sandboxes: create + first 200 p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, "
      f"max {times[-1]:.1f} ms, mean {statistics.mean(times):.1f} ms; non-200 before the first 200: {misses}",
      file=sys.stderr)
print(f"RESULT e2b create_p50_ms={p(0.5):.1f} create_p99_ms={p(0.99):.1f}")
