"""The shared bench (../shared/bench/mesh_bench.py) with request tokens.

With BENCH_JWT_TOKEN set, every request the load generator (wrk) and the
readiness probe send carries `Authorization: Bearer $BENCH_JWT_TOKEN`, the
same token every time. With BENCH_JWT_JWKS, BENCH_JWT_ISSUER and
BENCH_JWT_AUDIENCE also set, Envoy's inbound L7 proxy requires a valid
token through its `jwt_authn` filter with the keys inline (`local_jwks`),
as outrider's inbound proxy does through a RequestAuthentication and an
AuthorizationPolicy that bench/jwt-cost.sh writes. Everything else is the
shared harness, unchanged: it is imported, not copied.
"""

import os
import sys

sys.path.insert(0, os.environ.get("MESH_BENCH_DIR", os.path.join(os.path.dirname(__file__), "../../shared/bench")))
import mesh_bench as mb  # noqa: E402

TOKEN = os.environ.get("BENCH_JWT_TOKEN")
JWKS = os.environ.get("BENCH_JWT_JWKS")
ISSUER = os.environ.get("BENCH_JWT_ISSUER")
AUDIENCE = os.environ.get("BENCH_JWT_AUDIENCE")

_run = mb.run
_http_get = mb.http_get
_envoy_bootstrap = mb.envoy_bootstrap


def run(cmd, **kw):
    """wrk gets the token header (before its URL, the last argument)."""
    if TOKEN and cmd and any(os.path.basename(str(c)) == "wrk" for c in cmd):
        cmd = list(cmd[:-1]) + ["-H", "Authorization: Bearer " + TOKEN, cmd[-1]]
    return _run(cmd, **kw)


def http_get(port, timeout=3.0, close=True):
    c = mb.http.client.HTTPConnection(mb.HOST, port, timeout=timeout)
    try:
        headers = {"Connection": "close"} if close else {}
        if TOKEN:
            headers["Authorization"] = "Bearer " + TOKEN
        c.request("GET", "/", headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def envoy_bootstrap(env, role, mode, listen, upstream, admin):
    boot = _envoy_bootstrap(env, role, mode, listen, upstream, admin)
    if role == "inbound" and mode == "http" and JWKS:
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"].insert(0, {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"bench": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "local_jwks": {"inline_string": JWKS},
                    "forward": True,
                }},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
            },
        })
    return boot


mb.run = run
mb.http_get = http_get
mb.envoy_bootstrap = envoy_bootstrap

if __name__ == "__main__":
    sys.exit(mb.main())
