#!/usr/bin/env bash
# Installs the host packages Accordion's build and tests need. Idempotent: a no-op (well under a
# second) when everything is present; otherwise one `apt-get update` + `install`.
# Never edits the system's apt sources: trixie/sid packages go through scripts/debian-apt.sh.
set -euo pipefail

arch=$(uname -m)
pkgs=(
    # Debian's rustc-web 1.96 ships an aarch64 std; rustup cannot fetch targets here.
    rustc-web cargo-web libstd-rust-web-dev rust-web-clippy rustfmt-web
    # initramfs packing, kernel/module handling, ACPI table checks
    cpio xz-utils zstd kmod file acpica-tools
    # building the minimal guest kernel from Debian's linux-source
    bc bison flex libssl-dev libelf-dev make
)
if [ "$arch" = x86_64 ]; then
    pkgs+=(
        libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu
        # qemu-user runs aarch64 unit tests; qemu-system-arm boots the emulated ARM64 node
        qemu-user-static qemu-system-arm
        # libseccomp.a for the agent's static link (libcontainer's seccomp support)
        libseccomp-dev:arm64
    )
elif [ "$arch" = aarch64 ]; then
    pkgs+=(gcc libc6-dev libseccomp-dev)
else
    echo "setup: unsupported host architecture $arch (need x86_64 or aarch64)" >&2
    exit 1
fi

if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

need_arm64_arch=0
if [ "$arch" = x86_64 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
    need_arm64_arch=1
fi

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed; then
        missing+=("$p")
    fi
done

if [ "$need_arm64_arch" = 0 ] && [ ${#missing[@]} = 0 ]; then
    echo "setup: all ${#pkgs[@]} host packages present"
    exit 0
fi

start=$(date +%s)
if [ "$need_arm64_arch" = 1 ]; then
    echo "setup: adding the arm64 architecture to dpkg (for libstd-rust-web-dev:arm64)"
    $SUDO dpkg --add-architecture arm64
fi
echo "setup: installing ${#missing[@]} packages: ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" \
    | grep --line-buffered -E '^(Get|Setting up|Unpacking)' | sed -u 's/^/  /' || true
for p in "${missing[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed; then
        echo "setup: failed to install $p" >&2
        exit 1
    fi
done
echo "setup: done in $(( $(date +%s) - start ))s"
