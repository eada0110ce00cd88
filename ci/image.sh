#!/usr/bin/env bash
# Builds the container image from the project's own Dockerfile and runs
# it as shipped. No registry is reachable here, so:
#   - the runtime stage's base (debian:12.11-slim) is made from Debian
#     packages with mmdebstrap (minbase, slimmed as Debian's -slim images
#     are) and imported under that name; the Dockerfile's own
#     `RUN apt-get install iptables ca-certificates` then runs against the
#     Debian mirror, unmodified;
#   - the build stage (`build`, a rust image) is replaced by a directory
#     holding a binary already built (`--build-context build=DIR`), so the
#     runtime stage is exactly the shipped one.
# Then: the image's user and entrypoint, --version and `demo` on a
# read-only root filesystem with loopback only, both iptables flavors
# present, `init` with NET_ADMIN in the container's own network namespace
# (rules there, none on the host), and `init` refused without NET_ADMIN.
#
#   ci/image.sh [BINARY]    # default: the static release build if there is
#                           # one, else target/debug/outrider (what CI built)
#
# Needs root (rootful podman, mmdebstrap). Installs podman, runc and
# mmdebstrap if missing. The base rootfs is cached under
# target/ci-tools/image, so a rerun needs no mirror for it.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
log() { printf 'ci/image.sh: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

host=$(rustc -vV | sed -n 's/^host: //p')
binary=${1:-}
if [ -z "$binary" ]; then
  if [ -x "target/$host/release/outrider" ]; then
    binary="target/$host/release/outrider"
  else
    binary=target/debug/outrider
  fi
fi
[ -x "$binary" ] || fail "no binary at $binary (build it first)"

missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

cache="$PWD/target/ci-tools/image"
mkdir -p "$cache"

# podman on these hosts: crun cannot start containers on a hybrid cgroup
# hierarchy (runc can), and root lacks CAP_SYS_RESOURCE, so podman must
# not ask for more open files or processes than this process may have.
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
export CONTAINERS_CONF="$cache/containers.conf"
cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF

# The Debian mirror apt already uses.
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
[ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
security=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -E '/debian-security/?$' | head -n1 || true)
security=${security:-$mirror-security}
security=${security%/}

# The base, as Debian's -slim images are made: minbase with /usr merged
# (the hook, rather than the usrmerge package and the perl it pulls in),
# no man pages, docs or locales, apt caches cleaned after every run.
base_tar="$cache/bookworm-slim.tar"
if [ ! -s "$base_tar" ]; then
  log "making the bookworm-slim base with mmdebstrap from $mirror (about a minute)"
  SOURCE_DATE_EPOCH=1747699200 nice -n 10 mmdebstrap \
    --variant=minbase --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1/etc/resolv.conf"; echo localhost > "$1/etc/hostname"' \
    --customize-hook='printf "%s\n" "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true\"; };" "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" > "$1/etc/apt/apt.conf.d/docker-clean"' \
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin' \
    bookworm "$base_tar.tmp" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main" >&2
  mv "$base_tar.tmp" "$base_tar"
fi
# The Dockerfile's runtime FROM, as podman resolves the short name.
from=$(awk 'toupper($1) == "FROM" { image = $2 } END { print image }' Dockerfile)
case $from in */*) ;; *) from="docker.io/library/$from" ;; esac
sum=$(sha256sum "$base_tar" | cut -c1-64)
if [ "$(podman image inspect --format '{{index .Config.Labels "rootfs.sha256"}}' "$from" 2>/dev/null || true)" != "$sum" ]; then
  log "importing the base as $from"
  podman import --quiet --change 'CMD ["bash"]' --change "LABEL rootfs.sha256=$sum" "$base_tar" "$from" >/dev/null
fi

# The build stage, replaced by the binary (stripped, as the Dockerfile does).
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/outrider"
strip "$context/outrider"
image=localhost/outrider:ci
log "building $image from Dockerfile with $binary as the build stage"
podman build --quiet --pull=never --network=host --build-context "build=$context" \
  -f Dockerfile -t "$image" . >/dev/null

run() { podman run --rm --pull=never "$@"; }

user=$(podman image inspect --format '{{.Config.User}}' "$image")
entrypoint=$(podman image inspect --format '{{json .Config.Entrypoint}}' "$image")
[ "$user" = "2102:2102" ] || fail "image user is $user, not 2102:2102"
[ "$entrypoint" = '["/usr/local/bin/outrider"]' ] || fail "entrypoint is $entrypoint"

version=$(run --read-only --network=none "$image" --version)
log "runs as $user: $version"

for flavor in nft legacy; do
  run --read-only --network=none --entrypoint "iptables-$flavor-restore" "$image" --version >/dev/null \
    || fail "iptables-$flavor-restore is missing from the image"
done

demo=$(run --read-only --network=none "$image" demo 2>&1) || { echo "$demo" >&2; fail "demo"; }
echo "$demo" | grep -q 'All steps passed' || { echo "$demo" >&2; fail "demo did not pass"; }
log "demo: $(echo "$demo" | tail -n1)"

host_rules() { iptables-save -t nat 2>/dev/null | grep -c OUTRIDER || true; }
before=$(host_rules)
inside=$(run --network=none --read-only --user 0 --cap-drop=all --cap-add NET_ADMIN --cap-add NET_RAW \
  --entrypoint sh "$image" -c 'outrider init >/dev/null && iptables-save -t nat | grep -c OUTRIDER')
after=$(host_rules)
[ "$inside" -gt 0 ] || fail "init left no OUTRIDER rules in the container's namespace"
[ "$before" = "$after" ] || fail "init changed the host's nat table ($before -> $after OUTRIDER rules)"
log "init: $inside OUTRIDER rules in the container's network namespace, host unchanged ($after)"

if denied=$(run --network=none --read-only "$image" init 2>&1); then
  fail "init without NET_ADMIN succeeded"
fi
echo "$denied" | grep -q 'CAP_NET_ADMIN is missing' || { echo "$denied" >&2; fail "init without NET_ADMIN: unclear error"; }
log "init without NET_ADMIN refused: CAP_NET_ADMIN is missing"

size=$(podman image inspect --format '{{.Size}}' "$image")
log "image $image: $((size / 1000000)) MB ($(du -h "$context/outrider" | cut -f1) binary, stripped)"
