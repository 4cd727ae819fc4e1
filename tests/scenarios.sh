#!/usr/bin/env bash
# Runs the process-level scenarios (data plane, control API, idle release, pools, RBAC) against an
# API server reached only through a kubeconfig, each test in a namespace of its own.
#
#   tests/scenarios.sh [realapi]  a real kube-apiserver + etcd built from Go modules and started on
#                                 loopback (tests/controlplane/), as `make test` does. The harness
#                                 applies deploy/ to it and runs the binaries as their own
#                                 ServiceAccounts; the loopback kubelet runs the pods.
#   tests/scenarios.sh double     a standalone API double (sandgate-apidouble)
#   tests/scenarios.sh cluster    the cluster in $SANDGATE_TEST_KUBECONFIG, deploy/ applied first;
#                                 pods run $SANDGATE_TEST_ECHO_IMAGE (docker build --target echo .),
#                                 and this machine must reach pod IPs (see tests/src/target.rs)
#
# Scenarios named *_on_double stage races through the double's hooks and run only on a double;
# those named *_on_real_api need a real API server's admission (quota) or authorizer.
# SANDGATE_SCENARIOS="lifecycle pools" runs only those test files. The gateways run with the fast
# path (hot routes held in Envoy); the data-plane and idle files then run again with it off
# (SANDGATE_TEST_FAST_PATH=off), so both paths are tested.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
mode=${1:-realapi}
default_scenarios="kubelet dataplane upstream protocols fastpath failsafe control_api idle pools lifecycle e2b rbac churn"
[ "$mode" = node ] && default_scenarios="${default_scenarios#kubelet }"
read -ra tests <<<"${SANDGATE_SCENARIOS:-$default_scenarios}"
# The files run a second time with the fast path off.
both_paths=()
for t in "${tests[@]}"; do
	case "$t" in dataplane | upstream | protocols | idle) both_paths+=("$t") ;; esac
done
# Files whose tests run one at a time (node mode: they share one node's pod-start throughput).
serial=()
dir=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$dir"
}
trap cleanup EXIT

# Runs the scenarios, skipping those whose names contain any of "$@", then the data-plane and
# idle files again with the fast path off; prints cargo's output and leaves the counts in
# $dir/counts ("<passed> <failed>").
run() {
	local skip=()
	for s in "$@"; do skip+=(--skip "$s"); done
	local status=0
	for t in "${tests[@]}"; do
		local threads=()
		[[ " ${serial[*]} " == *" $t "* ]] && threads=(--test-threads 1)
		$CARGO test -q -p sandgate-tests --no-fail-fast --test "$t" -- "${skip[@]}" "${threads[@]}" 2>&1 |
			tee -a "$dir/scenarios.log" || status=1
	done
	for t in "${both_paths[@]}"; do
		echo "== $t with the fast path off"
		SANDGATE_TEST_FAST_PATH=off $CARGO test -q -p sandgate-tests --no-fail-fast --test "$t" -- "${skip[@]}" 2>&1 |
			tee -a "$dir/scenarios.log" || status=1
	done
	awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
		END { print p + 0, f + 0 }' "$dir/scenarios.log" >"$dir/counts"
	return $status
}

wait_for_file() { # <file> <seconds> <pid> <log>
	local deadline=$((SECONDS + $2))
	until [ -s "$1" ]; do
		kill -0 "$3" 2>/dev/null || { cat "$4" >&2; echo "$1: its process exited" >&2; exit 1; }
		[ $SECONDS -lt $deadline ] || { cat "$4" >&2; echo "$1 not written after $2 s" >&2; exit 1; }
		sleep 0.2
	done
}

case "$mode" in
realapi)
	bin=$(tests/controlplane/build.sh)
	export PATH="$bin:$PATH"
	tests/controlplane/up.sh "$dir/cp" 2>"$dir/up.log" &
	pids+=($!)
	wait_for_file "$dir/cp/kubeconfig" 180 "${pids[0]}" "$dir/up.log"
	export KUBECONFIG="$dir/cp/kubeconfig"
	kubectl apply -k deploy/ >/dev/null
	kubectl wait --for condition=Established --timeout 60s \
		crd/sandboxpools.sandgate.dev crd/sandboxclaims.sandgate.dev >/dev/null
	status=0
	SANDGATE_TEST_KUBECONFIG="$KUBECONFIG" SANDGATE_TEST_TARGET=realapi \
		SANDGATE_TEST_REPORT="$dir/report" run on_double || status=1
	read -r passed failed <"$dir/counts"
	denials=$(cat "$dir/report/rbac_denials" 2>/dev/null || echo 0)
	echo "RESULT realapi $(cat "$dir/cp/versions") scenarios=$((passed + failed)) failed=$failed rbac_denials_checked=$denials"
	exit $status
	;;
