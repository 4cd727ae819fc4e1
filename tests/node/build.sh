#!/usr/bin/env bash
# Builds (or finds cached) what a real test node runs, and prints the directory holding it:
# kubelet, kube-scheduler and kube-controller-manager from the Go modules pinned in k8s/go.mod
# (the control plane's version), and containerd, runc, the CNI plugins, iptables and catatonit
# (the pause process) from Debian's packages, installed if missing.
#
#   tests/node/build.sh      # build if missing, print the bin directory
#
# SANDGATE_CACHE overrides the cache root (default ~/.cache/sandgate).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly

need=()
for cmd in containerd:containerd runc:runc iptables:iptables catatonit:catatonit; do
	command -v "${cmd%%:*}" >/dev/null || need+=("${cmd##*:}")
done
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
	echo "installing ${need[*]} from Debian's packages" >&2
	apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

k8s_version="$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$here/k8s/go.mod")"
key="$(cat "$here/k8s/go.sum" "$here/build.sh" | sha256sum | cut -c1-12)"
out="${SANDGATE_CACHE:-$HOME/.cache/sandgate}/node/k8s-$k8s_version-$key"
if [[ -x "$out/kubelet" && -x "$out/kube-scheduler" && -x "$out/kube-controller-manager" ]]; then
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
echo "building kubelet, kube-scheduler and kube-controller-manager $k8s_version (cold: several minutes)" >&2
(cd "$here/k8s" && go build -trimpath -ldflags "$ldflags" -o "$out.tmp/" \
	k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler \
	k8s.io/kubernetes/cmd/kube-controller-manager)
rm -rf "$out" && mv "$out.tmp" "$out"
echo "node built in $((SECONDS - start)) s" >&2
echo "$out"
