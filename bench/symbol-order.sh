#!/usr/bin/env bash
# Regenerates bench/symbol-order.txt: every function the proxy executes
# (startup, HTTP and opaque TCP through a strict mTLS pair, new connections,
# a metrics scrape, drain), hottest first, as recorded by callgrind on the
# shipped build. build-release.sh hands the list to the linker
# (--symbol-ordering-file) so that the code a proxy runs sits together:
# the kernel maps executable pages in 64 KiB windows around each fault, so
# scattered code keeps far more of the binary resident than it runs.
#
#   bench/symbol-order.sh            # needs valgrind, perf, wrk, python3
#
# Symbols that no longer exist are ignored by the linker, so a stale list
# costs memory, never correctness; regenerate it after large changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${OUTRIDER_BIN:-$(bench/build-release.sh)}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin" ca init --dir "$work/ca" >/dev/null
"$bin" ca issue --dir "$work/ca" --namespace bench --service-account client --out "$work/client" >/dev/null
"$bin" ca issue --dir "$work/ca" --namespace bench --service-account server --out "$work/server" >/dev/null

python3 - "$work" <<'EOF' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 18080), H).serve_forever()
EOF
sleep 0.5

# The proxies read a configuration file, as the bench's do
# (bench/outrider-contender.sh), so the code that parses one is laid out
# with the rest of startup; the flags below override it.
cat > "$work/base.yaml" <<'YAML'
mtls_mode: strict
tls:
  resumption: false
  # The shipped default (the post-quantum hybrid first): its handshakes
  # run the X25519 code as well as ML-KEM's.
  key_exchange: [x25519mlkem768, x25519]
log:
  level: warn
limits:
  detect_timeout: 1s
YAML

# Two passes of the same work: under callgrind (every function the proxy
# executes, with its cost), then natively under perf, whose samples add
# the functions a real CPU dispatches to and valgrind's does not offer
# (aws-lc's AVX-512 and ADX code: AES-GCM, P-256, X25519).
runner=() # the command each proxy runs under
alive() { # whether any proxy of the pass still runs
  local pid
  for pid in $(cat "$work/pids"); do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
proxy() { # name protocol role args...
  local name=$1 protocol=$2; shift 2
  "${runner[@]}" --callgrind-out-file="$work/$name.out" \
    "$bin" proxy --config "$work/base.yaml" --mtls-mode strict --log-level warn "$@" \
    --inbound-protocol "$protocol" --outbound-protocol "$protocol" 2>"$work/$name.log" &
  echo $! >> "$work/pids"
}
server_id=spiffe://cluster.local/ns/bench/sa/server
pass() {
  : > "$work/pids"
  for pair in http:detect:17 tcp:opaque:27; do
    IFS=: read -r name protocol p <<<"$pair"
    proxy "$name-in" "$protocol" --identity-dir "$work/server" --identity-id "$server_id" \
      --inbound-listen "127.0.0.1:${p}143" --inbound-app 127.0.0.1:18080 \
      --outbound-listen "127.0.0.1:${p}140" --admin-listen "127.0.0.1:${p}191"
    proxy "$name-out" "$protocol" --identity-dir "$work/client" \
      --identity-id spiffe://cluster.local/ns/bench/sa/client \
      --inbound-listen "127.0.0.1:${p}243" --admin-listen "127.0.0.1:${p}291" \
      --outbound-listen "127.0.0.1:${p}240" --outbound-peer "127.0.0.1:${p}143" \
      --outbound-peer-id "$server_id"
  done
  for port in 17191 17291 27191 27291; do
    for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  done
  if [ "${1:-}" = perf ]; then
    perf record -q -F 4999 -o "$work/perf.data" -p "$(paste -sd, "$work/pids")" 2>/dev/null &
    local recorder=$!
  fi
  for p in 17 27; do
    wrk -t1 -c8 -d5s "http://127.0.0.1:${p}240/" >/dev/null
    wrk -t1 -c4 -d3s -H 'Connection: close' "http://127.0.0.1:${p}240/" >/dev/null
    curl -sf --http2-prior-knowledge "http://127.0.0.1:${p}240/" >/dev/null || true
  done
  for port in 17191 17291 27191 27291; do curl -sf "http://127.0.0.1:$port/metrics" >/dev/null; done
  [ "${1:-}" = perf ] && { kill -INT "$recorder"; wait "$recorder" || true; }
  xargs kill -TERM < "$work/pids" 2>/dev/null || true
  local wait_for=0
  while alive && [ $wait_for -lt 100 ]; do sleep 0.2; wait_for=$((wait_for+1)); done
}
runner=(valgrind --tool=callgrind --demangle=no)
pass
# The native pass: the same proxies, not under valgrind.
proxy() { # name protocol role args...
  local name=$1 protocol=$2; shift 2
  "$bin" proxy --config "$work/base.yaml" --mtls-mode strict --log-level warn "$@" \
    --inbound-protocol "$protocol" --outbound-protocol "$protocol" 2>"$work/$name.log" &
  echo $! >> "$work/pids"
}
pass perf
perf report -q -i "$work/perf.data" --no-demangle --no-children --sort symbol --stdio 2>/dev/null \
  | sed -n 's/.*\[\.\] \([^ ]*\).*/\1/p' > "$work/native.txt"

# Sum the instructions of each function over the four processes, hottest
# first; keep only symbols the linker can place.
python3 - "$work"/*.out > bench/symbol-order.txt <<'EOF'
import re, sys, collections
cost = collections.Counter()
for path in sys.argv[1:]:
    names, current, skip_next = {}, None, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3).strip()
            if not m.group(1):
                current = names.get(m.group(2))
            continue
        if line.startswith("calls="):
            skip_next = True  # the next cost line is the callee's, inclusive
            continue
        m = re.match(r"^[+*-]?\d*\s+(\d+)", line)
        if m and current:
            if skip_next:
                skip_next = False
            else:
                cost[current] += int(m.group(1))
placeable = lambda name: name.startswith(("_ZN", "_R")) or re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", name)
listed = [name for name, _ in cost.most_common() if placeable(name)]
seen = set(listed)
native = [n.strip() for n in open(sys.argv[1].rsplit("/", 1)[0] + "/native.txt")]
listed += [n for n in native if placeable(n) and n not in seen and not seen.add(n)]
print("\n".join(listed))
EOF
echo "wrote bench/symbol-order.txt ($(wc -l < bench/symbol-order.txt) functions)" >&2
