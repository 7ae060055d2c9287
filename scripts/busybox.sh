#!/usr/bin/env bash
# Fetches Debian trixie's static arm64 busybox into the cache (once) and prints its path.
set -euo pipefail
CACHE="${ACCORDION_CACHE:-$HOME/.cache/accordion}"
here=$(cd "$(dirname "$0")" && pwd)
dir="$CACHE/busybox"
if [ -x "$dir/current/busybox" ]; then
    echo "$dir/current/busybox"
    exit 0
fi
ver=$("$here/debian-apt.sh" version trixie busybox-static)
[ -n "$ver" ] || { echo "busybox: cannot resolve busybox-static in trixie" >&2; exit 1; }
out="$dir/$ver"
rm -rf "$out.tmp" && mkdir -p "$out.tmp/debs" "$out.tmp/x"
"$here/debian-apt.sh" download trixie "$out.tmp/debs" "busybox-static:arm64"
dpkg -x "$out.tmp/debs"/busybox-static_*_arm64.deb "$out.tmp/x"
install -m 0755 "$out.tmp/x/bin/busybox" "$out.tmp/busybox" 2>/dev/null \
    || install -m 0755 "$out.tmp/x/usr/bin/busybox" "$out.tmp/busybox"
rm -rf "$out.tmp/debs" "$out.tmp/x" "$out"
mv "$out.tmp" "$out"
ln -sfn "$ver" "$dir/current"
echo "$dir/current/busybox"
