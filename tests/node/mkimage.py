#!/usr/bin/env python3
"""Writes a single-layer OCI image as an OCI-layout tar that `ctr -n k8s.io images import` takes.

    mkimage.py OUT.tar NAME [--entrypoint '["/pause"]'] [--cmd '["-m","http.server"]'] [--env K=V] [--mkdir /usr ...]
               [--file SRC:DEST[:MODE]] [--symlink /bin:usr/bin] ...

NAME is the full reference the image is stored under, e.g. registry.k8s.io/pause:3.10.2
(the io.containerd.image.name annotation in index.json; containerd keeps it as is).
Only the standard library; the output is byte-for-byte reproducible (fixed mtimes, sorted entries).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile

EPOCH = 0  # fixed mtime: same inputs give the same digests


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, EPOCH, 0, 0
    info.uname = info.gname = ""
    if data is None:
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def layer_tar(files, dirs, links=()) -> bytes:
    """The root filesystem layer: directories first (parents implied), then files."""
    want = set()
    for d in dirs:
        p = d.strip("/")
        while p:
            want.add(p)
            p = os.path.dirname(p)
    for _, dest, _ in files:
        p = os.path.dirname(dest.strip("/"))
        while p:
            want.add(p)
            p = os.path.dirname(p)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(want):
            add(tar, d + "/", None, 0o755, tarfile.DIRTYPE)
        for src, dest, mode in sorted(files, key=lambda f: f[1]):
            with open(src, "rb") as f:
                add(tar, dest.strip("/"), f.read(), mode)
        for link, target in sorted(links):
            info = tarfile.TarInfo(link.strip("/"))
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, EPOCH
            tar.addfile(info)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("name")
    ap.add_argument("--entrypoint", type=json.loads, default=None, help='JSON list, e.g. \'["/pause"]\'')
    ap.add_argument("--cmd", type=json.loads, default=None, help="JSON list")
    ap.add_argument("--env", action="append", default=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    ap.add_argument("--user", default="")
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--mkdir", action="append", default=[], help="empty directory in the rootfs (a mount point)")
    ap.add_argument("--file", action="append", default=[], help="SRC:DEST[:OCTAL_MODE]")
    ap.add_argument("--symlink", action="append", default=[], help="LINK:TARGET, e.g. /bin:usr/bin")
    a = ap.parse_args()

    files = []
    for spec in a.file:
        parts = spec.split(":")
        files.append((parts[0], parts[1], int(parts[2], 8) if len(parts) > 2 else 0o755))

    raw = layer_tar(files, a.mkdir, [tuple(l.split(":", 1)) for l in a.symlink])
    gz = gzip.compress(raw, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {k: v for k, v in {
            "Env": a.env, "Entrypoint": a.entrypoint, "Cmd": a.cmd,
            "User": a.user or None, "WorkingDir": a.workdir}.items() if v is not None},
        "rootfs": {"type": "layers", "diff_ids": [sha256(raw)]},  # digest of the UNcompressed layer
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "mkimage.py"}],
    }
    config_b = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config_b), "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(gz), "size": len(gz)}],
    }
    manifest_b = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(manifest_b), "size": len(manifest_b),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": a.name,          # full name: used as is by ctr import
                "org.opencontainers.image.ref.name": tag,    # OCI tag-only form (with --base-name)
            },
        }],
    }
    index_b = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()

    with tarfile.open(a.out, "w", format=tarfile.PAX_FORMAT) as out:
        add(out, "blobs/", None, 0o755, tarfile.DIRTYPE)
        add(out, "blobs/sha256/", None, 0o755, tarfile.DIRTYPE)
        for blob in (gz, config_b, manifest_b):
            add(out, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob, 0o644)
        add(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', 0o644)
        add(out, "index.json", index_b, 0o644)
    print(f"{a.out}: {a.name} manifest {sha256(manifest_b)}")


if __name__ == "__main__":
    main()
