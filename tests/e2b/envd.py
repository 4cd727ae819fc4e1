"""The unmodified E2B Python SDK against sandgate-envd: commands, files, PTY and watch.

Run by tests/tests/envd.rs: `python envd.py <direct|secure|sandbox>`.
- direct: E2B_DEBUG=true, the SDK talks to E2B_SANDBOX_URL (sandgate-envd) as it would to envd in
  debug mode (envdVersion 99.99.99, no token);
- secure: a Sandbox object built by hand with envdVersion SANDGATE_ENVD_VERSION and the access
  token SANDGATE_ENVD_TOKEN (as a create response would give them); calls without the token
  must be refused;
- sandbox: Sandbox.create() through sandgate-api (E2B_API_URL ...), envd reached through the
  gateway on the sandbox host, with the envdAccessToken the API returned.
Every check is an assert; the exit status is the verdict.
"""

import os
import sys
import threading
import time

import e2b
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    PtySize,
    Sandbox,
)

VERSION = __import__("importlib.metadata").metadata.version("e2b")
MODE = sys.argv[1]
BIG = int(os.environ.get("SANDGATE_ENVD_BIG_MB", "50")) << 20


def log(*a):
    print(f"[envd {VERSION} {MODE}]", *a, flush=True)


def connect():
    if MODE == "direct":
        return Sandbox.create()
    if MODE == "secure":
        from e2b.connection_config import ConnectionConfig
        from packaging.version import Version

        token = os.environ["SANDGATE_ENVD_TOKEN"]
        sid = "sbx-secure"
        cfg = ConnectionConfig(
            extra_sandbox_headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token}
        )
        return Sandbox(
            sandbox_id=sid,
            sandbox_domain=None,
            envd_version=Version(os.environ["SANDGATE_ENVD_VERSION"]),
            envd_access_token=token,
            traffic_access_token=None,
            connection_config=cfg,
        )
    return Sandbox.create("envd", timeout=120, envs={"FROM_CREATE": "create-env"})


