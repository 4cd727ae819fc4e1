#!/usr/bin/env bash
# One real node for a running test control plane (tests/controlplane/up.sh): containerd with its
# own root, state and socket under <dir>, runc, a CNI bridge (sgt0, 10.88.0.0/25, which exists
# only on it), kubelet, kube-scheduler and kube-controller-manager, and the images the tests run
# (built here from this repository's binaries and imported; no registry is reachable).
#
#   tests/node/up.sh <controlplane-dir> <dir>
#
# Writes <dir>/versions ("kubelet=… containerd=… runc=…") once the node is Ready, then runs until
# killed. On exit, even after a failure, it takes down what it made: pods and their sandboxes
# (through the kubelet first, so CNI releases each address), processes, mounts under <dir>, the
# bridge, the netns and iptables chains the CNI plugins made, the pods' cgroups, and the kernel
# settings kubelet changes.
#
# Needs root, a kernel with overlayfs and cgroup v1 or v2. Known here: cgroup v1 (hybrid), no
# systemd, no CAP_SYS_RESOURCE (so containerd must not lower OOM scores: restrict_oom_score_adj).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cp="$(cd "${1:?usage: $0 <controlplane-dir> <dir>}" && pwd)"
dir="${2:?usage: $0 <controlplane-dir> <dir>}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="$("$here/build.sh")"
cpbin="$("$here/../controlplane/build.sh")"
repo="$(cd "$here/../.." && pwd)"
node=sandgate-node
bridge=sgt0
subnet=10.88.0.0/25
export KUBECONFIG="$cp/kubeconfig"
kubectl() { "$cpbin/kubectl" "$@"; }

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Kernel settings kubelet sets (protectKernelDefaults: false), restored on exit.
sysctls=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward)
declare -A saved
for s in "${sysctls[@]}"; do
	[ -r "/proc/sys/$s" ] && saved[$s]="$(cat "/proc/sys/$s")"
done
netns_before="$(ls /var/run/netns 2>/dev/null || true)"
# Paths containerd, its shims and the CNI library use whatever their config says.
made=()
for p in /run/containerd /var/lib/cni /var/run/netns /etc/cni; do
	[ -e "$p" ] || made+=("$p")
done

pids=()
names=()
start() { # <name> <log> <command...>
	local name=$1 log=$2
	shift 2
	"$@" >"$log" 2>&1 &
	pids+=($!)
	names+=("$name")
}

teardown() {
	set +e
	trap - EXIT TERM INT
	echo "node: tearing down" >&2
	# Pods first, through the kubelet, so each sandbox is stopped and CNI releases its address.
	if [ -n "${kubelet_pid:-}" ] && kill -0 "$kubelet_pid" 2>/dev/null; then
		kubectl delete pods --all -A --grace-period=1 --wait=false >/dev/null 2>&1
		for _ in $(seq 60); do
			[ -z "$(ctr_ -n k8s.io containers list -q 2>/dev/null)" ] && break
			sleep 0.5
		done
	fi
	local i p
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		p=${pids[$i]}
		kill "$p" 2>/dev/null || continue
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$p" 2>/dev/null
	done
	# Whatever containerd left running (shims of this containerd only).
	pkill -9 -f "containerd-shim.*-address $dir/containerd.sock" 2>/dev/null
	for _ in $(seq 20); do pgrep -f "containerd-shim.*-address $dir/containerd.sock" >/dev/null || break; sleep 0.1; done
	wait 2>/dev/null
	# Mounts under <dir>, deepest first.
	for _ in 1 2 3; do
		awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
			while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
	done
	# The netns the CNI plugins made during this run.
	for ns in $(ls /var/run/netns 2>/dev/null); do
		grep -qx "$ns" <<<"$netns_before" || ip netns delete "$ns" 2>/dev/null
	done
	ip link delete "$bridge" 2>/dev/null
	# The bridge plugin's masquerade chains and the portmap plugin's.
	for table in nat filter; do
		iptables -t "$table" -S 2>/dev/null | awk '/^-A .*(CNI-|sandgate-node)/' | sed 's/^-A/-D/' |
			while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null; done
		iptables -t "$table" -S 2>/dev/null | awk '/^-N CNI-/ {print $2}' |
			while read -r chain; do iptables -t "$table" -F "$chain" 2>/dev/null; iptables -t "$table" -X "$chain" 2>/dev/null; done
	done
	# The pods' cgroups (empty once their processes are gone).
	for root in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
		[ -d "${root}kubepods" ] && find "${root}kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
		[ -d "${root}kubepods.slice" ] && find "${root}kubepods.slice" -depth -type d -exec rmdir {} + 2>/dev/null
	done
	for s in "${!saved[@]}"; do echo "${saved[$s]}" >"/proc/sys/$s" 2>/dev/null; done
	rm -rf "$dir/containerd-root" "$dir/kubelet" "$dir/ipam"
	for p in "${made[@]}"; do rm -rf "$p"; done
	echo "node: down" >&2
}
trap teardown EXIT
trap 'exit 0' TERM INT

ctr_() { ctr -a "$dir/containerd.sock" "$@"; }

