#!/usr/bin/env bash
# outrider as a contender in ../shared/bench (mesh-bench), driven only
# through its placeholder interface; see docs/performance.md.
#
#   OUR_NAME=outrider \
#   OUR_OUTBOUND_CMD="$PWD/bench/outrider-contender.sh outbound {MODE} {LISTEN_ADDR} {UPSTREAM_ADDR} {CERT} {KEY} {CA} {SELF_ID} {PEER_ID} {ADMIN_ADDR} {WORKDIR} {RESUMPTION} {TLS_GROUP}" \
#   OUR_INBOUND_CMD="$PWD/bench/outrider-contender.sh inbound {MODE} {LISTEN_ADDR} {UPSTREAM_ADDR} {CERT} {KEY} {CA} {SELF_ID} {PEER_ID} {ADMIN_ADDR} {WORKDIR} {RESUMPTION} {TLS_GROUP}" \
#   ../shared/bench/mesh-bench.sh
#
# The harness hands over separate cert/key/CA files; outrider reads a
# Secret-style directory, so this links them into one. One worker thread
# (outrider's default), strict mTLS, the harness's key-exchange group and
# resumption setting. With OUTRIDER_BENCH_POLICY_DIR set, the inbound proxy
# enforces the policies in that directory (bench/policy-cost.sh).
set -euo pipefail
role=$1 mode=$2 listen=$3 upstream=$4 cert=$5 key=$6 ca=$7 self_id=$8 peer_id=$9
admin=${10} workdir=${11} resumption=${12} group=${13}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${OUTRIDER_BIN:-$here/target/release/outrider}"

mkdir -p "$workdir/identity"
ln -sf "$cert" "$workdir/identity/tls.crt"
ln -sf "$key" "$workdir/identity/tls.key"
ln -sf "$ca" "$workdir/identity/ca.crt"

protocol=detect
[ "$mode" = tcp ] && protocol=opaque
[ "$resumption" = 1 ] && resumption=true || resumption=false
group=$(echo "$group" | tr '[:upper:]' '[:lower:]')
# The hybrid as shipped: offered first, X25519 for peers without it.
[ "$group" = x25519mlkem768 ] && group="x25519mlkem768, x25519"

{
  echo "identity:"
  echo "  dir: $workdir/identity"
  echo "  id: $self_id"
  echo "mtls_mode: strict"
  echo "tls:"
  echo "  resumption: $resumption"
  echo "  key_exchange: [$group]"
  echo "admin:"
  echo "  listen: $admin"
  echo "log:"
  echo "  level: warn"
  if [ "$role" = outbound ]; then
    echo "inbound:"
    echo "  enabled: false"
    echo "outbound:"
    echo "  listen: $listen"
    echo "  peer: $upstream"
    echo "  peer_id: $peer_id"
    echo "  protocol: $protocol"
  else
    echo "outbound:"
    echo "  enabled: false"
    echo "inbound:"
    echo "  listen: $listen"
    echo "  app: $upstream"
    echo "  protocol: $protocol"
    if [ -n "${OUTRIDER_BENCH_POLICY_DIR:-}" ]; then
      echo "workload:"
      echo "  labels: {app: server}"
      echo "policy:"
      echo "  source: files"
      echo "  dir: $OUTRIDER_BENCH_POLICY_DIR"
    fi
  fi
} > "$workdir/outrider.yaml"
exec "$bin" proxy --config "$workdir/outrider.yaml"
