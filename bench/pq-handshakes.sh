#!/usr/bin/env bash
# What the post-quantum key exchange costs, against the peers, in one run
# of the shared bench (bench/mesh_bench_pq.py adds the hybrid pairs):
#
#   outrider-pq   our shipped default: X25519MLKEM768 first, X25519 after
#   envoy-pq      Envoy (BoringSSL) offering and preferring X25519MLKEM768
#   outrider, envoy, haproxy, nginx   X25519, as the shared bench runs them
#
#   bench/pq-handshakes.sh [--reps N] [--tests ...]   # other mesh-bench flags
#
# Prints full handshakes per second (L4 `conn`, and `conn_l7`), their
# ratios to the best peer, and the peak RSS of each proxy; fails when a
# hybrid pair did not agree on X25519MLKEM768 for every handshake (the
# groups are read from the proxies' own counters), or when a plain pair
# did not use X25519.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OUTRIDER_BIN="${OUTRIDER_BIN:-$("$here/build-release.sh")}"
bench="${MESH_BENCH_DIR:-$here/../../shared/bench}"
export MESH_BENCH_DIR="$bench"
export ENVOY_BIN="${ENVOY_BIN:-$(ls /tmp/benchenv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)}"
work="${WORKDIR:-/tmp/outrider-pq}"
mkdir -p "$work"
out="${PQ_OUT:-$work/pq}"

. "$here/ours.sh"
export BENCH_PQ_GROUPS="$out-groups.json"
export TLS_GROUP=X25519

python3 "$here/mesh_bench_pq.py" --contenders direct,envoy,envoy-pq,haproxy,nginx,outrider-pq \
  --workdir "$work/run" --json "$out.json" --markdown "$out.md" "$@" > /dev/null

python3 - "$out.json" "$BENCH_PQ_GROUPS" <<'PY'
import json, statistics, sys
data = json.load(open(sys.argv[1]))
groups = json.load(open(sys.argv[2]))
if data["failures"]:
    sys.exit("failures: %s" % data["failures"])
by = {}
for r in data["results"]:
    by.setdefault(r["contender"], []).append(r)
def med(c, key):
    vals = [r.get(key) for r in by.get(c, []) if r.get(key)]
    return statistics.median(vals) if vals else None
def per_proc(c, role):
    vals = [v["VmHWM"] / 1024 for r in by.get(c, []) for k, v in (r.get("mem_loaded_per_proc") or {}).items()
            if k.endswith(role)]
    return statistics.median(vals) if vals else None

bad = []
for c in ("outrider", "outrider-pq", "envoy", "envoy-pq"):
    for mode in ("http", "tcp"):
        # The harness's sanity checks connect with Python's OpenSSL 3.0
        # (no ML-KEM) up to three times per pair: those fall back to
        # X25519. Everything else through a hybrid pair must be hybrid
        # (the L7 pair pools its connection: a single handshake).
        seen = groups.get("%s/%s" % (c, mode), {})
        hybrid, other = seen.get("x25519mlkem768", 0), sum(seen.values()) - seen.get("x25519mlkem768", 0)
        if (hybrid == 0 or other > 3) if c.endswith("-pq") else (hybrid > 0 or other == 0):
            bad.append("%s %s agreed %s" % (c, mode, seen))

peers = ("envoy", "envoy-pq", "haproxy", "nginx")
print("| contender | key exchange | full handshakes/s (L4 conn) | per repetition | L7 new-connection req/s | peak RSS A / B (MiB) |")
print("|---|---|---|---|---|---|")
for c in ("outrider-pq", "outrider", "envoy-pq", "envoy", "haproxy", "nginx"):
    if c not in by:
        continue
    kx = "X25519MLKEM768" if c.endswith("-pq") else "X25519"
    reps = " / ".join("%.0f" % r["conn_rps"] for r in by[c] if r.get("conn_rps"))
    a, b = per_proc(c, "outbound"), per_proc(c, "inbound")
    print("| %s | %s | %.0f | %s | %.0f | %.1f / %.1f |" % (c, kx, med(c, "conn_rps"), reps,
          med(c, "conn_l7_rps") or 0, a or 0, b or 0))
print()
best = max(peers, key=lambda c: med(c, "conn_rps") or 0)
for ours in ("outrider-pq", "outrider"):
    print("%s / best peer (%s): %.2fx" % (ours, best, med(ours, "conn_rps") / med(best, "conn_rps")))
print("outrider-pq / envoy-pq: %.2fx" % (med("outrider-pq", "conn_rps") / med("envoy-pq", "conn_rps")))
print("outrider-pq / outrider: %.3f; envoy-pq / envoy: %.3f" % (
    med("outrider-pq", "conn_rps") / med("outrider", "conn_rps"), med("envoy-pq", "conn_rps") / med("envoy", "conn_rps")))
print("groups agreed (inbound handshakes): %s" % json.dumps(groups, sort_keys=True))
if bad:
    sys.exit("wrong key exchange: " + "; ".join(bad))
PY
