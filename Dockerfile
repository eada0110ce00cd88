# syntax=docker/dockerfile:1
#
# The outrider image: one binary for every role (proxy, init, controller).
# Build:  docker build -t ghcr.io/outrider-mesh/outrider:0.1.0 .
# Base images are pinned by version; pin them by digest in your registry
# mirror (no registry is reachable from where this file was written).

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# Manifests first, so the dependency layer is cached across source edits.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
COPY src src
# As bench/build-release.sh builds the measured binary: static glibc, and
# the functions a proxy runs laid out together and its relocations packed
# (less resident memory),
# aws-lc without its AVX-512 assembly and seeded by getrandom alone
# (docs/decisions.md, issue 13).
COPY bench/symbol-order.txt bench/symbol-order.txt
RUN AWS_LC_SYS_CFLAGS="-DMY_ASSEMBLER_IS_TOO_OLD_FOR_512AVX -DDISABLE_CPU_JITTER_ENTROPY" \
    RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs -C link-arg=-Wl,--symbol-ordering-file=/src/bench/symbol-order.txt -C link-arg=-Wl,--no-warn-symbol-ordering" \
    cargo build --release --locked --bin outrider --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/outrider /outrider \
 && strip /outrider

FROM debian:12.11-slim
# iptables for `outrider init` (both the nft and legacy flavors);
# ca-certificates for the Kubernetes API client.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /outrider /usr/local/bin/outrider
# Non-root by default: the proxy's UID. The injector runs the init
# container as root with NET_ADMIN/NET_RAW only; the chart runs the
# controller as 2103.
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/outrider"]
CMD ["--help"]
