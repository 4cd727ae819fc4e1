#!/usr/bin/env bash
# Starts a real Kubernetes control plane on loopback for the tests: etcd and kube-apiserver (built
# by build.sh) on free ports, with RBAC authorization, service-account signing keys and serving
# certificates generated at start, and a static admin token for the harness. No controller-manager,
# scheduler or kubelet runs: the test harness fills those gaps (tests/src/target.rs).
#
#   tests/controlplane/up.sh <dir>
#
# Writes <dir>/kubeconfig (admin) once /readyz answers ok, and <dir>/versions; runs until it gets
# SIGTERM or SIGINT, then stops both servers. Logs go to <dir>/etcd.log and <dir>/apiserver.log.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: $0 <dir>}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="$("$here/build.sh")"

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
# Stops the servers, kube-apiserver first (it would wait on a vanished etcd); a throwaway
# control plane gets 5 s to exit and is then killed.
stop() {
	local i p
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		p=${pids[$i]}
		kill "$p" 2>/dev/null || continue
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 0' TERM INT

# Serving certificate (a CA of our own, so clients verify it), service-account signing keys, and
# the admin's token.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=sandgate-test-ca" \
	-keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
	-keyout "$dir/apiserver.key" -out "$dir/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >"$dir/san.ext"
openssl x509 -req -in "$dir/apiserver.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
	-CAcreateserial -days 2 -extfile "$dir/san.ext" -out "$dir/apiserver.crt" 2>/dev/null
openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
token="sandgate-admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s,sandgate-admin,sandgate-admin,"system:masters"\n' "$token" >"$dir/tokens.csv"

etcd_client=$(free_port)
etcd_peer=$(free_port)
"$bin/etcd" --name default --data-dir "$dir/etcd-data" \
	--listen-client-urls "http://127.0.0.1:$etcd_client" \
	--advertise-client-urls "http://127.0.0.1:$etcd_client" \
	--listen-peer-urls "http://127.0.0.1:$etcd_peer" \
	--initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
	--initial-cluster "default=http://127.0.0.1:$etcd_peer" \
	--unsafe-no-fsync --log-level warn >"$dir/etcd.log" 2>&1 &
pids+=($!)

port=$(free_port)
"$bin/kube-apiserver" \
	--etcd-servers "http://127.0.0.1:$etcd_client" \
	--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
	--tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
	--token-auth-file "$dir/tokens.csv" \
	--authorization-mode RBAC \
	--service-account-issuer https://kubernetes.default.svc \
	--service-account-key-file "$dir/sa.pub" \
	--service-account-signing-key-file "$dir/sa.key" \
	--service-cluster-ip-range 10.96.0.0/16 \
	--cert-dir "$dir/certs" \
	--v 1 >"$dir/apiserver.log" 2>&1 &
pids+=($!)

url="https://127.0.0.1:$port"
deadline=$((SECONDS + 120))
until [ "$(curl -s --cacert "$dir/ca.crt" -H "Authorization: Bearer $token" "$url/readyz" 2>/dev/null)" = ok ]; do
	for p in "${pids[@]}"; do
		kill -0 "$p" 2>/dev/null || { tail -30 "$dir/etcd.log" "$dir/apiserver.log" >&2; echo "control plane exited" >&2; exit 1; }
	done
	if [ $SECONDS -ge $deadline ]; then
		tail -30 "$dir/apiserver.log" >&2
		echo "kube-apiserver not ready after 120 s" >&2
		exit 1
	fi
	sleep 0.2
done

server_version=$(curl -s --cacert "$dir/ca.crt" -H "Authorization: Bearer $token" "$url/version" |
	python3 -c 'import json, sys; print(json.load(sys.stdin)["gitVersion"])')
etcd_version=$(curl -s "http://127.0.0.1:$etcd_client/version" |
	python3 -c 'import json, sys; print(json.load(sys.stdin)["etcdserver"])')
printf 'server=%s etcd=%s\n' "$server_version" "$etcd_version" >"$dir/versions"

ca=$(base64 -w0 <"$dir/ca.crt")
cat >"$dir/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: realapi
  cluster:
    server: $url
    certificate-authority-data: $ca
contexts:
- name: realapi
  context:
    cluster: realapi
    user: sandgate-admin
    namespace: default
current-context: realapi
users:
- name: sandgate-admin
  user:
    token: $token
EOF
mv "$dir/kubeconfig.tmp" "$dir/kubeconfig"
echo "control plane ready: $url ($server_version, etcd $etcd_version); kubeconfig $dir/kubeconfig" >&2
while :; do
	for p in "${pids[@]}"; do
		kill -0 "$p" 2>/dev/null || { tail -30 "$dir/apiserver.log" >&2; echo "control plane exited" >&2; exit 1; }
	done
	sleep 1 &
	wait $! || true
done
