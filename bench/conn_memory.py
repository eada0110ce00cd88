#!/usr/bin/env python3
"""Resident memory per idle connection: outrider against Envoy, HAProxy and
nginx, measured the same way in the same run.

Each contender's sidecar pair is started exactly as the shared bench starts
it (../shared/bench/mesh_bench.py is used as a library: same certificates,
configs, CPU pinning, backend), then, one contender at a time:

  waiting   N plaintext connections to proxy A's HTTP listener that send
            nothing (a client that has not spoken yet: protocol detection
            for outrider, waiting for request headers for the others);
            measured 0.2 s after the last connects, inside outrider's 1 s
            detection window.
  silent    the same connections 2.5 s later, A and B summed: outrider has
            given up detection and connected upstream to see who speaks
            first (server-speaks-first protocols); the others still wait
            for headers (their timeouts are longer).
  relay     N connections through the L4 (opaque TCP) pair, each carrying
            one request and its answer and then left idle: an established
            mTLS relay on both proxies, with its backend connection.

Reported: the growth of VmRSS per connection (KiB), proxy A for `waiting`,
A and B summed for `relay`, and what stays after closing them all (memory
given back, or not). Before the baseline is read, a round of connections
in the same state is made and closed, so code and allocator pools that the
first connection touches once are not charged to every connection.
Medians of --reps runs.

  bench/conn-memory.sh [--connections N] [--reps R] [--contenders envoy,haproxy,nginx]
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import time

sys.path.insert(0, os.environ.get("MESH_BENCH_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")))
import mesh_bench as mb  # noqa: E402


def make_env(work, contenders):
    env = mb.Env()
    env.work = work
    os.makedirs(work, exist_ok=True)
    mb.cleanup_stale(work)
    mb._PIDFILE = os.path.join(work, "pids")
    env.resumption = False
    env.tls_group = "X25519"
    env.tls_cipher = "TLS_AES_128_GCM_SHA256"
    env.ready_timeout = 20.0
    ncpu = os.cpu_count() or 1
    env.sut_cpus = ",".join(str(i) for i in range(max(ncpu - 1, 1)))
    env.lg_cpus = str(ncpu - 1)
    env.ports = mb.Ports(int(os.environ.get("BASE_PORT", "19000")))
    env.bin = {
        "nginx": shutil.which("nginx") or "/usr/sbin/nginx",
        "haproxy": shutil.which("haproxy") or "/usr/sbin/haproxy",
        "envoy": os.environ.get("ENVOY_BIN", ""),
    }
    env.our_name = os.environ.get("OUR_NAME", "outrider")
    env.our_cmds = {"outbound": os.environ["OUR_OUTBOUND_CMD"], "inbound": os.environ["OUR_INBOUND_CMD"]}
    env.our_cmds["l4_outbound"] = env.our_cmds["outbound"]
    env.our_cmds["l4_inbound"] = env.our_cmds["inbound"]
    env.certs = mb.gen_certs(os.path.join(work, "certs"))
    env.contenders = contenders + [env.our_name]
    return env


def rss_kib(procs):
    return sum(p.mem_kb()["VmRSS"] for p in procs)


def open_idle(port, n, request):
    """n connections to port; with request, each sends it and reads the answer."""
    conns = []
    for _ in range(n):
        s = socket.create_connection((mb.HOST, port), timeout=10)
        if request:
            s.sendall(request)
            got = b""
            while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"ok"):
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed before the answer")
                got += chunk
        conns.append(s)
    return conns


def warm_up(port, request, n=50):
    conns = open_idle(port, n, request)
    time.sleep(0.5)
    for s in conns:
        s.close()
    time.sleep(0.5)


def measure(env, contender, n):
    P = env.ports
    out = {}
    # waiting: the HTTP pair, connections to A that say nothing
    procs, _ = mb.start_pair(env, contender, "http", sanity=False)
    try:
        warm_up(P.out, None)
        base = rss_kib(procs[:1])
        base_pair = rss_kib(procs)
        conns = open_idle(P.out, n, None)
        time.sleep(0.2)
        out["waiting_kib"] = (rss_kib(procs[:1]) - base) / n
        time.sleep(2.5)
        out["silent_kib"] = (rss_kib(procs) - base_pair) / n
        for s in conns:
            s.close()
    finally:
        for p in reversed(procs):
            p.stop()
    # relay: the TCP pair, one answered request per connection, then idle
    procs, _ = mb.start_pair(env, contender, "tcp", sanity=False)
    try:
        warm_up(P.out, b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        base = rss_kib(procs)
        conns = open_idle(P.out, n, b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        time.sleep(0.5)
        loaded = rss_kib(procs)
        out["relay_kib"] = (loaded - base) / n
        for s in conns:
            s.close()
        time.sleep(1.5)
        # What stays resident after every connection closed.
        out["after_close_kib"] = (rss_kib(procs) - base) / n
    finally:
        for p in reversed(procs):
            p.stop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contenders", default="envoy,haproxy,nginx")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 3 * args.connections > hard:
        sys.exit("need %d open files, the hard limit is %d" % (3 * args.connections, hard))
    contenders = [c for c in args.contenders.split(",") if c]
    env = make_env("/tmp/outrider-conn-memory", contenders)
    env.backend = mb.start_backend(env, env.ports.backend)
    mb.wait_port(env.ports.backend, [env.backend], env.ready_timeout)
    results = {c: [] for c in env.contenders}
    try:
        for rep in range(args.reps):
            order = env.contenders[rep % len(env.contenders):] + env.contenders[:rep % len(env.contenders)]
            for c in order:
                r = measure(env, c, args.connections)
                results[c].append(r)
                print("rep %d %-9s waiting %.1f KiB, silent %.1f KiB, relay %.1f KiB, after close %.1f KiB per connection"
                      % (rep + 1, c, r["waiting_kib"], r["silent_kib"], r["relay_kib"], r["after_close_kib"]), file=sys.stderr)
    finally:
        env.backend.stop()
        mb.stop_all()
    med = lambda c, k: statistics.median(r[k] for r in results[c])
    print("| contender | waiting client, A (KiB/conn) | silent client after 2.7 s, A+B | idle mTLS relay, A+B | left after closing, A+B |")
    print("|---|---:|---:|---:|---:|")
    for c in env.contenders:
        print("| %s | %.1f | %.1f | %.1f | %.1f |" % (c, med(c, "waiting_kib"), med(c, "silent_kib"), med(c, "relay_kib"), med(c, "after_close_kib")))
    print("\n%d connections per measurement, medians of %d repetitions." % (args.connections, args.reps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
