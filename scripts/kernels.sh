#!/usr/bin/env bash
# Accordion's two arm64 kernels, cached:
#   - Image-debian: Debian trixie's stock linux-image (the node's kernel, and the "unmodified distro guest"),
#     as a raw arm64 Image, with a small decompressed module tree and insmod orders for guest and node.
#   - Image: our minimal microVM guest kernel, built from Debian's linux-source-6.12 with the fragment
#     guest/kernel/accordion.config on top of allnoconfig. Everything built in, no modules.
#
#   scripts/kernels.sh [-j N] [--force] [--smoke]
#     -j N     parallel make jobs (default: nproc, or $ACCORDION_KERNEL_JOBS)
#     --force  rebuild both kernels even when cached (downloads and the source tree stay cached)
#     --smoke  afterwards, boot both Images under qemu-system-aarch64 (TCG, -smp 2) with a tiny static
#              /init (guest/kernel/smoke-init.c) and check it runs and sees 2 CPUs (and vsock; the stock
#              kernel loads its guest+node modules first); with qemu-efi-aarch64 installed, also boot
#              Image through UEFI + ACPI and check GED and virtio-mmio bind
#
#   KERNELS_PRUNE=1 removes the minimal kernel's source tree and objects once it is built (.ci/run)
#
# Output contract (xtask depends on it): $CACHE/kernels/current -> a directory holding
#   Image  Image-debian  debian-kver  debian-modules/lib/modules/<kver>/  modules-guest.order
#   modules-node.order  accordion.config  timings.txt
# The last stdout line is `kernels: <dir>`; progress goes to stderr.
#
# Cache keys: minimal = linux-source version + sha256(fragment) + RECIPE;
#             stock   = linux-image package + version + DEB_RECIPE.
# Package versions are looked up at most once a day (when debian-apt.sh refreshes its index);
# ACCORDION_OFFLINE=1 reuses the last lookup without touching apt.
set -euo pipefail

RECIPE=1       # bump when the way the minimal kernel is built changes
DEB_RECIPE=4   # bump when the stock-kernel extraction (module list, orders) changes
SUITE=trixie
SRC_PKG=linux-source-6.12
META_PKG=linux-image-arm64
CROSS=${CROSS_COMPILE:-aarch64-linux-gnu-}

# Modules kept from the stock kernel (with their dependencies, from modules.dep), in load order.
# Guest: virtio-mmio transport first, then the agent's vsock; then disk, net, overlayfs and
# virtio-mem (memory resize).
GUEST_MODULES=(virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
               virtio_blk virtio_net overlay virtio_mem)
# Node: vhost-vsock (guest <-> shim), vhost-net, tap/veth/bridge for pod networking, overlayfs for containerd.
NODE_MODULES=(vhost_iotlb vhost vhost_vsock vhost_net tun veth overlay bridge sch_ingress cls_u32 act_mirred)
OPTIONAL_MODULES=(br_netfilter)   # node, appended when present

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_SH="$REPO/scripts/debian-apt.sh"
FRAG="$REPO/guest/kernel/accordion.config"
CACHE="${ACCORDION_CACHE:-$HOME/.cache/accordion}"
KC="$CACHE/kernels"
JOBS="${ACCORDION_KERNEL_JOBS:-$(nproc)}"
FORCE=0
SMOKE=0

while [ $# -gt 0 ]; do
    case "$1" in
    -j) JOBS=$2; shift 2 ;;
    -j*) JOBS=${1#-j}; shift ;;
    --force) FORCE=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "kernels: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

