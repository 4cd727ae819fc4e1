#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kubectl, etcd) from the Go modules pinned in
# k8s/go.mod and etcd/go.mod, into a cache outside the repo keyed by version and go.sum, so a
# second run does not rebuild. Prints the directory holding the binaries.
#
#   tests/controlplane/build.sh            # build if missing, print the bin directory
#
# SANDGATE_CACHE overrides the cache root (default ~/.cache/sandgate).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# kubernetes v1.36 needs Go >= 1.26.0, which the machine has; no GOTOOLCHAIN switch is needed.
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly

k8s_version="$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$here/k8s/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit} $2 == "go.etcd.io/etcd/server/v3" {print $3; exit}' "$here/etcd/go.mod")"
key="$(cat "$here/k8s/go.sum" "$here/etcd/go.sum" "$here/build.sh" | sha256sum | cut -c1-12)"
out="${SANDGATE_CACHE:-$HOME/.cache/sandgate}/controlplane/k8s-$k8s_version-etcd-$etcd_version-$key"

if [[ -x "$out/kube-apiserver" && -x "$out/kubectl" && -x "$out/etcd" ]]; then
	echo "$out"
	exit 0
fi

mkdir -p "$out.tmp"
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
start=$SECONDS
echo "building kube-apiserver and kubectl $k8s_version (cold: several minutes)" >&2
(cd "$here/k8s" && go build -trimpath -ldflags "$ldflags" -o "$out.tmp/" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
echo "building etcd $etcd_version" >&2
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" ./cmd/etcd)
rm -rf "$out" && mv "$out.tmp" "$out"
echo "control plane built in $((SECONDS - start)) s" >&2
echo "$out"