# --- containerd ------------------------------------------------------------------------------
mkdir -p "$dir/cni.d" "$dir/ipam" "$dir/images" "$dir/cni-bin"
# Debian's CNI plugins, and cni-neigh (see its header: a reused pod address must not keep the
# last pod's ARP entry), in one directory, as containerd takes one.
ln -sf /usr/lib/cni/* "$dir/cni-bin/"
ln -sf "$here/cni-neigh" "$dir/cni-bin/cni-neigh"
cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd-root"
state = "$dir/containerd-state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.2"
  # No process here may lower an OOM score (no CAP_SYS_RESOURCE): runc would fail every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni-bin"
    conf_dir = "$dir/cni.d"
EOF
cat >"$dir/cni.d/10-sandgate.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sandgate-node",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$subnet"}]], "dataDir": "$dir/ipam"}},
    {"type": "cni-neigh", "bridge": "$bridge"},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
start containerd "$dir/containerd.log" containerd --config "$dir/containerd.toml"
for _ in $(seq 100); do [ -S "$dir/containerd.sock" ] && ctr_ version >/dev/null 2>&1 && break; sleep 0.1; done
ctr_ version >/dev/null || { tail -20 "$dir/containerd.log" >&2; echo "containerd did not start" >&2; exit 1; }

# --- images ----------------------------------------------------------------------------------
# A binary and the shared libraries it links, at their own paths (no registry, no base image).
image() { # <name> <binary> [mkimage args...]
	local name=$1 binary=$2
	shift 2
	local files=(--file "$binary:/$(basename "$binary"):755")
	while read -r lib; do
		[ -n "$lib" ] && files+=(--file "$(readlink -f "$lib"):$lib:755")
	done < <(ldd "$binary" 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u)
	python3 "$here/mkimage.py" "$dir/images/$(echo "$name" | tr '/:' '__').tar" "$name" "${files[@]}" "$@" >/dev/null
	ctr_ -n k8s.io images import "$dir/images/$(echo "$name" | tr '/:' '__').tar" >/dev/null
}
image registry.k8s.io/pause:3.10.2 "$(command -v catatonit)" --entrypoint '["/catatonit", "-P"]'
echo_bin="${SANDGATE_NODE_ECHO_BIN:-$repo/target/debug/sandgate-echo}"
[ -x "$echo_bin" ] || { echo "$echo_bin not built: cargo build -p sandgate-tests --bin sandgate-echo" >&2; exit 1; }
image sandgate.local/echo:1 "$echo_bin" --entrypoint '["/sandgate-echo"]' --mkdir /tmp

# --- kubelet, scheduler, controller manager --------------------------------------------------
kubelet_port=$(free_port)
healthz_port=$(free_port)
cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$dir/containerd.sock
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
oomScoreAdj: 0
protectKernelDefaults: false
resolvConf: ""
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
maxPods: 110
podLogsDir: $dir/pod-logs
volumePluginDir: $dir/volume-plugins
EOF
start kubelet "$dir/kubelet.log" "$bin/kubelet" --config "$dir/kubelet.yaml" --kubeconfig "$cp/kubeconfig" \
	--hostname-override "$node" --node-ip 127.0.0.1 --root-dir "$dir/kubelet" --cert-dir "$dir/kubelet-pki" --v 1
kubelet_pid=${pids[-1]}
sched_port=$(free_port)
start scheduler "$dir/scheduler.log" "$bin/kube-scheduler" --kubeconfig "$cp/kubeconfig" \
	--authentication-kubeconfig "$cp/kubeconfig" --authorization-kubeconfig "$cp/kubeconfig" \
	--bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false --v 1
cm_port=$(free_port)
start controller-manager "$dir/controller-manager.log" "$bin/kube-controller-manager" --kubeconfig "$cp/kubeconfig" \
	--authentication-kubeconfig "$cp/kubeconfig" --authorization-kubeconfig "$cp/kubeconfig" \
	--bind-address 127.0.0.1 --secure-port "$cm_port" --leader-elect=false \
	--root-ca-file "$cp/ca.crt" --service-account-private-key-file "$cp/sa.key" \
	--use-service-account-credentials=false --v 1

alive() {
	local i
	for i in "${!pids[@]}"; do
		kill -0 "${pids[$i]}" 2>/dev/null || { tail -40 "$dir/${names[$i]}.log" >&2; echo "node: ${names[$i]} exited" >&2; return 1; }
	done
}
deadline=$((SECONDS + 120))
until [ "$(kubectl get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; do
	alive || exit 1
	if [ $SECONDS -ge $deadline ]; then
		tail -40 "$dir/kubelet.log" >&2
		echo "node $node not Ready after 120 s" >&2
		exit 1
	fi
	sleep 0.5
done
kubelet_version=$(kubectl get node "$node" -o jsonpath='{.status.nodeInfo.kubeletVersion}')
runtime=$(kubectl get node "$node" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}')
printf 'kubelet=%s containerd=%s runc=%s\n' "$kubelet_version" "${runtime#containerd://}" \
	"$(runc --version | awk 'NR == 1 {print $3}')" >"$dir/versions.tmp"
mv "$dir/versions.tmp" "$dir/versions"
echo "node $node Ready: $(cat "$dir/versions")" >&2
while :; do
	alive || exit 1
	sleep 1 &
	wait $! || true
done