START=$EPOCHREALTIME
# Work directories of an unfinished step are removed on exit (a finished one has been renamed away).
TMPS=()
trap 'rm -rf "${TMPS[@]}"' EXIT
log() { echo "kernels: $*" >&2; }
die() { echo "kernels: ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# step NAME TIMINGS_FILE -- run the rest as a timed step; `step_end` closes it.
step_begin() { STEP=$1; STEP_FILE=$2; STEP_T0=$EPOCHREALTIME; log ">> $STEP"; }
step_end() {
    local dt; dt=$(elapsed "$STEP_T0")
    printf '%s %s\n' "$STEP" "$dt" >> "$STEP_FILE"
    log "<< $STEP: ${dt}s"
}

check_tools() {
    local missing=() pkgs=() t p
    for t in "${CROSS}gcc:gcc-aarch64-linux-gnu" "${CROSS}ld:binutils-aarch64-linux-gnu" "gcc:gcc" "make:make" \
             "bc:bc" "bison:bison" "flex:flex" "xz:xz-utils" "zstd:zstd" "gzip:gzip" "depmod:kmod" "modprobe:kmod" \
             "file:file" "dpkg-deb:dpkg" "apt-get:apt" "flock:util-linux" "perl:perl" "sha256sum:coreutils"; do
        if ! command -v "${t%%:*}" >/dev/null 2>&1 && [ ! -x "/usr/sbin/${t%%:*}" ] && [ ! -x "/sbin/${t%%:*}" ]; then
            missing+=("${t%%:*}"); pkgs+=("${t#*:}")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        p=$(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')
        die "missing host tools: ${missing[*]} -- install with: apt-get install ${p% }"
    fi
    # Headers the kernel's host programs include.
    [ -f /usr/include/gelf.h ] || log "warning: libelf-dev not installed (needed by some kernel configs)"
    [ -f /usr/include/openssl/opensslv.h ] || log "warning: libssl-dev not installed (needed by some kernel configs)"
}
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------------------------------------
# Versions: linux-source-6.12, linux-image-arm64 and the real linux-image-<abi>-arm64 behind it.
resolve_versions() {
    local f="$KC/resolved" stamp="$CACHE/apt/$SUITE/updated"
    if [ -f "$f" ]; then
        if [ "${ACCORDION_OFFLINE:-0}" = 1 ] || { [ -f "$stamp" ] && [ "$f" -nt "$stamp" ] &&
                [ -z "$(find "$stamp" -mmin +1440)" ]; }; then
            # shellcheck disable=SC1090
            . "$f"; return
        fi
    fi
    local t0=$EPOCHREALTIME src meta img
    if src=$("$APT_SH" version "$SUITE" "$SRC_PKG") && meta=$("$APT_SH" version "$SUITE" "$META_PKG") &&
            img=$("$APT_SH" depends "$SUITE" "$META_PKG" | grep -m1 '^linux-image-') &&
            [ -n "$src" ] && [ -n "$meta" ] && [ -n "$img" ]; then
        mkdir -p "$KC"
        printf 'SRC_VER=%q\nMETA_VER=%q\nIMG_PKG=%q\n' "$src" "$meta" "$img" > "$f.tmp"
        mv "$f.tmp" "$f"
        SRC_VER=$src META_VER=$meta IMG_PKG=$img
        log "resolved $SRC_PKG $SRC_VER, $META_PKG $META_VER -> $IMG_PKG ($(elapsed "$t0")s)"
    elif [ -f "$f" ]; then
        log "warning: package lookup failed, reusing the previous one"
        # shellcheck disable=SC1090
        . "$f"
    else
        die "cannot resolve $SRC_PKG / $META_PKG versions in Debian $SUITE (see scripts/debian-apt.sh)"
    fi
}

# download PKG[:arch] GLOB -> prints the path of the cached .deb
download_deb() {
    local pkg=$1 glob=$2 dir="$KC/debs" f
    mkdir -p "$dir"
    f=$(compgen -G "$dir/$glob" | sort | tail -n1 || true)
    if [ -z "$f" ]; then
        local tmp; tmp=$(mktemp -d "$dir/.dl.XXXXXX")
        "$APT_SH" download "$SUITE" "$tmp" "$pkg" >&2 || { rm -rf "$tmp"; die "download of $pkg failed"; }
        mv "$tmp"/*.deb "$dir"/
        rm -rf "$tmp"
        f=$(compgen -G "$dir/$glob" | sort | tail -n1 || true)
        [ -n "$f" ] || die "downloaded $pkg but found no $dir/$glob"
    fi
    echo "$f"
}

magic() { od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

# raw_image IN OUT: arm64 Image ("ARMd" at offset 56) from a raw, gzip/zstd/xz or EFI zboot vmlinuz.
raw_image() {
    local in=$1 out=$2 m
    if [ "$(magic "$in" 56 4)" = 41524d64 ]; then
        cp "$in" "$out"
    else
        m=$(magic "$in" 0 4)
        case "$m" in
        1f8b*) gzip -dc "$in" > "$out" ;;
        28b52ffd) zstd -qdc "$in" > "$out" ;;
        fd377a58) xz -dc "$in" > "$out" ;;
        4d5a*)   # EFI zboot: "zimg" at 4, payload offset/size (le32) at 8/12, compression name at 24
            [ "$(magic "$in" 4 4)" = 7a696d67 ] || die "$in: PE file that is not an EFI zboot image"
            local off size comp
            off=$(od -An -tu4 -j 8 -N 4 "$in" | tr -d ' ')
            size=$(od -An -tu4 -j 12 -N 4 "$in" | tr -d ' ')
            comp=$(dd if="$in" bs=1 skip=24 count=8 status=none | tr -d '\0')
            case "$comp" in
            gzip) tail -c +$((off + 1)) "$in" | head -c "$size" | gzip -dc > "$out" ;;
            zstd|zstd22) tail -c +$((off + 1)) "$in" | head -c "$size" | zstd -qdc > "$out" ;;
            xzkern|xz) tail -c +$((off + 1)) "$in" | head -c "$size" | xz -dc > "$out" ;;
            *) die "$in: zboot compression '$comp' not supported" ;;
            esac ;;
        *) die "$in: unknown kernel image format (magic $m)" ;;
        esac
    fi
    [ "$(magic "$out" 56 4)" = 41524d64 ] || die "$out: not a raw arm64 Image (no ARMd magic at 56)"
}

# ---------------------------------------------------------------------------------------------
# Stock Debian kernel: raw Image + decompressed module subset + load orders.
build_debian() {
    local out=$1 tmp="$1.tmp.$$" tf deb root kver m line name
    TMPS+=("$tmp"); rm -rf "$tmp"; mkdir -p "$tmp"
    tf="$tmp/timings.txt"

    step_begin debian.download "$tf"
    deb=$(download_deb "$IMG_PKG:arm64" "${IMG_PKG}_*_arm64.deb")
    log "   $(basename "$deb") ($(du -m "$deb" | cut -f1) MB)"
    step_end

    step_begin debian.extract "$tf"
    root="$tmp/root"
    dpkg-deb -x "$deb" "$root"
    kver=$(basename "$(compgen -G "$root/usr/lib/modules/*" | head -n1)")
    [ -n "$kver" ] && [ -f "$root/boot/vmlinuz-$kver" ] || die "$deb: no usr/lib/modules/<kver> or boot/vmlinuz-<kver>"
    log "   file: $(file -b "$root/boot/vmlinuz-$kver" | cut -c1-100)"
    raw_image "$root/boot/vmlinuz-$kver" "$tmp/Image-debian"
    echo "$kver" > "$tmp/debian-kver"
    step_end

    step_begin debian.modules "$tf"
    # The deb has no modules.dep: generate it for the whole tree, then follow it for our subset.
    ln -s usr/lib "$root/lib"
    depmod -b "$root" "$kver"
    # resolve_order NAME... -> module names, dependencies first, de-duplicated, builtins dropped.
    resolve_order() {
        local want out_names=() seen=" " n p
        for want in "$@"; do
            local deps
            deps=$(modprobe -d "$root" -S "$kver" --show-depends "$want" 2>&1) ||
                { echo "!$want"; continue; }
            while read -r kind p _; do
                [ "$kind" = insmod ] || continue
                n=$(basename "$p"); n=${n%%.ko*}; n=${n//-/_}
                case "$seen" in *" $n "*) continue ;; esac
                seen+="$n "; out_names+=("$n")
                echo "$n $p"
            done <<< "$deps"
        done
    }
    local guest node opt missing=()
    guest=$(resolve_order "${GUEST_MODULES[@]}")
    node=$(resolve_order "${NODE_MODULES[@]}")
    opt=$(resolve_order "${NODE_MODULES[@]}" "${OPTIONAL_MODULES[@]}")
    while read -r line; do case "$line" in '!'*) missing+=("${line#!}") ;; esac; done <<< "$guest"$'\n'"$node"
    [ ${#missing[@]} -eq 0 ] || die "modules not found in $kver: ${missing[*]}"
    if grep -q '^!' <<< "$opt"; then
        log "   optional modules absent: $(grep '^!' <<< "$opt" | tr -d '!' | tr '\n' ' ')"
        opt=$(grep -v '^!' <<< "$opt")
    fi
    node=$opt
    grep -v '^!' <<< "$guest" | cut -d' ' -f1 > "$tmp/modules-guest.order"
    cut -d' ' -f1 <<< "$node" > "$tmp/modules-node.order"
    # Copy the union, decompressed, into debian-modules/lib/modules/<kver>/ (same relative paths).
    local dst="$tmp/debian-modules/lib/modules/$kver" src="$root/lib/modules/$kver" rel n=0
    mkdir -p "$dst"
    while read -r name p; do
        [ -n "$name" ] || continue
        rel=${p#"$src"/}
        [ -f "$dst/${rel%.xz}" ] || [ -f "$dst/${rel%.zst}" ] || [ -f "$dst/${rel%.gz}" ] || {
            mkdir -p "$dst/$(dirname "$rel")"
            case "$p" in
            *.ko.xz) xz -dc "$p" > "$dst/${rel%.xz}" ;;
            *.ko.zst) zstd -qdc "$p" > "$dst/${rel%.zst}" ;;
            *.ko.gz) gzip -dc "$p" > "$dst/${rel%.gz}" ;;
            *.ko) cp "$p" "$dst/$rel" ;;
            *) die "unexpected module file $p" ;;
            esac
            n=$((n + 1))
        }
    done <<< "$(printf '%s\n%s\n' "$(grep -v '^!' <<< "$guest")" "$node")"
    for m in modules.order modules.builtin modules.builtin.modinfo; do
        [ ! -f "$src/$m" ] || cp "$src/$m" "$dst/"
    done
    depmod -b "$tmp/debian-modules" "$kver"
    # Every module in the orders must resolve through the new modules.dep, with .ko (not .ko.xz) paths.
    for m in $(cat "$tmp/modules-guest.order" "$tmp/modules-node.order"); do
        modprobe -d "$tmp/debian-modules" -S "$kver" --show-depends "$m" >/dev/null ||
            die "$m does not resolve in debian-modules"
    done
    ! grep -q '\.ko\.' "$dst/modules.dep" || die "compressed module paths left in modules.dep"
    log "   $kver: $n modules decompressed; guest order: $(tr '\n' ' ' < "$tmp/modules-guest.order")"
    log "   node order: $(tr '\n' ' ' < "$tmp/modules-node.order")"
    rm -rf "$root"
    step_end

    touch "$tmp/.complete"
    rm -rf "$out"; mv "$tmp" "$out"
}

# ---------------------------------------------------------------------------------------------
# Minimal kernel from linux-source-6.12 + guest/kernel/accordion.config.
verify_config() {
    local cfg=$1 bad=0 key want got line
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            key=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            key=${BASH_REMATCH[1]} want=n
        else
            continue
        fi
        got=$(grep -m1 "^$key=" "$cfg" | cut -d= -f2- || true)
        [ -n "$got" ] || got=n
        if [ "$want" != "$got" ]; then
            log "   config: $key wanted $want, got $got"
            bad=$((bad + 1))
        fi
    done < "$FRAG"
    [ "$bad" -eq 0 ] || die "$bad option(s) of $(basename "$FRAG") did not survive olddefconfig (unmet dependencies or select); fix the fragment"
}

# make with a one-line-per-N-steps progress report instead of thousands of lines.
make_progress() {
    local logf=$1 estimate=$2; shift 2
    set +e
    # One line every 100 steps or 30 s, whichever comes first.
    "$@" 2>&1 | tee "$logf" | awk -v est="$estimate" -v t0="$(date +%s)" '
        /^  [A-Z0-9_]+ +[^ ]/ {
            n++; now = systime()
            if (n % 100 == 0 || now - last >= 30) {
                last = now
                pct = (est > 0) ? sprintf(" (~%d%%)", (n * 100 / est > 99 ? 99 : n * 100 / est)) : ""
                printf "kernels:    %5d steps%s, %ds, at %s\n", n, pct, now - t0, $2 > "/dev/stderr"
                fflush("/dev/stderr")
            }
            next
        }
        BEGIN { last = systime() }
        /warning:|error:|Error |\*\*\*/ { print "kernels:    " $0 > "/dev/stderr"; fflush("/dev/stderr") }
        END { print n > "/dev/stdout" }' > "$logf.steps"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

build_minimal() {
    local out=$1 tmp="$1.tmp.$$" tf deb srcdir builddir mk
    TMPS+=("$tmp"); rm -rf "$tmp"; mkdir -p "$tmp"
    tf="$tmp/timings.txt"

    srcdir="$KC/src/linux-source-$SRC_VER"
    if [ ! -f "$srcdir/.extracted" ]; then
        step_begin minimal.download "$tf"
        deb=$(download_deb "$SRC_PKG" "${SRC_PKG}_${SRC_VER}_all.deb")
        log "   $(basename "$deb") ($(du -m "$deb" | cut -f1) MB)"
        step_end

        step_begin minimal.extract "$tf"
        TMPS+=("$srcdir.tmp"); rm -rf "$srcdir" "$srcdir.tmp"; mkdir -p "$srcdir.tmp"
        dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$SRC_PKG.tar.xz" |
            tar -xJ -C "$srcdir.tmp" --checkpoint=20000 --checkpoint-action='echo=kernels:    extracted %T' 2>&1 |
            sed 's/^tar: //' >&2
        [ -f "$srcdir.tmp/$SRC_PKG/Makefile" ] || die "unexpected layout of $SRC_PKG.tar.xz"
        mv "$srcdir.tmp/$SRC_PKG" "$srcdir"
        rmdir "$srcdir.tmp"
        touch "$srcdir/.extracted"
        # Other versions' trees and build dirs are dead weight (1.5+ GB each).
        find "$KC/src" "$KC/build" -mindepth 1 -maxdepth 1 -type d ! -name "*$SRC_VER*" -exec rm -rf {} + 2>/dev/null || true
        step_end
        cp "$tf" "$srcdir/.timings"
    else
        log "   source tree cached: $srcdir"
        { echo "# source tree from the cache; these are the times of its download and extraction"
          cat "$srcdir/.timings" 2>/dev/null || true; } >> "$tf"
    fi

    builddir="$KC/build/linux-$SRC_VER"
    mkdir -p "$builddir"
    mk=(make -C "$srcdir" O="$builddir" ARCH=arm64 CROSS_COMPILE="$CROSS" -j"$JOBS")

    step_begin minimal.config "$tf"
    "${mk[@]}" -s allnoconfig
    (cd "$srcdir" && scripts/kconfig/merge_config.sh -m -O "$builddir" "$builddir/.config" "$FRAG") > "$builddir/merge.log" 2>&1 ||
        { tail -n 20 "$builddir/merge.log" >&2; die "merge_config.sh failed"; }
    "${mk[@]}" -s olddefconfig
    verify_config "$builddir/.config"
    log "   all $(grep -cE '^(CONFIG_|# CONFIG_)' "$FRAG") fragment options verified"
    step_end

    step_begin minimal.build "$tf"
    local est=0
    [ ! -f "$KC/build/steps.last" ] || est=$(cat "$KC/build/steps.last")
    log "   make -j$JOBS Image (log: $builddir/build.log)"
    if ! make_progress "$builddir/build.log" "$est" "${mk[@]}" Image; then
        tail -n 30 "$builddir/build.log" >&2
        die "kernel build failed (full log: $builddir/build.log)"
    fi
    local steps; steps=$(cat "$builddir/build.log.steps" 2>/dev/null || echo 0)
    # Remember the step count of a full build for the next progress estimate.
    [ "$steps" -lt 1000 ] || echo "$steps" > "$KC/build/steps.last"
    cp "$builddir/arch/arm64/boot/Image" "$tmp/Image"
    cp "$builddir/.config" "$tmp/accordion.config"
    [ "$(magic "$tmp/Image" 56 4)" = 41524d64 ] || die "built Image has no arm64 magic"
    log "   Image: $(du -m "$tmp/Image" | cut -f1) MB ($(stat -c %s "$tmp/Image") bytes), $steps make steps"
    step_end

    touch "$tmp/.complete"
    rm -rf "$out"; mv "$tmp" "$out"
    # The source tree and objects (~2 GB) only serve a rebuild; CI (KERNELS_PRUNE=1) has no next one.
    if [ "${KERNELS_PRUNE:-0}" = 1 ]; then
        rm -rf "$srcdir" "$builddir"
        log "   pruned the source tree and objects (KERNELS_PRUNE=1)"
    fi
}

# ---------------------------------------------------------------------------------------------
# Boot both kernels under QEMU's DT boot with a static /init; check it runs and sees both CPUs.
smoke() {
    local dir=$1 tmp img logf t0 rc fail=0
    command -v qemu-system-aarch64 >/dev/null || die "--smoke needs qemu-system-aarch64 (apt-get install qemu-system-arm)"
    command -v cpio >/dev/null || die "--smoke needs cpio (apt-get install cpio)"
    tmp=$(mktemp -d); TMPS+=("$tmp"); mkdir -p "$tmp/root" "$tmp/mods/modules"
    "${CROSS}gcc" -static -Os -o "$tmp/root/init" "$REPO/guest/kernel/smoke-init.c"
    (cd "$tmp/root" && echo init | cpio -o -H newc --quiet) > "$tmp/smoke.cpio"
    # The stock kernel also gets its guest + node modules, loaded by /init in the listed order.
    local kver name rel mdir
    kver=$(cat "$dir/debian-kver"); mdir="$dir/debian-modules/lib/modules/$kver"
    for name in $(cat "$dir/modules-guest.order" "$dir/modules-node.order" | awk '!seen[$0]++'); do
        rel=$(awk -F: -v n="$name" '{ b = $1; sub(/.*\//, "", b); sub(/\.ko$/, "", b); gsub(/-/, "_", b)
                                      if (b == n) { print $1; exit } }' "$mdir/modules.dep")
        [ -n "$rel" ] || die "$name not in $mdir/modules.dep"
        cp "$mdir/$rel" "$tmp/mods/modules/$name.ko"
        echo "$name" >> "$tmp/mods/modules/order"
    done
    # Concatenated cpio: the uncompressed second segment must start 4-byte aligned (pad to 512).
    cp "$tmp/smoke.cpio" "$tmp/smoke-debian.cpio"
    truncate -s %512 "$tmp/smoke-debian.cpio"
    (cd "$tmp/mods" && find modules | cpio -o -H newc --quiet) >> "$tmp/smoke-debian.cpio"
    # QEMU's DT boot for both; plus, when edk2 (qemu-efi-aarch64) is installed, the minimal kernel through
    # UEFI + ACPI (SPCR console, ACPI0007 CPUs, GED, LNRO0005 virtio-mmio) - the path our VMM uses.
    local runs=(Image:dt Image-debian:dt) fw=/usr/share/AAVMF/AAVMF_CODE.fd run mode extra
    [ ! -f "$fw" ] || runs+=(Image:acpi)
    for run in "${runs[@]}"; do
        img=${run%%:*} mode=${run#*:} extra=()
        if [ "$mode" = acpi ]; then
            cp /usr/share/AAVMF/AAVMF_VARS.fd "$tmp/vars.fd"
            extra=(-drive "if=pflash,format=raw,readonly=on,file=$fw" -drive "if=pflash,format=raw,file=$tmp/vars.fd"
                   -device virtio-rng-device)
        fi
        logf="$KC/smoke-$img-$mode.log"
        log ">> smoke $img ($mode boot, log: $logf)"
        t0=$EPOCHREALTIME rc=0
        timeout -k 5 120 qemu-system-aarch64 -M virt,gic-version=3 -cpu max -smp 2 -m 512M -nographic -no-reboot \
            -nic none "${extra[@]}" -kernel "$dir/$img" -initrd "$tmp/smoke${img#Image}.cpio" \
            -append "console=ttyAMA0 panic=-1$([ "$mode" != acpi ] || echo " acpi=force")" </dev/null > "$logf" 2>&1 || rc=$?
        grep -a '^SMOKE:' "$logf" | sed 's/^/kernels:    /' >&2 || true
        local to_init; to_init=$(grep -a -m1 'Run /init' "$logf" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p')
        if [ "$rc" = 0 ] && grep -aq '^SMOKE: done' "$logf" && grep -aq '^SMOKE: nprocs_onln=2' "$logf" &&
                grep -aq '^SMOKE: vsock_socket=ok' "$logf" && ! grep -aq '^SMOKE: insmod .* FAILED' "$logf" &&
                { [ "$mode" != acpi ] || { grep -aq '^SMOKE: acpi_ged_bound=1' "$logf" &&
                                           grep -aq '^SMOKE: virtio_mmio_bound=1' "$logf"; }; }; then
            log "<< smoke $img ($mode): ok, /init at ${to_init:-?}s guest uptime, $(elapsed "$t0")s wall"
        else
            [ "$rc" != 124 ] || log "   timed out after 120 s"
            tail -n 15 "$logf" | sed 's/^/kernels:    | /' >&2
            log "<< smoke $img ($mode): FAILED (qemu exit $rc)"
            fail=1
        fi
    done
    rm -rf "$tmp"
    [ "$fail" = 0 ] || die "smoke test failed"
}

# ---------------------------------------------------------------------------------------------
main() {
    check_tools
    [ -f "$FRAG" ] || die "missing $FRAG"
    mkdir -p "$KC"
    exec 9> "$KC/.lock"
    if ! flock -n 9; then
        log "another kernels.sh holds $KC/.lock, waiting..."
        flock 9
    fi

    resolve_versions
    local frag_sha min_key deb_key out_key out
    frag_sha=$(sha256sum "$FRAG" | cut -c1-16)
    min_key="${SRC_VER}_${frag_sha}_r${RECIPE}"
    deb_key="${IMG_PKG#linux-image-}_${META_VER}_r${DEB_RECIPE}"
    out_key="m-${min_key}+d-${deb_key}"
    out="$KC/out/$out_key"

    if [ "$FORCE" = 0 ] && [ -f "$out/.complete" ]; then
        log "cache hit: $SRC_PKG $SRC_VER + fragment $frag_sha (recipe $RECIPE), $IMG_PKG $META_VER"
    else
        local mdir="$KC/minimal/$min_key" ddir="$KC/debian/$deb_key"
        if [ "$FORCE" = 1 ] || [ ! -f "$ddir/.complete" ]; then
            build_debian "$ddir"
        else
            log "stock kernel cached: $ddir"
        fi
        if [ "$FORCE" = 1 ] || [ ! -f "$mdir/.complete" ]; then
            build_minimal "$mdir"
        else
            log "minimal kernel cached: $mdir"
        fi

        local tmp="$out.tmp.$$" f
        TMPS+=("$tmp"); rm -rf "$tmp"; mkdir -p "$tmp"
        # Hard links: the out dir costs no space beyond the two part dirs.
        for f in Image accordion.config; do cp -l "$mdir/$f" "$tmp/$f"; done
        for f in Image-debian debian-kver modules-guest.order modules-node.order; do cp -l "$ddir/$f" "$tmp/$f"; done
        cp -al "$ddir/debian-modules" "$tmp/debian-modules"
        {
            sed 's/^/# /' <<< "minimal $min_key"$'\n'"debian $deb_key"
            cat "$ddir/timings.txt" "$mdir/timings.txt"
        } > "$tmp/timings.txt"
        touch "$tmp/.complete"
        rm -rf "$out"; mkdir -p "$KC/out"; mv "$tmp" "$out"
        log "built $out_key"
    fi

    if [ "$(readlink "$KC/current" 2>/dev/null || true)" != "$out" ]; then
        ln -sfn "$out" "$KC/current.tmp.$$"
        mv -T "$KC/current.tmp.$$" "$KC/current"
    fi
    log "done in $(elapsed "$START")s"
    [ "$SMOKE" = 0 ] || smoke "$out"
    echo "kernels: $out"
}

main
