"""`make bench-envd`: the unmodified E2B Python SDK's envd calls through the gateway, against
sandgate-envd pods of pool `envd`. Prints one `RESULT envd ...` line (the bench binary adds RSS):
- run_echo_*: create, then the first `commands.run("true")` done, for N sandboxes one after another;
- run_call_*: each later `commands.run("true")` on one sandbox (M calls);
- file_50mb_*: `files.write` then `files.read` of a 50 MB binary file, in MB/s.
Environment as in envd.py's `sandbox` mode; N and M from argv (defaults 30 and 100)."""

import os
import sys
import time

from e2b import Sandbox

n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
m = int(sys.argv[2]) if len(sys.argv) > 2 else 100


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * q))]


first = []
for _ in range(n):
    t0 = time.perf_counter()
    sbx = Sandbox.create("envd", timeout=120)
    r = sbx.commands.run("true")
    first.append((time.perf_counter() - t0) * 1000)
    assert r.exit_code == 0, r
    sbx.kill()

sbx = Sandbox.create("envd", timeout=300)
calls = []
for _ in range(m):
    t0 = time.perf_counter()
    sbx.commands.run("true")
    calls.append((time.perf_counter() - t0) * 1000)

data = os.urandom(50 << 20)
path = sbx.commands.run("mktemp").stdout.strip()
t0 = time.perf_counter()
sbx.files.write(path, data)
write_s = time.perf_counter() - t0
t0 = time.perf_counter()
back = sbx.files.read(path, format="bytes")
read_s = time.perf_counter() - t0
assert bytes(back) == data, "the 50 MB file came back different"
sbx.commands.run(f"rm -f {path}")
sbx.kill()

print(
    f"{n} sandboxes: create + first commands.run p50 {pct(first, 0.5):.1f} ms, p99 {pct(first, 0.99):.1f} ms; "
    f"{m} calls on one: p50 {pct(calls, 0.5):.1f} ms, p99 {pct(calls, 0.99):.1f} ms; "
    f"50 MB write {write_s:.2f} s, read {read_s:.2f} s",
    file=sys.stderr,
)
print(
    f"RESULT envd run_echo_p50_ms={pct(first, 0.5):.1f} run_echo_p99_ms={pct(first, 0.99):.1f} "
    f"run_call_p50_ms={pct(calls, 0.5):.1f} run_call_p99_ms={pct(calls, 0.99):.1f} "
    f"file_50mb_write_mb_s={50 / write_s:.1f} file_50mb_read_mb_s={50 / read_s:.1f}",
    flush=True,
)
