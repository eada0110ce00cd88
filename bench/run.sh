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
. "$here/ours.sh"
exec "$bench/mesh-bench.sh" "$@"
