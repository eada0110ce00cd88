#!/usr/bin/env bash
# Builds the release binary as it is shipped: statically linked against
# glibc (no runtime dependencies, a `FROM scratch`-style image, and about
# 0.8 MiB less resident memory per proxy than the dynamically linked build,
# which maps all of libc, libm and the loader). Prints the binary's path.
#
# The proxy resolves one host name, the controller's discovery Service
# (`discovery.address`), with getaddrinfo. Static glibc 2.36 resolves
# through /etc/hosts and DNS (/etc/resolv.conf, search list, ndots) without
# loading NSS modules for the `files dns` lookups a pod's nsswitch.conf
# names; the image's Debian base carries the same glibc for any other NSS
# module. tests/interception.rs resolves the name through a DNS server in
# a network namespace (docs/decisions.md: why not a Rust DNS resolver).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
# The functions a proxy runs, laid out together by the linker
# (bench/symbol-order.sh regenerates the list): 2.3 MiB less resident code
# per proxy at idle than the compiler's order.
order="$PWD/bench/symbol-order.txt"
# aws-lc as the proxy needs it (docs/decisions.md, issue 13):
# - without its AVX-512 assembly (AES-GCM, AES-XTS, RSAZ: ~900 KB of code,
#   the two AES-GCM routines 340 KB each, touched all over by every TLS
#   record): 0.3-0.6 MiB less resident per proxy, no measurable throughput
#   difference for proxied requests; the AVX2/AES-NI code remains;
# - seeded by the kernel (getrandom) alone, as ring and BoringSSL are,
#   without the CPU-jitter entropy source a FIPS build needs: its
#   collectors keep 128 KiB each, written all over, resident for good.
export AWS_LC_SYS_CFLAGS="${AWS_LC_SYS_CFLAGS:--DMY_ASSEMBLER_IS_TOO_OLD_FOR_512AVX -DDISABLE_CPU_JITTER_ENTROPY}"
# The relative relocations a position-independent binary applies to itself
# at startup, packed (DT_RELR, read by glibc >= 2.36, static or not): the
# proxy reads all of them once, and as 24-byte RELA entries they were
# 615 KB of the binary, resident in every proxy for good.
relocs="-C link-arg=-Wl,-z,pack-relative-relocs"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static $relocs -C link-arg=-Wl,--symbol-ordering-file=$order -C link-arg=-Wl,--no-warn-symbol-ordering" \
  cargo build --release --locked --target "$host" >&2
echo "$PWD/target/$host/release/outrider"