def commands(sbx, workdir):
    r = sbx.commands.run("echo hello; echo $GREETING; pwd", envs={"GREETING": "hi there"}, cwd=workdir)
    assert r.exit_code == 0 and r.stdout == f"hello\nhi there\n{workdir}\n", r
    try:
        sbx.commands.run("echo oops >&2; exit 3")
        raise AssertionError("a failing command did not raise")
    except CommandExitException as e:
        assert e.exit_code == 3 and e.stderr == "oops\n", (e.exit_code, e.stderr)
    try:
        sbx.commands.run("true", cwd="/no/such/dir")
        raise AssertionError("a bad cwd did not raise")
    except InvalidArgumentException as e:
        assert "does not exist" in str(e), e
    log("run: stdout, env, cwd, stderr, exit code, bad cwd")

    # A 10 s command whose output streams: the first line is seen long before the end.
    seen = []
    start = time.time()
    r = sbx.commands.run(
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo line$i; sleep 1; done",
        on_stdout=lambda line: seen.append((time.time() - start, line)),
        timeout=60,
    )
    assert r.stdout.count("line") == 10, r.stdout
    assert seen and seen[0][0] < 3 and seen[-1][0] > 8, seen
    log(f"streamed: first line after {seen[0][0]:.1f}s, last after {seen[-1][0]:.1f}s")

    # Background, list, connect, kill.
    h = sbx.commands.run("echo started; sleep 60", background=True, timeout=0)
    assert any(p.pid == h.pid for p in sbx.commands.list()), "background process not listed"
    other = sbx.commands.connect(h.pid)
    assert sbx.commands.kill(h.pid) is True
    for handle in (h, other):
        try:
            handle.wait()
            raise AssertionError("a killed command did not raise")
        except CommandExitException as e:
            assert e.exit_code == -1, e.exit_code
    assert sbx.commands.kill(h.pid) is False
    log("background, list, connect, kill")

    # stdin.
    h = sbx.commands.run("cat", background=True, stdin=True, timeout=30)
    sbx.commands.send_stdin(h.pid, "through stdin\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "through stdin\n", r.stdout
    log("stdin")


def files(sbx, workdir):
    d = f"{workdir}/files"
    assert sbx.files.make_dir(d) is True
    assert sbx.files.make_dir(d) is False
    info = sbx.files.write(f"{d}/a.txt", "some text")
    assert info.path == f"{d}/a.txt", info
    assert sbx.files.read(f"{d}/a.txt") == "some text"
    assert sbx.files.exists(f"{d}/a.txt") and not sbx.files.exists(f"{d}/missing")
    try:
        sbx.files.read(f"{d}/missing")
        raise AssertionError("reading a missing file did not raise")
    except FileNotFoundException:
        pass
    sbx.files.write_files([{"path": f"{d}/x.txt", "data": "x"}, {"path": f"{d}/sub/y.txt", "data": b"y"}])
    names = sorted(e.name for e in sbx.files.list(d, depth=2))
    assert names == ["a.txt", "sub", "x.txt", "y.txt"], names
    sbx.files.rename(f"{d}/a.txt", f"{d}/b.txt")
    assert not sbx.files.exists(f"{d}/a.txt") and sbx.files.read(f"{d}/b.txt") == "some text"
    sbx.files.remove(f"{d}/sub")
    assert not sbx.files.exists(f"{d}/sub")
    log("make_dir, write, read, exists, list, rename, remove")

    blob = os.urandom(BIG)
    t = time.time()
    sbx.files.write(f"{d}/big.bin", blob)
    w = time.time() - t
    t = time.time()
    back = sbx.files.read(f"{d}/big.bin", format="bytes")
    r = time.time() - t
    assert bytes(back) == blob, "the big file came back different"
    log(f"RESULT-PART file_{BIG >> 20}mb_write_mb_s={(BIG >> 20) / w:.1f} file_{BIG >> 20}mb_read_mb_s={(BIG >> 20) / r:.1f}")

    # watch_dir (the sync SDK polls a watcher).
    wd = f"{workdir}/watched"
    sbx.files.make_dir(wd)
    handle = sbx.files.watch_dir(wd)
    sbx.files.write(f"{wd}/new.txt", "n")
    deadline = time.time() + 10
    events = []
    while time.time() < deadline:
        events += handle.get_new_events()
        if any(e.name == "new.txt" and e.type.name == "CREATE" for e in events):
            break
        time.sleep(0.1)
    handle.stop()
    assert any(e.name == "new.txt" and e.type.name == "CREATE" for e in events), events
    log("watch_dir")


def pty(sbx, workdir):
    out = bytearray()
    got = threading.Event()

    def on_data(data):
        out.extend(data)
        if b"PTY-OK" in out and b"40 120" in out:
            got.set()

    p = sbx.pty.create(PtySize(rows=24, cols=80), cwd=workdir, timeout=60)
    reader = threading.Thread(target=lambda: _wait_quietly(p, on_data), daemon=True)
    reader.start()
    sbx.pty.resize(p.pid, PtySize(rows=40, cols=120))
    sbx.pty.send_stdin(p.pid, b"stty size; echo PTY-$((1+1))K | tr 2 O\n")
    assert got.wait(15), bytes(out)
    assert sbx.pty.kill(p.pid) is True
    reader.join(10)
    assert not reader.is_alive(), "the terminal's stream did not end after kill"
    log("pty: input, resize, kill")


def _wait_quietly(handle, on_pty):
    try:
        handle.wait(on_pty=on_pty)
    except CommandExitException:
        pass  # killed


def refused_without_token():
    from e2b.connection_config import ConnectionConfig
    from packaging.version import Version

    cfg = ConnectionConfig(extra_sandbox_headers={"E2b-Sandbox-Id": "sbx-secure", "E2b-Sandbox-Port": "49983"})
    bare = Sandbox(
        sandbox_id="sbx-secure",
        sandbox_domain=None,
        envd_version=Version(os.environ["SANDGATE_ENVD_VERSION"]),
        envd_access_token=None,
        traffic_access_token=None,
        connection_config=cfg,
    )
    for what, call in [
        ("run", lambda: bare.commands.run("true")),
        ("list", lambda: bare.commands.list()),
        ("read", lambda: bare.files.read("/etc/hostname")),
        ("write", lambda: bare.files.write("/tmp/x", "x")),
    ]:
        served = False
        try:
            call()
            served = True
        except AuthenticationException:
            pass
        assert not served, f"{what} without the token was served"
    log("calls without the token are refused")


def signed_urls(sbx, workdir):
    import urllib.error
    import urllib.request

    sbx.files.write(f"{workdir}/signed.txt", "signed")
    url = sbx.download_url(f"{workdir}/signed.txt")
    assert "signature=v1_" in url, url
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"signed"
    for bad in (url.replace("signature=v1_", "signature=v1_x"), url.split("&signature=")[0]):
        try:
            urllib.request.urlopen(bad, timeout=10)
            raise SystemExit(f"a download without a valid signature was served: {bad}")
        except urllib.error.HTTPError as e:
            assert e.code == 401, e.code
    log("signed download URL served, tampered or unsigned refused")


def through_the_gateway(sbx):
    """Checks only a sandbox created through sandgate-api has: its token, its other ports."""
    import json
    import urllib.error
    import urllib.request

    gateway = os.environ["SANDGATE_GATEWAY"]
    token = getattr(sbx, "_envd_access_token", None)
    assert token, "a secure sandbox on a sandgate-envd pool gets an envdAccessToken"
    r = sbx.commands.run("echo $FROM_CREATE")
    assert r.stdout == "create-env\n", r.stdout

    def call(path, headers, body=b"{}"):
        req = urllib.request.Request(f"http://{gateway}{path}", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983", "Content-Type": "application/json"}
    status, body = call("/process.Process/List", route)
    assert status == 401, (status, body)
    status, body = call("/process.Process/List", {**route, "X-Access-Token": token})
    assert status == 200 and "processes" in json.loads(body), (status, body)
    # envd's /init is the control plane's alone, even with the token.
    status, body = call("/init", {**route, "X-Access-Token": token}, b'{"accessToken": "mine"}')
    assert status == 403, (status, body)
    # The sandbox's own port is still routed.
    req = urllib.request.Request(f"http://{gateway}/", headers={"Host": sbx.get_host(8080)})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    log("through the gateway: token required, /init refused, port 8080 routed")
    sbx.kill()


def main():
    sbx = connect()
    workdir = os.environ.get("SANDGATE_ENVD_WORKDIR") or sbx.commands.run("mktemp -d").stdout.strip()
    commands(sbx, workdir)
    files(sbx, workdir)
    pty(sbx, workdir)
    if MODE == "secure":
        refused_without_token()
        signed_urls(sbx, workdir)
    if MODE == "sandbox":
        through_the_gateway(sbx)
    log("all passed")


if __name__ == "__main__":
    main()
