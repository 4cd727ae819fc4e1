#!/usr/bin/env bash
# Runs the process-level scenarios (data plane, control API, idle release, pools) against an API
# server reached only through a kubeconfig, each test in a namespace of its own.
#
#   tests/scenarios.sh            a standalone API double (sandgate-apidouble), as `make test` does
#   tests/scenarios.sh cluster    the cluster in $SANDGATE_TEST_KUBECONFIG; pods run
#                                 $SANDGATE_TEST_ECHO_IMAGE (docker build --target echo .), and
#                                 this machine must reach pod IPs (see tests/src/target.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
FILTER='binary(dataplane) | binary(control_api) | binary(idle) | binary(pools)'

run() {
	if $CARGO nextest --version >/dev/null 2>&1; then
		$CARGO nextest run -p sandgate-tests --no-fail-fast -E "$FILTER"
	else
		for t in dataplane control_api idle pools; do
			$CARGO test -p sandgate-tests --no-fail-fast --test "$t"
		done
	fi
}

case "${1:-double}" in
double)
	dir=$(mktemp -d)
	./target/debug/sandgate-apidouble "$dir/kubeconfig" 2>"$dir/double.log" &
	pid=$!
	trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
	for _ in $(seq 100); do [ -s "$dir/kubeconfig" ] && break; sleep 0.1; done
	[ -s "$dir/kubeconfig" ] || { cat "$dir/double.log"; echo "sandgate-apidouble did not start" >&2; exit 1; }
	SANDGATE_TEST_KUBECONFIG="$dir/kubeconfig" run
	;;
cluster)
	: "${SANDGATE_TEST_KUBECONFIG:?set it to the kubeconfig of the cluster}"
	: "${SANDGATE_TEST_ECHO_IMAGE:?set it to an image built with: docker build --target echo .}"
	kubectl --kubeconfig "$SANDGATE_TEST_KUBECONFIG" apply -f deploy/crds/
	run
	;;
*)
	echo "usage: $0 [double|cluster]" >&2
	exit 2
	;;
esac
