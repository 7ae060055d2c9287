#!/usr/bin/env bash
# containerd for the emulated ARM64 node (`cargo xtask node --containerd[=1.7|2.1]`): Debian's arm64 containerd
# (trixie: 1.7, sid: 2.1), runc and CNI plugins with their shared-library closure, plus three OCI image archives
# built here by scripts/oci-image.sh (no registry is reachable from the node or from here), laid out as a root to
# pack at / of the node's initramfs.
#
#   scripts/containerd-node.sh [--suite trixie|sid] [--force]
#     --suite  the Debian suite to take the packages from (default trixie)
#     --force  rebuild even when cached
#
# Output contract: the last stdout line is `containerd-node: <dir>`; progress goes to stderr. <dir> holds
#   root/                                    pack this at / of the node (regular files and directories only)
#     usr/bin/{containerd,ctr,containerd-shim-runc-v2}   package containerd (trixie 1.7.x, sid 2.1.x)
#     usr/sbin/runc                          package runc
#     usr/lib/cni/{bridge,ptp,host-local,loopback,portmap}   package containernetworking-plugins; Debian's
#                                            containerd looks for CNI plugins in /usr/lib/cni
#     lib/ld-linux-aarch64.so.1, usr/lib/aarch64-linux-gnu/<soname>   the ELF interpreter and NEEDED closure
#     opt/accordion/images/busybox.oci.tar   `localhost/busybox:latest`: busybox-static (arm64) + its applet links
#     opt/accordion/images/accordion-test.oci.tar   `localhost/accordion-test:latest`: the same busybox layer
#                                            + /etc/accordion-test (the image the shim's tests run)
#     opt/accordion/images/pause.oci.tar     the sandbox image the suite's containerd CRI expects by default
#                                            (1.7: `registry.k8s.io/pause:3.8`, 2.1: `registry.k8s.io/pause:3.10`):
#                                            a tiny static pause program (see PAUSE_C)
#   versions     package versions it came from (the cache key)
#   MANIFEST     path and size of every file under root/
#   recipe       this script's RECIPE (a mismatch triggers a rebuild)
# $CACHE/containerd-node/current-<suite> -> <dir>.
#
# Not included: iptables (and the nf_tables modules it needs in the node), so the portmap plugin and a bridge
# with ipMasq cannot work; the node's CNI config uses neither.
#
# ACCORDION_OFFLINE=1 reuses the last version lookup without touching apt.
set -euo pipefail

RECIPE=2     # bump when the selection or layout of the files changes
SUITE=trixie
PKGS=(containerd runc containernetworking-plugins busybox-static)
BINS=(usr/bin/containerd usr/bin/ctr usr/bin/containerd-shim-runc-v2 usr/sbin/runc
      usr/lib/cni/bridge usr/lib/cni/ptp usr/lib/cni/host-local usr/lib/cni/loopback usr/lib/cni/portmap)
# Libraries of those binaries come from these (checked: nothing else is NEEDED; the self-check catches drift).
LIBPKGS=(libc6 libseccomp2)
LIBDIRS=(usr/lib/aarch64-linux-gnu lib/aarch64-linux-gnu usr/lib lib)
READELF=${CROSS_COMPILE:-aarch64-linux-gnu-}readelf
CC=${CROSS_COMPILE:-aarch64-linux-gnu-}gcc

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_SH="$REPO/scripts/debian-apt.sh"
OCI_IMAGE="$REPO/scripts/oci-image.sh"
CACHE="${ACCORDION_CACHE:-$HOME/.cache/accordion}"
CN="$CACHE/containerd-node"
FORCE=0

while [ $# -gt 0 ]; do
    case "$1" in
    --force) FORCE=1; shift ;;
    --suite) SUITE=${2:-}; shift 2 || shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "containerd-node: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

case "$SUITE" in
trixie) PAUSE_IMAGE=registry.k8s.io/pause:3.8 ;;
sid) PAUSE_IMAGE=registry.k8s.io/pause:3.10 ;;
*) echo "containerd-node: --suite takes trixie or sid, not '$SUITE'" >&2; exit 2 ;;
esac

