#!/usr/bin/env bash
# Resident memory per idle connection, outrider against Envoy, HAProxy and
# nginx in the same run (see bench/conn_memory.py for what is measured).
#
#   bench/conn-memory.sh [--connections N] [--reps R] [--contenders envoy,haproxy,nginx]
#   OUTRIDER_BIN=path/to/outrider bench/conn-memory.sh   # measure a given build
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OUTRIDER_BIN="${OUTRIDER_BIN:-$("$here/build-release.sh")}"
bench="${MESH_BENCH_DIR:-$here/../../shared/bench}"
"$bench/mesh-bench.sh" --install >/dev/null
export ENVOY_BIN="${ENVOY_BIN:-$(ls /tmp/benchenv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1)}"
. "$here/ours.sh"
export MESH_BENCH_DIR="$bench"
exec python3 "$here/conn_memory.py" "$@"
