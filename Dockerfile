# Static sandgate binaries in a minimal non-root image.
#   docker build -t ghcr.io/sandgate/sandgate:0.1.0 .
# The echo sandbox the test scenarios run on a real cluster (see tests/src/target.rs):
#   docker build --target echo -t sandgate/echo:test .
# (Nothing on the development machines can build images; this file is kept simple and conventional.)
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p sandgate-extproc -p sandgate-controller -p sandgate-api \
 && cp target/x86_64-unknown-linux-musl/release/sandgate-extproc \
       target/x86_64-unknown-linux-musl/release/sandgate-controller \
       target/x86_64-unknown-linux-musl/release/sandgate-api /

FROM build AS echo-build
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p sandgate-tests --bin sandgate-echo \
 && cp target/x86_64-unknown-linux-musl/release/sandgate-echo /

FROM gcr.io/distroless/static-debian12:nonroot AS echo
COPY --from=echo-build /sandgate-echo /
USER 65532:65532
ENTRYPOINT ["/sandgate-echo"]

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /sandgate-extproc /sandgate-controller /sandgate-api /
USER 65532:65532
ENTRYPOINT ["/sandgate-extproc"]
