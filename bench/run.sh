#!/usr/bin/env bash
# Runs ../shared/bench/mesh-bench.sh with outrider added as a contender,
# against a release build. Extra arguments go to mesh-bench (for example
# --quick, --reps 6, --contenders direct,envoy,haproxy,nginx).
#
#   bench/run.sh                       # builds the shipped (static) binary first
#   OUTRIDER_BIN=path/to/outrider bench/run.sh   # or measures a given one
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OUTRIDER_BIN="${OUTRIDER_BIN:-$("$here/build-release.sh")}"
bench="${MESH_BENCH_DIR:-$here/../../shared/bench}"
args="{MODE} {LISTEN_ADDR} {UPSTREAM_ADDR} {CERT} {KEY} {CA} {SELF_ID} {PEER_ID} {ADMIN_ADDR} {WORKDIR} {RESUMPTION} {TLS_GROUP}"
export OUR_NAME=outrider
export OUR_VERSION="$("$OUTRIDER_BIN" --version)"
export OUR_OUTBOUND_CMD="$here/outrider-contender.sh outbound $args"
export OUR_INBOUND_CMD="$here/outrider-contender.sh inbound $args"
exec "$bench/mesh-bench.sh" "$@"
