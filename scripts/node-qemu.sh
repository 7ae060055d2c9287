#!/usr/bin/env bash
# The peer VMM for benchmarks in the node: Debian trixie's arm64 qemu-system-aarch64 (package qemu-system-arm),
# cut down to what `-M virt -cpu host -accel kvm -kernel .. -initrd .. -nographic -nic none` needs, laid out
# as a root to pack at / of the node's initramfs.
#
#   scripts/node-qemu.sh [--force]
#     --force  rebuild even when cached (the .debs are downloaded again through the apt cache)
#
# Output contract: the last stdout line is `node-qemu: <dir>`; progress goes to stderr. <dir> holds
#   root/                                  pack this at / of the node: only regular files, no symlinks:
#     usr/bin/qemu-system-aarch64
#     lib/ld-linux-aarch64.so.1            (the ELF interpreter, materialised: trixie ships it as a symlink)
#     usr/lib/aarch64-linux-gnu/<soname>   the transitive DT_NEEDED closure, each under its soname only
#   version      `qemu-system-aarch64 --version` first line (checked on the host under qemu-aarch64-static
#                when that is installed)
#   MANIFEST     path and size of every file under root/
#   package      the Debian package version it came from
#   recipe       this script's RECIPE (a mismatch triggers a rebuild)
# $CACHE/node-qemu/current -> <dir>. <dir> is $CACHE/node-qemu/<version> with ':' (the epoch) spelled '_',
# because `cargo xtask node --add HOST:NODE` splits at the first ':'.
#
# Nothing from usr/share/qemu is kept: with -nic none and -kernel no ROM or firmware is loaded (verified in the
# node with KVM). A NIC (virtio-net-pci wants efi-virtio.rom) or -bios would need those files.
#
# The package version is looked up at most once a day (when debian-apt.sh refreshes its index);
# ACCORDION_OFFLINE=1 reuses the last lookup without touching apt.
set -euo pipefail

NAME=node-qemu
RECIPE=1     # bump when the selection or layout of the files changes
PKG=qemu-system-arm
BIN=usr/bin/qemu-system-aarch64
VERSION_RE='^QEMU emulator version'
VERSION_LABEL='QEMU emulator version'

# shellcheck source=scripts/debian-binary-tree.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-binary-tree.sh" "$@"
