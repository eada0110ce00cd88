#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need,
# then checks formatting and lints and runs every test (unit, black-box,
# the real Prometheus scrape). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: prometheus + promtool for the scrape test; iptables,
# iproute2, tcpdump and setpriv (util-linux) for the interception tests in
# network namespaces.
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need prometheus prometheus
need promtool prometheus
need iptables-nft-restore iptables
need iptables-legacy-restore iptables
need ip iproute2
need tcpdump tcpdump
need setpriv util-linux
if [ ${#missing[@]} -gt 0 ]; then
  echo "ci/test.sh: installing ${missing[*]} (Debian)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
