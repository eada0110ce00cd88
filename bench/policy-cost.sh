#!/usr/bin/env bash
# What authorization costs: the shared bench's L7 pair throughput with a
# 50-rule policy on the inbound proxy against no policy, in one run.
#
#   bench/policy-cost.sh [PAIRS]     # default 5 pairs of repetitions
#
# Each repetition is a fresh ../shared/bench run of the `tput` test with
# nginx as a fixed reference; the two variants alternate (none, policy,
# policy, none, ...) so drift on a noisy machine hits both alike. Reports
# medians and the ratio, and fails if any request was refused or failed
# (a proxy that answered 403 would look fast).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pairs="${1:-5}"
export OUTRIDER_BIN="${OUTRIDER_BIN:-$("$here/build-release.sh")}"
work="${WORKDIR:-/tmp/outrider-policy-cost}"
rm -rf "$work" && mkdir -p "$work/policies"

# 50 rules across a DENY and an ALLOW policy, all with identity, port and
# HTTP conditions. The bench's client matches only the ALLOW's last rule,
# so every request is checked against all 50: the worst case of a linear
# scan.
policy_head() { # name action
  printf 'apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\n'
  printf 'metadata: {name: %s, namespace: default}\n' "$1"
  printf 'spec:\n  selector: {matchLabels: {app: server}}\n  action: %s\n  rules:\n' "$2"
}
{
  policy_head bench-deny DENY
  for i in $(seq 1 10); do
    echo "  - from: [{principals: [\"spiffe://cluster.local/ns/attackers/sa/a$i\"], notNamespaces: [default]}]"
    echo "    to: [{ports: [18000], methods: [DELETE, PUT], paths: [\"/admin/$i/*\"]}]"
  done
  echo "---"
  policy_head bench-allow ALLOW
  for i in $(seq 1 39); do
    echo "  - from: [{principals: [\"spiffe://cluster.local/ns/default/sa/svc-$i\", \"spiffe://cluster.local/ns/other/*\"], ipBlocks: [\"10.$i.0.0/16\"]}]"
    echo "    to: [{ports: [18000], methods: [GET, POST], paths: [\"/api/v$i/*\", \"*.json\"]}]"
  done
  echo "  - from: [{principals: [\"spiffe://cluster.local/ns/default/sa/client\"], ipBlocks: [\"127.0.0.0/8\"]}]"
  echo "    to: [{ports: [18000], methods: [GET], paths: [\"/\", \"/api/*\"]}]"
} > "$work/policies/bench.yaml"

# The policy must allow the bench's requests, decided by its last rule.
"$OUTRIDER_BIN" policy check --strict -f "$work/policies" --namespace default --labels app=server \
  --port 18000 --source spiffe://cluster.local/ns/default/sa/client --ip 127.0.0.1 \
  --method GET --path / | tee "$work/check.txt"
grep -q "policy default/bench-allow, rules\[39\]" "$work/check.txt"

# Control: with the client's rule pointed at another identity the same
# setup must answer 403, or the benchmark is not enforcing the policy.
mkdir -p "$work/control"
sed 's#ns/default/sa/client"#ns/default/sa/nobody"#' "$work/policies/bench.yaml" > "$work/control/bench.yaml"
echo "== control: a policy that denies the bench client" >&2
OUTRIDER_BENCH_POLICY_DIR="$work/control" READY_TIMEOUT=3 "$here/run.sh" --contenders nginx --tests tput \
  --reps 1 --workdir "/tmp/outrider-policy-cost-run" --json "$work/control.json" \
  --markdown "$work/control.md" > /dev/null || true
python3 - "$work/control.json" <<'PY'
import json, sys
failures = json.load(open(sys.argv[1]))["failures"]
if not any(f["contender"] == "outrider" and "403" in f["error"] for f in failures):
    sys.exit("control: the denying policy was not enforced: %s" % failures)
print("control: the denying policy answers 403, so the policy runs enforce theirs")
PY

run() {
  local variant=$1 rep=$2
  echo "== $variant, repetition $rep" >&2
  if [ "$variant" = policy ]; then
    export OUTRIDER_BENCH_POLICY_DIR="$work/policies"
  else
    unset OUTRIDER_BENCH_POLICY_DIR
  fi
  "$here/run.sh" --contenders nginx --tests tput --reps 1 \
    --workdir "/tmp/outrider-policy-cost-run" --json "$work/$variant-$rep.json" \
    --markdown "$work/$variant-$rep.md" > /dev/null
}

for rep in $(seq 1 "$pairs"); do
  if [ $((rep % 2)) = 1 ]; then order="none policy"; else order="policy none"; fi
  for variant in $order; do run "$variant" "$rep"; done
done

python3 - "$work" "$pairs" <<'PY'
import json, statistics, sys
work, pairs = sys.argv[1], int(sys.argv[2])
rows = {"none": [], "policy": []}
for variant in rows:
    for rep in range(1, pairs + 1):
        with open("%s/%s-%d.json" % (work, variant, rep)) as f:
            results = json.load(f)["results"]
        by = {r["contender"]: r for r in results}
        ours, ref = by["outrider"], by["nginx"]
        errors = (ours.get("tput_errors") or 0)
        if errors or not ours.get("tput_rps"):
            sys.exit("%s rep %d: %s errors, rps %s" % (variant, rep, errors, ours.get("tput_rps")))
        rows[variant].append((ours["tput_rps"], ours.get("tput_cpu_per_100k"), ref["tput_rps"]))
med = lambda xs: statistics.median(xs)
print("| variant | outrider L7 req/s (median) | per repetition | proxy CPU s/100k | nginx L7 req/s (reference, same runs) |")
print("|---|---|---|---|---|")
for variant, label in (("none", "no policy"), ("policy", "50-rule policy")):
    r = rows[variant]
    print("| %s | %.0f | %s | %.2f | %.0f |" % (label, med([x[0] for x in r]),
          " / ".join("%.0f" % x[0] for x in r), med([x[1] for x in r if x[1] is not None]), med([x[2] for x in r])))
ratio = med([x[0] for x in rows["policy"]]) / med([x[0] for x in rows["none"]])
print("\npolicy / none throughput: %.3f" % ratio)
PY
