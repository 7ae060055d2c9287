#!/usr/bin/env bash
# An arm64 OCI image-layout archive made from directories, one uncompressed layer each: what
# `ctr images import` takes, built without a registry or a container engine (scripts/containerd-node.sh
# builds the node's images with it).
#
#   scripts/oci-image.sh NAME OUT [--entrypoint JSON] [--cmd JSON] LAYER_DIR...
#     NAME          the image name, e.g. localhost/my:latest (annotation io.containerd.image.name, which
#                   `ctr images import` names the image after)
#     OUT           the archive to write (oci-layout, index.json, blobs/sha256/…)
#     --entrypoint  the config's Entrypoint, a JSON array (default null)
#     --cmd         the config's Cmd, a JSON array (default null)
#     LAYER_DIR     one directory per layer, lowest first
#
# Layers are reproducible (sorted, numeric root owner, mtime 0): the same directory always gives the same
# layer digest, so images built on the same base directory share that layer in containerd's store.
# Progress goes to stderr.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "oci-image: ERROR: $*" >&2; exit 1; }

[ $# -ge 2 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
NAME=$1 OUT=$2
shift 2
ENTRYPOINT=null CMD=null
LAYERS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --entrypoint) ENTRYPOINT=${2:?--entrypoint needs a JSON array}; shift 2 ;;
    --cmd) CMD=${2:?--cmd needs a JSON array}; shift 2 ;;
    -*) die "unknown option: $1 (try --help)" ;;
    *) [ -d "$1" ] || die "layer $1 is not a directory"; LAYERS+=("$(cd "$1" && pwd)"); shift ;;
    esac
done
[ ${#LAYERS[@]} -gt 0 ] || die "no LAYER_DIR given"

d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/blobs/sha256"

# blob FILE: move FILE into blobs/sha256/<digest>; prints "sha256:<hex> <size>".
blob() {
    local h s
    h=$(sha256sum "$1" | cut -d' ' -f1); s=$(stat -c %s "$1")
    mv "$1" "$d/blobs/sha256/$h"
    echo "sha256:$h $s"
}

diff_ids=() layers=()
for l in "${LAYERS[@]}"; do
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu -C "$l" -cf "$d/layer.tar" .
    read -r ld ls < <(blob "$d/layer.tar")
    diff_ids+=("\"$ld\"")
    layers+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"$ld\",\"size\":$ls}")
done
join() { local IFS=,; echo "$*"; }

cat > "$d/config.json" <<EOF
{"architecture":"arm64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":$ENTRYPOINT,"Cmd":$CMD,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":[$(join "${diff_ids[@]}")]},"history":[{"created_by":"scripts/oci-image.sh"}]}
EOF
read -r cd cs < <(blob "$d/config.json")
cat > "$d/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$cd","size":$cs},"layers":[$(join "${layers[@]}")]}
EOF
read -r md ms < <(blob "$d/manifest.json")
cat > "$d/index.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"$md","size":$ms,"platform":{"architecture":"arm64","os":"linux"},"annotations":{"io.containerd.image.name":"$NAME","org.opencontainers.image.ref.name":"${NAME##*:}"}}]}
EOF
echo '{"imageLayoutVersion":"1.0.0"}' > "$d/oci-layout"
mkdir -p "$(dirname "$OUT")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$d" -cf "$OUT" oci-layout index.json blobs
echo "oci-image: $NAME: ${#LAYERS[@]} layer(s), manifest $md, $(stat -c %s "$OUT") bytes" >&2
