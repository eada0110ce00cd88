#!/usr/bin/env bash
# Two outrider builds against each other on the shared bench's L7 pair, in
# one run: is a change a regression, or is the machine just noisy today?
#
#   bench/ab.sh BASE_BIN CHANGED_BIN [PAIRS]     # default 5 pairs
#   AB_TEST=conn AB_REFERENCE=envoy bench/ab.sh ...   # full mTLS handshakes/s
#
# Each repetition is a fresh ../shared/bench run of one test (AB_TEST:
# tput, the default, or conn) with a fixed reference contender
# (AB_REFERENCE: nginx, the default, or envoy, haproxy); the two builds
# alternate (base, changed, changed, base, ...) so drift hits both alike.
# Reports medians of the outrider/reference ratio per build (the ratio
# cancels most of the machine's drift) and the raw rates, and fails if any
# request failed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -ge 2 ] || { sed -n '5p' "$0" >&2; exit 2; }
base=$1 changed=$2 pairs=${3:-5}
test=${AB_TEST:-tput} reference=${AB_REFERENCE:-nginx}
case $test in tput|conn) ;; *) echo "AB_TEST must be tput or conn" >&2; exit 2 ;; esac
work="${WORKDIR:-/tmp/outrider-ab}"
rm -rf "$work" && mkdir -p "$work"

run() {
  local variant=$1 rep=$2 bin
  if [ "$variant" = base ]; then bin=$base; else bin=$changed; fi
  echo "== $variant, repetition $rep" >&2
  OUTRIDER_BIN="$bin" "$here/run.sh" --contenders "$reference" --tests "$test" --reps 1 \
    --workdir "/tmp/outrider-ab-run" --json "$work/$variant-$rep.json" \
    --markdown "$work/$variant-$rep.md" > /dev/null
}

for rep in $(seq 1 "$pairs"); do
  if [ $((rep % 2)) = 1 ]; then order="base changed"; else order="changed base"; fi
  for variant in $order; do run "$variant" "$rep"; done
done

python3 - "$work" "$pairs" "$test" "$reference" <<'PY'
import json, statistics, sys
work, pairs, test, reference = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rate, errors = (test + "_rps", test + "_errors")
rows = {"base": [], "changed": []}
for variant in rows:
    for rep in range(1, pairs + 1):
        with open("%s/%s-%d.json" % (work, variant, rep)) as f:
            results = json.load(f)["results"]
        by = {r["contender"]: r for r in results}
        ours, ref = by["outrider"], by[reference]
        if ours.get(errors) or not ours.get(rate):
            sys.exit("%s rep %d: errors %s, rate %s" % (variant, rep, ours.get(errors), ours.get(rate)))
        rows[variant].append((ours[rate] / ref[rate], ours[rate], ref[rate]))
med = statistics.median
unit = "L7 req/s" if test == "tput" else "mTLS handshakes/s"
print("| build | outrider/%s %s (median) | per repetition | outrider | %s |" % (reference, unit, reference))
print("|---|---|---|---|---|")
for variant in ("base", "changed"):
    r = rows[variant]
    print("| %s | %.3f | %s | %.0f | %.0f |" % (variant, med([x[0] for x in r]),
          " / ".join("%.2f" % x[0] for x in r), med([x[1] for x in r]), med([x[2] for x in r])))
print("\nchanged / base, ratio to %s: %.3f" % (reference, med([x[0] for x in rows["changed"]]) / med([x[0] for x in rows["base"]])))
PY
