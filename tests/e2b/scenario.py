"""The unmodified E2B Python SDK against sandgate-api and the sandgate gateway.

Run by tests/tests/e2b.rs with one of the pinned SDKs (an old one on the v1 paths, a current one on
the v2 paths): `python scenario.py <lifecycle|timeout|header-mode|teams>`. The harness sets
E2B_API_URL, E2B_API_KEY (team a), E2B_DOMAIN, SANDGATE_OTHER_KEY (team b) and SANDGATE_GATEWAY
(Envoy's address; the sandbox hosts are sent to it in the Host header, as wildcard DNS would).
Every check is an assert; the exit status is the verdict.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

import e2b
from e2b import Sandbox, SandboxQuery

GATEWAY = os.environ["SANDGATE_GATEWAY"]
OTHER_KEY = os.environ["SANDGATE_OTHER_KEY"]
VERSION = __import__("importlib.metadata").metadata.version("e2b")


def log(*a):
    print(f"[e2b {VERSION}]", *a, flush=True)


def http(host, path="/", headers=None):
    """One GET through the gateway with `host` as Host; (status, parsed JSON or text)."""
    req = urllib.request.Request(f"http://{GATEWAY}{path}", headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        status = e.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def eventually(what, check, within=20.0):
    deadline = time.time() + within
    while True:
        try:
            value = check()
            if value:
                return value
            err = "false"
        except Exception as e:  # noqa: BLE001 - any failure is "not yet"
            err = repr(e)
        if time.time() > deadline:
            raise AssertionError(f"not true within {within}s: {what} ({err})")
        time.sleep(0.1)


def parse_time(v):
    from datetime import datetime

    return v if isinstance(v, datetime) else datetime.fromisoformat(str(v).replace("Z", "+00:00"))


def lifecycle():
    run = uuid.uuid4().hex[:8]
    sbx = Sandbox.create(template="base", timeout=120, metadata={"suite": run, "n": "0"})
    log("created", sbx.sandbox_id)
    host = sbx.get_host(8080)
    assert host == f"8080-{sbx.sandbox_id}.{os.environ['E2B_DOMAIN']}", host
    status, body = http(host, "/hello")
    assert status == 200, (status, body)
    assert body["path"] == "/hello", body

    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata.get("suite") == run, info.metadata
    lifetime = (parse_time(info.end_at) - parse_time(info.started_at)).total_seconds()
    assert 110 <= lifetime <= 130, f"endAt is {lifetime}s after startedAt, want about 120"

    others = [Sandbox.create(template="base", metadata={"suite": run, "n": str(i)}) for i in (1, 2)]
    Sandbox.create(template="base", metadata={"suite": "someone-else"})
    pages = Sandbox.list(query=SandboxQuery(metadata={"suite": run}), limit=2)
    seen, npages = [], 0
    while pages.has_next:
        items = pages.next_items()
        npages += 1
        seen += [s.sandbox_id for s in items]
    want = {sbx.sandbox_id} | {o.sandbox_id for o in others}
    assert set(seen) == want and len(seen) == 3, (seen, want)
    assert npages == 2, npages

    before = parse_time(sbx.get_info().end_at)
    sbx.set_timeout(30)
    after = parse_time(sbx.get_info().end_at)
    assert after < before, (before, after)

    assert sbx.kill() is True
    status, body = eventually(
        "killed sandbox answers 502",
        lambda: (lambda r: r if r[0] == 502 else None)(http(host, "/")),
    )
    assert "was not found" in body["message"], body
    assert body["code"] == 502, body
    # The SDK's own reading of that answer (2.51+; older SDKs call any 502 a timeout).
    fmt = getattr(e2b.exceptions, "format_sandbox_unavailable_exception", None)
    if fmt is not None:
        exc = fmt(body["message"])
        assert type(exc).__name__ == "SandboxNotRunningException", type(exc)
    assert Sandbox.kill(sbx.sandbox_id) is False, "a second kill must return False"
    for o in others:
        assert o.kill() is True

    # Network controls sandgate does not enforce are refused by name, never ignored.
    refused = [({"allow_internet_access": False}, "allow_internet_access")]
    refused.append(({"network": {"deny_out": ["0.0.0.0/0"]}}, "network.denyOut"))
    for kwargs, field in refused:
        try:
            s = Sandbox.create(template="base", **kwargs)
        except e2b.exceptions.SandboxException as e:
            assert field in str(e), (field, e)
        else:
            s.kill()
            raise AssertionError(f"created a sandbox with {kwargs}: it would be open")
    log("lifecycle ok")


def timeout():
    sbx = Sandbox.create(template="base", timeout=4)
    host = sbx.get_host(8080)
    assert http(host)[0] == 200
    started = time.time()
    eventually("released at its timeout", lambda: http(host)[0] == 502, within=20)
    took = time.time() - started
    assert took >= 2.0, f"released after {took:.1f}s, before its 4 s timeout"
    try:
        sbx.get_info()
        raise AssertionError("get_info on an expired sandbox must raise")
    except e2b.exceptions.NotFoundException:
        pass
    except Exception as e:  # noqa: BLE001
        assert "not found" in str(e).lower(), repr(e)
    log(f"timeout ok: released {took:.1f}s after the first request")


def header_mode():
    # One gateway address, sandboxes named by the E2b-Sandbox-Id/Port headers.
    os.environ["E2B_SANDBOX_URL"] = f"http://{GATEWAY}"
    sbx = Sandbox.create(template="base", timeout=60)
    assert sbx.is_running() is True, "envd health through the header-routed gateway"
    sbx.kill()
    # The gateway's watch sees the release a few milliseconds after the claim is gone.
    eventually("a killed sandbox is not running", lambda: sbx.is_running() is False, within=2)
    log("header mode ok")


def teams():
    sbx = Sandbox.create(template="base", timeout=60)
    other = {"api_key": OTHER_KEY}
    try:
        Sandbox.get_info(sbx.sandbox_id, **other)
        raise AssertionError("another team saw the sandbox")
    except e2b.exceptions.NotFoundException:
        pass
    except Exception as e:  # noqa: BLE001
        assert "not found" in str(e).lower(), repr(e)
    assert Sandbox.kill(sbx.sandbox_id, **other) is False
    listed = Sandbox.list(**other).next_items()
    assert sbx.sandbox_id not in [s.sandbox_id for s in listed]
    bad = "e2b_" + "0" * 40
    for call in (lambda: Sandbox.list(api_key=bad).next_items(), lambda: Sandbox.create(template="base", api_key=bad)):
        try:
            call()
            raise AssertionError("a bad key was accepted")
        except e2b.exceptions.AuthenticationException:
            pass
    try:
        Sandbox.create(template="no-such-template")
        raise AssertionError("an unknown template was accepted")
    except e2b.exceptions.SandboxException as e:
        assert "no-such-template" in str(e), str(e)
    assert http(sbx.get_host(8080))[0] == 200, "the owner's sandbox still routes"
    sbx.kill()
    log("teams ok")


if __name__ == "__main__":
    {"lifecycle": lifecycle, "timeout": timeout, "header-mode": header_mode, "teams": teams}[sys.argv[1]]()
