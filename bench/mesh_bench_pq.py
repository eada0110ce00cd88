"""The shared bench (../shared/bench/mesh_bench.py) with post-quantum pairs.

Adds two contenders to the same run as the shared harness's own:

  envoy-pq      Envoy whose proxies offer and prefer X25519MLKEM768, then
                X25519 (`ecdh_curves`; BoringSSL has the hybrid);
  <ours>-pq     our contender with TLS_GROUP=X25519MLKEM768 (the contender
                script offers the hybrid, then X25519: the shipped default).

Every other contender keeps TLS_GROUP (X25519): the OpenSSL 3.0 that HAProxy
and nginx link has no ML-KEM. Before each inbound proxy of Envoy or ours is
stopped, the groups its handshakes agreed are read from its admin port
(Envoy's `ssl.curves.*` listener stats, our `tls_handshakes_total{group}`)
and written to BENCH_PQ_GROUPS, so the report can prove which key exchange
each pair really used. Everything else is the shared harness, imported,
not copied.
"""

import atexit
import json
import os
import re
import sys
import urllib.request

sys.path.insert(0, os.environ.get("MESH_BENCH_DIR", os.path.join(os.path.dirname(__file__), "../../shared/bench")))
import mesh_bench as mb  # noqa: E402

HYBRID = "X25519MLKEM768"
GROUPS_PATH = os.environ.get("BENCH_PQ_GROUPS")
# (contender, mode) -> {group: handshakes}, summed over repetitions.
groups = {}
current = {"contender": None, "pq": False}

_envoy_tls_params = mb._envoy_tls_params
_run_one = mb.run_one
_stop = mb.Proc.stop


def envoy_tls_params(env):
    params = _envoy_tls_params(env)
    if current["pq"]:
        params["ecdh_curves"] = [HYBRID, "X25519"]
    return params


def start_pq(start):
    def starter(env, role, mode, listen, upstream, admin):
        group, env.tls_group = env.tls_group, HYBRID
        try:
            return start(env, role, mode, listen, upstream, admin)
        finally:
            env.tls_group = group
    return starter


def run_one(env, contender, rep, sanity):
    current["contender"], current["pq"] = contender, contender.endswith("-pq")
    current["env"] = env
    return _run_one(env, contender, rep, sanity)


def _get(port, path):
    with urllib.request.urlopen("http://%s:%d%s" % (mb.HOST, port, path), timeout=2) as r:
        return r.read().decode()


def handshake_groups(env, name):
    """The groups the inbound proxy `name` agreed, by handshake count."""
    port = env.ports.admin_in
    found = {}
    if name.startswith("envoy"):
        for line in _get(port, "/stats?filter=ssl%5C.curves").splitlines():
            m = re.match(r"listener\.[^:]*\.ssl\.curves\.(\S+): (\d+)", line)
            if m:
                found[m.group(1).lower()] = found.get(m.group(1).lower(), 0) + int(m.group(2))
    else:
        for line in _get(port, "/metrics").splitlines():
            m = re.match(r'outrider_tls_handshakes_total\{[^}]*group="([^"]+)"[^}]*\} (\S+)', line)
            if m and 'direction="inbound"' in line:
                found[m.group(1)] = found.get(m.group(1), 0) + int(float(m.group(2)))
    return found


def stop(self, timeout=6.0):
    env, contender = current.get("env"), current["contender"]
    if env and contender and self.name.endswith("-inbound") and self.alive() and \
            (self.name.startswith("envoy") or self.name.startswith(env.our_name)):
        mode = "http" if "-http-" in self.name else "tcp"
        try:
            seen = groups.setdefault("%s/%s" % (contender, mode), {})
            for group, n in handshake_groups(env, self.name).items():
                seen[group] = seen.get(group, 0) + n
        except Exception as e:  # the measurement stands; the proof is missing
            mb.log("could not read the key-exchange groups of %s: %s" % (self.name, e))
    return _stop(self, timeout)


def save_groups():
    if GROUPS_PATH:
        with open(GROUPS_PATH, "w") as f:
            json.dump(groups, f, indent=1, sort_keys=True)


mb._envoy_tls_params = envoy_tls_params
mb.run_one = run_one
mb.Proc.stop = stop
mb.STARTERS["envoy-pq"] = start_pq(mb.start_envoy)
mb.STARTERS[os.environ.get("OUR_NAME", "ours") + "-pq"] = start_pq(mb.start_ours)
atexit.register(save_groups)

if __name__ == "__main__":
    sys.exit(mb.main())