double)
	./target/debug/sandgate-apidouble "$dir/kubeconfig" 2>"$dir/double.log" &
	pids+=($!)
	wait_for_file "$dir/kubeconfig" 10 "${pids[0]}" "$dir/double.log"
	SANDGATE_TEST_KUBECONFIG="$dir/kubeconfig" SANDGATE_TEST_TARGET=double run needs_rbac on_real_api
	;;
node)
	# kube-apiserver + etcd as in realapi, and one real node (tests/node/up.sh): kubelet,
	# containerd, runc, CNI; the pods are real containers of an image built from sandgate-echo.
	# Left out: what only the loopback kubelet can stage (a container told to exit, turn
	# NotReady or take a given IP, through its kubelet.sandgate.dev/ annotations), and the
	# sandgate-envd sandbox, whose image (a shell and tools beside envd) is not built yet.
	# Also what binds its own servers at a pod's IP (a late listener, a hung port, h2c-only and
	# gRPC servers, a canary at a reused address), which on a real node lives in the pod's netns.
	loopback_only=(a_failed_pod_is_replaced a_dead_sandbox_fails an_idle_pod_stuck_not_ready
		why_a_pool_does_not_fill a_dead_pods_ip_given a_running_pod_that_is_not_ready
		the_sdk_reaches_sandgate_envd an_app_that_listens_a_second_late grpc_unary_and_server_streaming
		upstream_failures_answer_in_json each_client_protocol_reaches never_routes_to_a_reused_address
		failures_on_a_hot_route_answer_in_json)
	# The pool tests each start pods and give them 30 s: one node starts about three a second
	# (50 at once take ~15 s), so two such tests side by side miss their deadlines.
	serial=(pools)
	bin=$(tests/controlplane/build.sh)
	export PATH="$bin:$PATH"
	tests/controlplane/up.sh "$dir/cp" 2>"$dir/up.log" &
	pids+=($!)
	wait_for_file "$dir/cp/kubeconfig" 180 "${pids[0]}" "$dir/up.log"
	tests/node/up.sh "$dir/cp" "$dir/node" 2>"$dir/node.log" &
	pids+=($!)
	wait_for_file "$dir/node/versions" 300 "${pids[1]}" "$dir/node.log"
	export KUBECONFIG="$dir/cp/kubeconfig"
	kubectl apply -k deploy/ >/dev/null
	kubectl wait --for condition=Established --timeout 60s \
		crd/sandboxpools.sandgate.dev crd/sandboxclaims.sandgate.dev >/dev/null
	status=0
	SANDGATE_TEST_KUBECONFIG="$KUBECONFIG" SANDGATE_TEST_TARGET=cluster \
		SANDGATE_TEST_ECHO_IMAGE=sandgate.local/echo:1 \
		SANDGATE_TEST_REPORT="$dir/report" run on_double "${loopback_only[@]}" || status=1
	read -r passed failed <"$dir/counts"
	echo "RESULT node $(cat "$dir/node/versions") scenarios=$((passed + failed)) failed=$failed $(cat "$dir/report/churn" 2>/dev/null)"
	# The node's own teardown runs when its script is stopped (the EXIT trap above).
	kill "${pids[1]}" 2>/dev/null
	wait "${pids[1]}" 2>/dev/null || true
	exit $status
	;;
cluster)
	: "${SANDGATE_TEST_KUBECONFIG:?set it to the kubeconfig of the cluster}"
	: "${SANDGATE_TEST_ECHO_IMAGE:?set it to an image built with: docker build --target echo .}"
	kubectl --kubeconfig "$SANDGATE_TEST_KUBECONFIG" apply -k deploy/
	SANDGATE_TEST_TARGET=cluster SANDGATE_TEST_REPORT="$dir/report" run on_double
	;;
*)
	echo "usage: $0 [realapi|double|node|cluster]" >&2
	exit 2
	;;
esac