START=$EPOCHREALTIME
TMPS=()
trap 'rm -rf "${TMPS[@]}"' EXIT
log() { echo "containerd-node: $*" >&2; }
die() { echo "containerd-node: ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

check_tools() {
    local missing=() pkgs=() t p
    for t in "$READELF:binutils-aarch64-linux-gnu" "$CC:gcc-aarch64-linux-gnu" "dpkg-deb:dpkg" "apt-get:apt" \
             "flock:util-linux" "qemu-aarch64-static:qemu-user-static" "sha256sum:coreutils" "tar:tar"; do
        if ! command -v "${t%%:*}" >/dev/null 2>&1; then
            missing+=("${t%%:*}"); pkgs+=("${t#*:}")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        p=$(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')
        die "missing host tools: ${missing[*]} -- install with: apt-get install ${p% }"
    fi
    # The static pause program links against the arm64 cross libc.a.
    [ -f /usr/aarch64-linux-gnu/lib/libc.a ] || die "missing arm64 libc.a -- install with: apt-get install libc6-dev-arm64-cross"
}

# ---------------------------------------------------------------------------------------------
# Versions of the packages in trixie, looked up at most once a day (when debian-apt.sh refreshes its index).
resolve_versions() {
    local f="$CN/resolved-$SUITE" stamp="$CACHE/apt/$SUITE/updated" p v out=""
    if [ -f "$f" ] && [ "$FORCE" = 0 ]; then
        if [ "${ACCORDION_OFFLINE:-0}" = 1 ] || { [ -f "$stamp" ] && [ "$f" -nt "$stamp" ] &&
                [ -z "$(find "$stamp" -mmin +1440)" ]; }; then
            VERSIONS=$(cat "$f"); [ -n "$VERSIONS" ] && return
        fi
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing host tool apt-get -- install with: apt-get install apt"
    for p in "${PKGS[@]}" "${LIBPKGS[@]}"; do
        v=$("$APT_SH" version "$SUITE" "$p") && [ -n "$v" ] && [ "$v" != "(none)" ] || {
            if [ -f "$f" ]; then
                VERSIONS=$(cat "$f"); log "warning: package lookup failed, reusing the previous one"; return
            fi
            die "cannot resolve $p in Debian $SUITE (see scripts/debian-apt.sh)"
        }
        out+="$p $v"$'\n'
    done
    mkdir -p "$CN"
    printf '%s' "$out" > "$f.tmp" && mv "$f.tmp" "$f"
    VERSIONS=$(cat "$f")
    log "resolved: $(tr '\n' ' ' <<< "$VERSIONS")"
}

# in_root ROOT PATH: PATH resolved inside ROOT, symlinks followed inside ROOT (absolute targets re-rooted).
# Prints the ROOT-relative path of the final file; fails if missing.
in_root() {
    local root=$1 p=${2#/} n=0 t
    while [ -L "$root/$p" ]; do
        n=$((n + 1)); [ $n -le 40 ] || return 1
        t=$(readlink "$root/$p")
        case "$t" in
        /*) p=${t#/} ;;
        *) p=$(dirname "$p")/$t ;;
        esac
        p=$(realpath -m -s --relative-to=/ "/$p")
    done
    [ -f "$root/$p" ] || return 1
    echo "$p"
}

# elf_dyn FILE: "NEEDED name" lines (nothing for static binaries).
elf_dyn() { "$READELF" -dW "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/NEEDED \1/p'; }

# closure STAGE OUT: copy BINS, their interpreter and their transitive DT_NEEDED closure from STAGE to OUT.
closure() {
    local stage=$1 out=$2 b interp rel f name dir found r kind
    local -A LIB=()
    local -a queue=()
    for b in "${BINS[@]}"; do
        [ -f "$stage/$b" ] || die "/$b is not in the .debs"
        install -D -m 0755 "$stage/$b" "$out/$b"
        queue+=("$b")
        interp=$("$READELF" -lW "$stage/$b" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
        [ -n "$interp" ] || continue
        [ -z "${LIB[$(basename "$interp")]:-}" ] || continue
        # Merged /usr: trixie ships /usr/lib/ld-linux-aarch64.so.1; the node's /lib is a real directory
        # (kernel modules), so the interpreter is materialised at its PT_INTERP path.
        rel=$(in_root "$stage" "$interp" || in_root "$stage" "/usr$interp") || die "interpreter $interp not found"
        install -D -m 0755 "$stage/$rel" "$out$interp"
        LIB[$(basename "$interp")]=$interp
    done
    while [ ${#queue[@]} -gt 0 ]; do
        f=${queue[-1]}; unset 'queue[-1]'
        while read -r kind name; do
            [ -z "${LIB[$name]:-}" ] || continue
            found=
            for dir in "${LIBDIRS[@]}"; do
                if r=$(in_root "$stage" "/$dir/$name"); then found=$dir; break; fi
            done
            [ -n "$found" ] || die "$name (needed by /$f) not found in the .debs"
            install -D -m 0644 "$stage/$r" "$out/$found/$name"
            LIB[$name]=/$found/$name
            queue+=("$found/$name")
        done < <(elf_dyn "$out/$f")
    done
    log "   ${#BINS[@]} binaries, ${#LIB[@]} shared objects (with the interpreter)"
}

# The sandbox ("pause") container's program: what registry.k8s.io/pause does, in a few lines of C, static.
# Chosen over `busybox sleep`: as PID 1 of a pod it must exit on SIGTERM/SIGINT (PID 1 gets no default
# signal actions) and reap orphans when the pod shares its PID namespace; sleep does neither.
PAUSE_C='#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    struct sigaction a = {0}, c = {0};
    a.sa_handler = stop; sigaction(SIGINT, &a, 0); sigaction(SIGTERM, &a, 0);
    c.sa_handler = reap; c.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &c, 0);
    for (;;) pause();
}
'

images() {
    local stage=$1 out=$2 tmp=$3 bb a
    bb=$(in_root "$stage" /bin/busybox || in_root "$stage" /usr/bin/busybox) || die "busybox-static has no busybox"
    # busybox: the binary and a link per applet (the list comes from the binary itself, under qemu-user).
    local r="$tmp/busybox-rootfs"
    mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/root"
    chmod 1777 "$r/tmp"
    install -m 0755 "$stage/$bb" "$r/bin/busybox"
    local -a applets
    mapfile -t applets < <(qemu-aarch64-static "$r/bin/busybox" --list) || die "busybox --list failed under qemu-aarch64-static"
    [ ${#applets[@]} -gt 100 ] || die "busybox --list printed only ${#applets[@]} applets"
    for a in "${applets[@]}"; do [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
    "$OCI_IMAGE" localhost/busybox:latest "$out/opt/accordion/images/busybox.oci.tar" --cmd '["sh"]' "$r"
    # accordion-test, the image the shim's tests run: that same busybox layer (one blob and one snapshot in
    # containerd, which dedupes by digest) under a small layer whose /etc/accordion-test tells a container's
    # rootfs apart from the guest's own busybox.
    local t="$tmp/accordion-test-rootfs"
    mkdir -p "$t/etc"
    echo accordion-test > "$t/etc/accordion-test"
    "$OCI_IMAGE" localhost/accordion-test:latest "$out/opt/accordion/images/accordion-test.oci.tar" --cmd '["sh"]' "$r" "$t"

    # pause: one static binary.
    local p="$tmp/pause-rootfs"
    mkdir -p "$p"
    printf '%s' "$PAUSE_C" > "$tmp/pause.c"
    "$CC" -static -Os -s -o "$p/pause" "$tmp/pause.c" || die "building pause.c failed"
    "$OCI_IMAGE" "$PAUSE_IMAGE" "$out/opt/accordion/images/pause.oci.tar" --entrypoint '["/pause"]' "$p"
}

build() {
    local out=$1 tmp="$1.tmp.$$" t0 p d
    TMPS+=("$tmp"); rm -rf "$tmp"; mkdir -p "$tmp/debs" "$tmp/stage"

    t0=$EPOCHREALTIME; log ">> download ${PKGS[*]} ${LIBPKGS[*]} (arm64, $SUITE)"
    # Exactly these packages, not the apt closure: containernetworking-plugins depends on iptables (and its
    # libraries), which only portmap/ipMasq use at run time; the ELF closure below decides what is needed.
    "$APT_SH" download "$SUITE" "$tmp/debs" $(printf '%s:arm64 ' "${PKGS[@]}" "${LIBPKGS[@]}") >&2 ||
        die "apt download failed"
    for p in "${PKGS[@]}" "${LIBPKGS[@]}"; do
        d=$(ls "$tmp/debs/${p}_"*_arm64.deb 2>/dev/null | head -n1) || true
        [ -n "$d" ] || die "no .deb for $p"
        [ "$(dpkg-deb -f "$d" Version)" = "$(awk -v p="$p" '$1 == p {print $2}' <<< "$VERSIONS")" ] ||
            log "warning: downloaded $p $(dpkg-deb -f "$d" Version), index said otherwise"
        dpkg-deb -x "$d" "$tmp/stage"
    done
    log "<< $(du -cm "$tmp"/debs/*.deb | tail -n1 | cut -f1) MB of .debs, extracted ($(elapsed "$t0")s)"

    t0=$EPOCHREALTIME; log ">> ELF closure"
    closure "$tmp/stage" "$tmp/root"
    # Everything packed must resolve inside root alone (ld.so's default dirs, no ld.so.cache).
    local f kind name ok dir
    while IFS= read -r f; do
        while read -r kind name; do
            ok=
            for dir in "${LIBDIRS[@]}"; do [ -f "$tmp/root/$dir/$name" ] && ok=1 && break; done
            [ -n "$ok" ] || die "self-check: $name (needed by ${f#"$tmp/root"}) missing from root"
        done < <(elf_dyn "$f")
    done < <(find "$tmp/root" -type f)
    log "<< closure ($(elapsed "$t0")s)"

    t0=$EPOCHREALTIME; log ">> OCI images"
    images "$tmp/stage" "$tmp/root" "$tmp"
    log "<< images ($(elapsed "$t0")s)"

    # Host smoke check under qemu-user: the binaries start with root's own libc (LD_LIBRARY_PATH wins over -L's
    # fallback to host paths, as root's libraries will in the node).
    local v
    v=$(qemu-aarch64-static -L "$tmp/root" -E LD_LIBRARY_PATH=/usr/lib/aarch64-linux-gnu \
        "$tmp/root/usr/bin/containerd" --version 2>&1) || die "containerd --version failed under qemu-user: $v"
    log "   host check: $v"
    v=$(qemu-aarch64-static -L "$tmp/root" -E LD_LIBRARY_PATH=/usr/lib/aarch64-linux-gnu \
        "$tmp/root/usr/sbin/runc" --version 2>&1) || die "runc --version failed under qemu-user: $v"
    log "   host check: ${v%%$'\n'*}"

    [ -z "$(find "$tmp/root" ! -type f ! -type d)" ] || die "self-check: root holds something other than files and dirs"
    (cd "$tmp/root" && find . -type f -printf '%P %s\n' | sort) > "$tmp/MANIFEST"
    echo "$VERSIONS" > "$tmp/versions"
    rm -rf "$tmp/debs" "$tmp/stage" "$tmp"/*-rootfs "$tmp/pause.c"
    echo "$RECIPE" > "$tmp/recipe"
    log "   root: $(wc -l < "$tmp/MANIFEST") files, $(du -sm "$tmp/root" | cut -f1) MB"
    rm -rf "$out"
    mv "$tmp" "$out"
}

# ---------------------------------------------------------------------------------------------
resolve_versions
# The directory is named after containerd's version plus a hash of every version and the recipe.
key=$(printf '%s\nrecipe %s\n%s' "$VERSIONS" "$RECIPE" "$([ "$SUITE" = trixie ] || echo "pause $PAUSE_IMAGE")" |
    sha256sum | cut -c1-12)
cver=$(awk '$1 == "containerd" {print $2}' <<< "$VERSIONS")
out="$CN/${cver//[:~]/_}-$key"
complete() { [ -f "$out/recipe" ] && [ "$(cat "$out/recipe")" = "$RECIPE" ] && [ -x "$out/root/usr/bin/containerd" ]; }
if [ "$FORCE" = 1 ] || ! complete; then
    check_tools
    mkdir -p "$CN"
    exec 9> "$CN/.lock"
    flock 9
    if [ "$FORCE" = 1 ] || ! complete; then   # another run may have built it while we waited
        log "building -> $out"
        build "$out"
        log "built in $(elapsed "$START")s"
    fi
    flock -u 9
fi
[ "$(readlink "$CN/current-$SUITE" 2>/dev/null)" = "$(basename "$out")" ] || ln -sfn "$(basename "$out")" "$CN/current-$SUITE"
echo "containerd-node: $out"
