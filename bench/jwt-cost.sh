#!/usr/bin/env bash
# What request authentication and rate limits cost, against Envoy, in one
# run: the shared bench's L7 pair throughput (wrk -t1 -c64) through
#
#   plain   outrider and Envoy as the shared bench runs them;
#   jwt     every request carries the same ES256 token (minted by PyJWT),
#           and each inbound proxy requires it: outrider with a
#           RequestAuthentication (keys inline) and an AuthorizationPolicy
#           on the token's principal, Envoy with its jwt_authn filter and
#           local_jwks;
#   limits  outrider's inbound with a LocalRateLimitPolicy of 50 limits,
#           every one of which counts every request against a caller
#           budget and the shared one (rates far above the load: nothing
#           is refused); Envoy plain, for reference.
#
#   bench/jwt-cost.sh [PAIRS]      # default 5 rounds of the three variants
#
# Variants rotate every round so drift hits each alike. Reports medians
# and ratios, and fails if any request was refused or failed (a proxy
# answering 401 would look fast). A control run first checks that both
# proxies refuse a token signed by another key.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rounds="${1:-5}"
export OUTRIDER_BIN="${OUTRIDER_BIN:-$("$here/build-release.sh")}"
python="${OUTRIDER_PYTHON:-$here/../target/ci-tools/venv/bin/python}"
work="${WORKDIR:-/tmp/outrider-jwt-cost}"
rm -rf "$work" && mkdir -p "$work/jwt" "$work/limits"
bench="${MESH_BENCH_DIR:-$here/../../shared/bench}"
export MESH_BENCH_DIR="$bench"
export ENVOY_BIN="${ENVOY_BIN:-$(ls /tmp/benchenv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)}"

issuer=https://issuer.bench.example
audience=bench
now=$(date +%s)
echo "{\"keys\": [{\"kid\": \"bench\", \"alg\": \"ES256\"}, {\"kid\": \"rogue\", \"alg\": \"ES256\", \"publish\": false}],
  \"tokens\": [
    {\"name\": \"good\", \"kid\": \"bench\", \"alg\": \"ES256\", \"claims\": {\"iss\": \"$issuer\", \"sub\": \"client\", \"aud\": \"$audience\", \"exp\": $((now + 86400))}},
    {\"name\": \"forged\", \"kid\": \"rogue\", \"kid_override\": \"bench\", \"alg\": \"ES256\", \"claims\": {\"iss\": \"$issuer\", \"sub\": \"client\", \"aud\": \"$audience\", \"exp\": $((now + 86400))}}]}" \
  | "$python" "$here/../tests/jwt/mint.py" > "$work/minted.json"
field() { "$python" -c "import json,sys; d=json.load(open('$work/minted.json')); print($1)"; }
jwks="$(field 'json.dumps(d["jwks"])')"
good="$(field 'd["tokens"]["good"]')"
forged="$(field 'd["tokens"]["forged"]')"

jwks_yaml="$(printf '%s' "$jwks" | sed "s/'/''/g")"
cat > "$work/jwt/tokens.yaml" <<EOF
apiVersion: security.outrider.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: bench, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
  - issuer: $issuer
    audiences: [$audience]
    jwks: '$jwks_yaml'
    presence: Required
---
apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bench-token, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{requestPrincipals: ["$issuer/client"]}]
EOF
{
  printf 'apiVersion: security.outrider.dev/v1alpha1\nkind: LocalRateLimitPolicy\n'
  printf 'metadata: {name: bench-limits, namespace: default}\n'
  printf 'spec:\n  selector: {matchLabels: {app: server}}\n  limits:\n'
  for i in $(seq 1 50); do
    echo "  - {total: {requestsPerSecond: 1000000, burst: 1000000}, perClient: {requestsPerSecond: 1000000, burst: 1000000}}"
  done
} > "$work/limits/limits.yaml"

. "$here/ours.sh"

run() { # variant tag [token]
  local variant=$1 tag=$2 token=${3:-}
  unset BENCH_JWT_TOKEN BENCH_JWT_JWKS BENCH_JWT_ISSUER BENCH_JWT_AUDIENCE
  unset OUTRIDER_BENCH_POLICY_DIR
  case "$variant" in
    jwt)
      export OUTRIDER_BENCH_POLICY_DIR="$work/jwt"
      export BENCH_JWT_TOKEN="$token" BENCH_JWT_JWKS="$jwks" BENCH_JWT_ISSUER="$issuer" BENCH_JWT_AUDIENCE="$audience"
      ;;
    limits) export OUTRIDER_BENCH_POLICY_DIR="$work/limits" ;;
  esac
  echo "== $variant, $tag" >&2
  python3 "$here/mesh_bench_jwt.py" --contenders envoy --tests tput --reps 1 \
    --workdir "/tmp/outrider-jwt-cost-run" --json "$work/$variant-$tag.json" \
    --markdown "$work/$variant-$tag.md" > /dev/null
}

