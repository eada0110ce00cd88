#!/usr/bin/env bash
# Regenerates bench/symbol-order.txt: every function the proxy executes
# (startup, HTTP and opaque TCP through a strict mTLS pair, new connections,
# a metrics scrape, drain, and the refusals every sidecar makes, in
# bench/refusals.py), hottest first, as recorded by callgrind on the
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
# What the proxies must refuse: another identity, and another CA's.
"$bin" ca issue --dir "$work/ca" --namespace bench --service-account other --out "$work/other" >/dev/null
"$bin" ca init --dir "$work/rogue-ca" >/dev/null
"$bin" ca issue --dir "$work/rogue-ca" --namespace bench --service-account server --out "$work/rogue" >/dev/null

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

# Two passes of the same work: under callgrind (every function the proxy
# executes, with its cost), then natively under perf, whose CPU samples and
# page faults (every first touch of a page, from the first instruction on)
# add the functions a real CPU dispatches to and valgrind's does not offer
# (glibc's and aws-lc's AVX-512 and ADX code: string functions, AES-GCM,
# P-256, X25519). The proxies are started as the shared bench starts them,
# by bench/outrider-contender.sh (its configuration file, the shipped key
# exchange), with the binary run by the pass's recorder.
cat > "$work/callgrind.sh" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/%p.out" "$bin" "\$@"
EOF
# perf ends the proxy with SIGTERM when it is itself told to stop.
cat > "$work/perf.sh" <<EOF
#!/bin/sh
exec perf record -q -e cpu-clock/freq=4999/ -e page-faults/period=1/ -o "$work/\$\$.perf" -- "$bin" "\$@"
EOF
chmod +x "$work/callgrind.sh" "$work/perf.sh"
alive() { # whether any proxy of the pass still runs
  local pid
  for pid in $(cat "$work/pids"); do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
server_id=spiffe://cluster.local/ns/bench/sa/server
client_id=spiffe://cluster.local/ns/bench/sa/client
proxy() { # recorder role mode port-prefix
  local recorder=$1 role=$2 mode=$3 p=$4 identity listen upstream self peer admin
  if [ "$role" = outbound ]; then
    identity=client listen=${p}240 upstream=127.0.0.1:${p}143 self=$client_id peer=$server_id admin=${p}291
  else
    identity=server listen=${p}143 upstream=127.0.0.1:18080 self=$server_id peer=$client_id admin=${p}191
  fi
  OUTRIDER_BIN="$work/$recorder.sh" bench/outrider-contender.sh "$role" "$mode" "127.0.0.1:$listen" "$upstream" \
    "$work/$identity/tls.crt" "$work/$identity/tls.key" "$work/$identity/ca.crt" "$self" "$peer" \
    "127.0.0.1:$admin" "$work/$recorder-$mode-$role" 0 X25519MLKEM768 2>"$work/$recorder-$mode-$role.log" &
  echo $! >> "$work/pids"
}
ready() { # admin ports...
  local port
  for port in "$@"; do
    for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  done
}
listening() { # port
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
refused_by_outbound() { # identity dir: a server with it where the proxies expect theirs
  local servers=() p
  for p in 17 27; do python3 bench/refusals.py serve "${p}143" "$1" & servers+=($!); done
  for p in 17 27; do listening "${p}143"; done
  for p in 17 27; do curl -s -m 5 -o /dev/null "http://127.0.0.1:${p}240/" || true; done
  kill "${servers[@]}"
  wait "${servers[@]}" 2>/dev/null || true
}
pass() { # recorder
  : > "$work/pids"
  # The outbound proxies first, as the shared bench starts them: each
  # meets a server from another CA, then one with another identity.
  proxy "$1" outbound http 17
  proxy "$1" outbound tcp 27
  ready 17291 27291
  refused_by_outbound "$work/rogue"
  refused_by_outbound "$work/other"
  proxy "$1" inbound http 17
  proxy "$1" inbound tcp 27
  ready 17191 27191
  for p in 17 27; do
    python3 bench/refusals.py inbound "${p}143" "$work/client/ca.crt" "$work/client" "$work/rogue"
    for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:${p}240/" && break; sleep 0.1; done
    # The bench's loads: 64 keep-alive connections, then new connections.
    wrk -t1 -c64 -d5s "http://127.0.0.1:${p}240/" >/dev/null
    wrk -t1 -c4 -d3s -H 'Connection: close' "http://127.0.0.1:${p}240/" >/dev/null
    curl -sf --http2-prior-knowledge "http://127.0.0.1:${p}240/" >/dev/null || true
  done
  for port in 17191 17291 27191 27291; do curl -sf "http://127.0.0.1:$port/metrics" >/dev/null; done
  xargs kill -TERM < "$work/pids" 2>/dev/null || true
  local wait_for=0
  while alive && [ $wait_for -lt 100 ]; do sleep 0.2; wait_for=$((wait_for+1)); done
}
pass callgrind
pass perf
for recorded in "$work"/*.perf; do
  perf report -q -i "$recorded" --no-demangle --no-children --sort symbol --stdio 2>/dev/null \
    | sed -n 's/.*\[\.\] \([^ ]*\).*/\1/p'
done > "$work/native.txt"

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
