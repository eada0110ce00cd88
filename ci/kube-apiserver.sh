#!/usr/bin/env bash
# Builds a real kube-apiserver (v1.20.2) and links etcd into DIR, for
# tests/kube_apiserver.rs. Only Debian's registry is reachable here, and
# Debian bookworm's `kubernetes` source package is the one complete,
# vendored kube-apiserver source it offers (the Go module proxy is not
# reachable), so: Debian's etcd and Go 1.19, `apt-get source kubernetes`,
# the vendored reflect2 replaced by Debian's 1.0.2 (1.0.1 crashes under
# Go >= 1.18 when the server writes YAML or pretty JSON), upstream's
# `make gen_openapi`, then a GOPATH-mode build as upstream's 1.20 scripts
# do it. The method is the team's ../shared/tools/kube-apiserver (its
# README says what 1.20 lacks: CEL, matchConditions, native sidecars).
#
#   ci/kube-apiserver.sh DIR    # ~6-10 min the first time; seconds after
#
# Needs root (apt). Leaves DIR/kube-apiserver and DIR/etcd; the Go cache
# and sources are removed after a build (1.3 GB) unless KEEP_BUILD=1.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$(realpath -m "$1")
version=v1.20.2
debian_version=1.20.5+really1.20.2-1.1+deb12u1
log() { printf 'ci/kube-apiserver.sh: %s\n' "$*" >&2; }

if [ -x "$dir/kube-apiserver" ] && [ -x "$dir/etcd" ]; then
  exit 0
fi
mkdir -p "$dir"

sources=/etc/apt/sources.list.d/outrider-debian-src.sources
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: $debian_version"; then
  log "adding bookworm deb-src (apt-get source needs it)"
  cat > "$sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq >&2
fi
missing=()
for p in etcd-server golang-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
ln -sf "$(command -v etcd)" "$dir/etcd"

work="$dir/build"
src="$work/kubernetes-${debian_version%-*}"
if [ ! -f "$src/cmd/kube-apiserver/apiserver.go" ]; then
  log "apt-get source kubernetes=$debian_version"
  mkdir -p "$work"
  (cd "$work" && apt-get source -qq "kubernetes=$debian_version" >&2)
fi
reflect2="$src/vendor/github.com/modern-go/reflect2"
if [ ! -f "$reflect2/go_above_118.go" ]; then
  rm -f "$reflect2"/*.go "$reflect2"/*.s
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
     /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$reflect2"/
fi
go_env=(env -u GOFLAGS PATH="/usr/lib/go/bin:$PATH" GOCACHE="$work/gocache" HOME="$work"
        GOPROXY=off GOTOOLCHAIN=local GOMAXPROCS="${GOMAXPROCS:-2}")
if [ ! -f "$src/pkg/generated/openapi/zz_generated.openapi.go" ]; then
  log "make gen_openapi"
  (cd "$src" && "${go_env[@]}" nice -n 10 make gen_openapi >&2)
fi

log "building kube-apiserver $version (several minutes on 2 cores)"
started=$(date +%s)
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
           k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
done
mkdir -p "$work/gopath/src/k8s.io"
ln -sfn "$src" "$work/gopath/src/k8s.io/kubernetes"
(cd "$work/gopath/src/k8s.io/kubernetes" && "${go_env[@]}" GOPATH="$work/gopath" \
   GO111MODULE=off CGO_ENABLED=0 nice -n 10 go build -p "${GOMAXPROCS:-2}" -trimpath \
   -ldflags "$ldflags" -o "$dir/kube-apiserver.tmp" ./cmd/kube-apiserver)
mv "$dir/kube-apiserver.tmp" "$dir/kube-apiserver"
log "built in $(( $(date +%s) - started )) s: $("$dir/kube-apiserver" --version)"
[ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$work"
