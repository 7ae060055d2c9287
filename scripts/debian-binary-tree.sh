#!/usr/bin/env bash
# One binary from a Debian trixie arm64 package plus its shared-library closure, laid out as a root to
# pack at / of the node's initramfs. Not run directly: scripts/node-qemu.sh and scripts/virtiofsd.sh
# set NAME (cache dir and log prefix), PKG, BIN (path in the package), VERSION_RE (what `BIN --version`
# must print), VERSION_LABEL and RECIPE, then source this file; their headers document the contract.
set -euo pipefail

SUITE=trixie
# Where ld.so looks without an ld.so.cache (Debian's multiarch system dirs), in the staging root and in the node.
LIBDIRS=(usr/lib/aarch64-linux-gnu lib/aarch64-linux-gnu usr/lib lib)
READELF=${CROSS_COMPILE:-aarch64-linux-gnu-}readelf

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_SH="$REPO/scripts/debian-apt.sh"
CACHE="${ACCORDION_CACHE:-$HOME/.cache/accordion}"
NQ="$CACHE/$NAME"
FORCE=0

while [ $# -gt 0 ]; do
    case "$1" in
    --force) FORCE=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "$NAME: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

START=$EPOCHREALTIME
TMPS=()
trap 'rm -rf "${TMPS[@]}"' EXIT
log() { echo "$NAME: $*" >&2; }
die() { echo "$NAME: ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

check_tools() {
    local missing=() pkgs=() t p
    for t in "$READELF:binutils-aarch64-linux-gnu" "dpkg-deb:dpkg" "apt-get:apt" "flock:util-linux" \
             "du:coreutils" "awk:mawk"; do
        if ! command -v "${t%%:*}" >/dev/null 2>&1; then
            missing+=("${t%%:*}"); pkgs+=("${t#*:}")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        p=$(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')
        die "missing host tools: ${missing[*]} -- install with: apt-get install ${p% }"
    fi
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] ||
        die "missing /usr/share/keyrings/debian-archive-keyring.gpg -- install with: apt-get install debian-archive-keyring"
}

# ---------------------------------------------------------------------------------------------
# Version of $PKG in trixie (cached like scripts/kernels.sh does).
resolve_version() {
    local f="$NQ/resolved" stamp="$CACHE/apt/$SUITE/updated" v
    if [ -f "$f" ] && [ "$FORCE" = 0 ]; then
        if [ "${ACCORDION_OFFLINE:-0}" = 1 ] || { [ -f "$stamp" ] && [ "$f" -nt "$stamp" ] &&
                [ -z "$(find "$stamp" -mmin +1440)" ]; }; then
            VER=$(cat "$f"); [ -n "$VER" ] && return
        fi
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing host tool apt-get -- install with: apt-get install apt"
    local t0=$EPOCHREALTIME
    if v=$("$APT_SH" version "$SUITE" "$PKG") && [ -n "$v" ] && [ "$v" != "(none)" ]; then
        mkdir -p "$NQ"
        echo "$v" > "$f.tmp" && mv "$f.tmp" "$f"
        VER=$v
        log "resolved $PKG $VER in $SUITE ($(elapsed "$t0")s)"
    elif [ -f "$f" ]; then
        VER=$(cat "$f")
        log "warning: package lookup failed, reusing the previous one ($VER)"
    else
        die "cannot resolve $PKG in Debian $SUITE (see scripts/debian-apt.sh)"
    fi
}

# ---------------------------------------------------------------------------------------------
# select_debs DEBDIR ROOTPKG: the .debs (arm64/all) of ROOTPKG's Pre-Depends/Depends closure, one path a line.
# debian-apt.sh's `closure` copies every .deb of its shared archive cache, so DEBDIR may hold unrelated
# packages or older versions; follow the dependency fields of the .debs themselves instead of trusting it.
select_debs() {
    local dir=$1 d p v a deps prov old alt name g
    local -A DEB VERS DEPS PROV SEL
    for d in "$dir"/*.deb; do
        IFS=$'\t' read -r p v a deps prov < <(dpkg-deb --showformat='${Package}\t${Version}\t${Architecture}\t${Pre-Depends}, ${Depends}\t${Provides}\n' -W "$d")
        case "$a" in arm64|all) ;; *) continue ;; esac
        if [ -n "${VERS[$p]:-}" ]; then
            old=${VERS[$p]}
            dpkg --compare-versions "$v" gt "$old" || continue
        fi
        DEB[$p]=$d VERS[$p]=$v DEPS[$p]=$deps
        local -a provs
        IFS=',' read -ra provs <<< "$prov"
        for g in "${provs[@]}"; do read -r name _ <<< "$g"; [ -n "$name" ] && PROV[$name]=$p; done
    done
    [ -n "${DEB[$2]:-}" ] || die "$2 is not among the downloaded .debs in $dir"
    local -a want=("$2") groups alts
    while [ ${#want[@]} -gt 0 ]; do
        p=${want[-1]}; unset 'want[-1]'
        [ -n "${SEL[$p]:-}" ] && continue
        SEL[$p]=1
        IFS=',' read -ra groups <<< "${DEPS[$p]}"
        for g in "${groups[@]}"; do
            [ -n "${g// /}" ] || continue
            IFS='|' read -ra alts <<< "$g"
            local found=
            for alt in "${alts[@]}"; do
                read -r name _ <<< "$alt"; name=${name%%:*}
                if [ -n "${DEB[$name]:-}" ]; then found=$name; break; fi
                if [ -n "${PROV[$name]:-}" ]; then found=${PROV[$name]}; break; fi
            done
            if [ -n "$found" ]; then want+=("$found"); else log "warning: $p: dependency '${g# }' not downloaded"; fi
        done
    done
    for p in "${!SEL[@]}"; do echo "${DEB[$p]}"; done | sort
}

# in_root ROOT PATH: PATH (absolute, as the target system sees it) resolved inside ROOT, symlinks followed
# inside ROOT (absolute targets re-rooted). Prints ROOT-relative path of the final file; fails if missing.
in_root() {
    local root=$1 p=${2#/} n=0 t
    while [ -L "$root/$p" ]; do
        n=$((n + 1)); [ $n -le 40 ] || return 1
        t=$(readlink "$root/$p")
        case "$t" in
        /*) p=${t#/} ;;
        *) p=$(dirname "$p")/$t ;;
        esac
        p=$(realpath -m -s --relative-to=/ "/$p")   # normalise a/../b without touching the host fs
    done
    [ -f "$root/$p" ] || return 1
    echo "$p"
}

# elf_dyn FILE: "NEEDED name" and "RUNPATH dir:dir" lines.
elf_dyn() {
    "$READELF" -dW "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/NEEDED \1/p; s/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]$/RUNPATH \2/p'
}

# closure STAGE OUTROOT: copy BIN, its interpreter and its transitive DT_NEEDED closure from STAGE to OUTROOT.
closure() {
    local stage=$1 out=$2 interp f rel kind val name dir found r
    local -A LIB=()
    interp=$("$READELF" -lW "$stage/$BIN" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
    [ -n "$interp" ] || die "$BIN: no PT_INTERP"
    # Merged /usr: trixie's libc6 ships /usr/lib/ld-linux-aarch64.so.1 (a symlink); /lib -> usr/lib comes
    # from base-files, which is not in the closure. The node's /lib is a real directory (kernel modules), so
    # the interpreter is materialised at its PT_INTERP path.
    rel=$(in_root "$stage" "$interp" || in_root "$stage" "/usr$interp") || die "interpreter $interp not found in the .debs"
    install -D -m 0755 "$stage/$rel" "$out$interp"
    LIB[$(basename "$interp")]=$interp
    install -D -m 0755 "$stage/$BIN" "$out/$BIN"
    local -a queue=("$BIN") dirs
    while [ ${#queue[@]} -gt 0 ]; do
        f=${queue[-1]}; unset 'queue[-1]'
        local -a needed=() runpath=()
        while read -r kind val; do
            case "$kind" in
            NEEDED) needed+=("$val") ;;
            RUNPATH) IFS=':' read -ra dirs <<< "${val//\$ORIGIN//$(dirname "$f")}"; runpath+=("${dirs[@]}") ;;
            esac
        done < <(elf_dyn "$out/$f")
        for name in "${needed[@]}"; do
            [ -z "${LIB[$name]:-}" ] || continue
            found=
            for dir in "${runpath[@]}" "${LIBDIRS[@]}"; do
                dir=${dir#/}
                if r=$(in_root "$stage" "/$dir/$name"); then found=$dir; break; fi
            done
            [ -n "$found" ] || die "$name (needed by /$f) not found in the .debs"
            install -D -m 0644 "$stage/$r" "$out/$found/$name"
            LIB[$name]=/$found/$name
            queue+=("$found/$name")
        done
    done
    log "   ${#LIB[@]} shared objects (with the interpreter)"
}

build() {
    local out=$1 tmp="$1.tmp.$$" t0 debs n
    TMPS+=("$tmp"); rm -rf "$tmp"; mkdir -p "$tmp/debs" "$tmp/stage"

    t0=$EPOCHREALTIME; log ">> download $PKG:arm64 $VER and its arm64 closure ($SUITE)"
    "$APT_SH" closure "$SUITE" "$tmp/debs" "$PKG:arm64" >&2 || die "apt closure of $PKG:arm64 failed"
    mapfile -t debs < <(select_debs "$tmp/debs" "$PKG")
    local got; got=$(dpkg-deb -f "$(printf '%s\n' "${debs[@]}" | grep "/${PKG}_" | head -n1)" Version)
    [ "$got" = "$VER" ] || log "warning: downloaded $PKG $got, index said $VER"
    log "<< ${#debs[@]} .debs, $(du -cm "${debs[@]}" | tail -n1 | cut -f1) MB ($(elapsed "$t0")s)"

    t0=$EPOCHREALTIME; log ">> extract"
    for d in "${debs[@]}"; do dpkg-deb -x "$d" "$tmp/stage"; done
    [ -f "$tmp/stage/$BIN" ] || die "$PKG:arm64 has no /$BIN"
    log "<< extracted ($(elapsed "$t0")s)"

    t0=$EPOCHREALTIME; log ">> ELF closure of /$BIN"
    closure "$tmp/stage" "$tmp/root"
    log "<< closure ($(elapsed "$t0")s)"

    # Everything packed must resolve inside root alone (ld.so's default dirs, no ld.so.cache).
    local f name ok
    while IFS= read -r f; do
        while read -r kind name; do
            [ "$kind" = NEEDED ] || continue
            ok=
            for dir in "${LIBDIRS[@]}" "$(dirname "${f#"$tmp/root/"}")"; do
                [ -f "$tmp/root/$dir/$name" ] && ok=1 && break
            done
            [ -n "$ok" ] || die "self-check: $name (needed by ${f#"$tmp/root"}) missing from root"
        done < <(elf_dyn "$f")
    done < <(find "$tmp/root" -type f)
    [ -z "$(find "$tmp/root" ! -type f ! -type d)" ] || die "self-check: root holds something other than files and dirs"

    # Smoke test on the host (user-mode emulation, no KVM needed for --version).
    if command -v qemu-aarch64-static >/dev/null 2>&1; then
        # -L falls back to host paths for whatever root lacks: a host libc6:arm64 (bookworm's 2.36, there when
        # the arm64 architecture is enabled) and /etc/ld.so.cache would be picked up before root's own
        # libraries. LD_LIBRARY_PATH is searched first, so root's libraries win, as they will in the node.
        local vout
        vout=$(qemu-aarch64-static -L "$tmp/root" -E LD_LIBRARY_PATH=/usr/lib/aarch64-linux-gnu \
            "$tmp/root/$BIN" --version 2>&1) || die "$BIN --version failed under qemu-aarch64-static: $vout"
        echo "${vout%%$'\n'*}" > "$tmp/version"
        grep -qE "$VERSION_RE" "$tmp/version" || die "$BIN --version printed: $(cat "$tmp/version")"
        log "   host check: $(cat "$tmp/version")"
    else
        log "warning: qemu-aarch64-static not installed (apt-get install qemu-user-static): skipping the host --version check"
        echo "$VERSION_LABEL (unchecked) $VER" > "$tmp/version"
    fi

    (cd "$tmp/root" && find . -type f -printf '%P %s\n' | sort) > "$tmp/MANIFEST"
    echo "$VER" > "$tmp/package"
    rm -rf "$tmp/debs" "$tmp/stage"
    echo "$RECIPE" > "$tmp/recipe"
    n=$(wc -l < "$tmp/MANIFEST")
    log "   root: $n files, $(du -sm "$tmp/root" | cut -f1) MB ($(du -sb "$tmp/root" | cut -f1) bytes)"
    rm -rf "$out"
    mv "$tmp" "$out"
}

# ---------------------------------------------------------------------------------------------
resolve_version
out="$NQ/${VER//:/_}"
complete() { [ -f "$out/recipe" ] && [ "$(cat "$out/recipe")" = "$RECIPE" ] && [ -x "$out/root/$BIN" ]; }
if [ "$FORCE" = 1 ] || ! complete; then
    check_tools
    mkdir -p "$NQ"
    exec 9> "$NQ/.lock"
    flock 9
    if [ "$FORCE" = 1 ] || ! complete; then   # another run may have built it while we waited
        log "building $PKG $VER -> $out"
        build "$out"
        log "built in $(elapsed "$START")s"
    fi
    flock -u 9
fi
[ "$(readlink "$NQ/current" 2>/dev/null)" = "$(basename "$out")" ] || ln -sfn "$(basename "$out")" "$NQ/current"
echo "$NAME: $out"