# Control: a token signed by another key under the right key id must be
# refused by both inbound proxies, or the benchmark enforces nothing.
READY_TIMEOUT=3 run jwt control "$forged" || true
python3 - "$work/jwt-control.json" <<'PY'
import json, sys
failures = json.load(open(sys.argv[1]))["failures"]
refused = {f["contender"] for f in failures if "401" in f["error"] or "403" in f["error"]}
if refused != {"outrider", "envoy"}:
    sys.exit("control: a forged token was not refused by both: %s" % failures)
print("control: a forged token is refused by outrider and Envoy")
PY

variants=(none jwt limits)
for round in $(seq 1 "$rounds"); do
  for i in 0 1 2; do
    v=${variants[$(((i + round) % 3))]}
    run "$v" "$round" "$good"
  done
done

python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for variant in ("none", "jwt", "limits"):
    for rep in range(1, rounds + 1):
        with open("%s/%s-%d.json" % (work, variant, rep)) as f:
            data = json.load(f)
        if data["failures"]:
            sys.exit("%s round %d failed: %s" % (variant, rep, data["failures"]))
        for r in data["results"]:
            errors = r.get("tput_errors") or 0
            if errors or not r.get("tput_rps"):
                sys.exit("%s round %d: %s had %s errors" % (variant, rep, r["contender"], errors))
            rows.setdefault((variant, r["contender"]), []).append(r)
med = statistics.median
def rps(v, c): return med([r["tput_rps"] for r in rows[(v, c)]])
def cpu(v, c): return med([r["tput_cpu_per_100k"] for r in rows[(v, c)]])
def mem(v, c): return med([r["mem_loaded"]["VmHWM"] / 1024 for r in rows[(v, c)] if r.get("mem_loaded")] or [0])
print("| variant | contender | L7 req/s (median) | per round | proxy CPU s/100k | peak RSS A+B (MiB) |")
print("|---|---|---|---|---|---|")
for v, label in (("none", "plain"), ("jwt", "ES256 token required"), ("limits", "50 rate limits (outrider)")):
    for c in ("outrider", "envoy"):
        rs = rows[(v, c)]
        print("| %s | %s | %.0f | %s | %.2f | %.1f |" % (label, c, rps(v, c),
              " / ".join("%.0f" % r["tput_rps"] for r in rs), cpu(v, c), mem(v, c)))
print()
print("outrider with JWT / outrider plain: %.3f (target >= 0.9)" % (rps("jwt", "outrider") / rps("none", "outrider")))
print("outrider with JWT / Envoy with JWT: %.2fx (target >= 2)" % (rps("jwt", "outrider") / rps("jwt", "envoy")))
print("Envoy with JWT / Envoy plain: %.3f" % (rps("jwt", "envoy") / rps("none", "envoy")))
print("outrider with 50 rate limits / outrider plain: %.3f" % (rps("limits", "outrider") / rps("none", "outrider")))
PY
