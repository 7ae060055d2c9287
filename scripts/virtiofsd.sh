#!/usr/bin/env bash
# The vhost-user virtio-fs back end for the node: Debian trixie's arm64 virtiofsd (package virtiofsd, a Rust
# binary needing libc, libgcc_s, libcap-ng and libseccomp), laid out as a self-contained root to pack at / of
# the node's initramfs, so vmm-core's virtio-fs device can be tested against the real daemon.
#
#   scripts/virtiofsd.sh [--force]
#     --force  rebuild even when cached (the .debs are downloaded again through the apt cache)
#
# Output contract: the last stdout line is `virtiofsd: <dir>`; progress goes to stderr. <dir> holds
#   root/                                  pack this at / of the node: only regular files, no symlinks:
#     usr/libexec/virtiofsd
#     lib/ld-linux-aarch64.so.1            (the ELF interpreter, materialised: trixie ships it as a symlink)
#     usr/lib/aarch64-linux-gnu/<soname>   the transitive DT_NEEDED closure, each under its soname only
#   version      `virtiofsd --version` first line (checked on the host under qemu-aarch64-static when that
#                is installed)
#   MANIFEST     path and size of every file under root/
#   package      the Debian package version it came from
#   recipe       this script's RECIPE (a mismatch triggers a rebuild)
# $CACHE/virtiofsd/current -> <dir>. <dir> is $CACHE/virtiofsd/<version> with ':' (an epoch) spelled '_',
# because `cargo xtask node --add HOST:NODE` splits at the first ':'.
#
# The package version is looked up at most once a day (when debian-apt.sh refreshes its index);
# ACCORDION_OFFLINE=1 reuses the last lookup without touching apt.
set -euo pipefail

NAME=virtiofsd
RECIPE=1     # bump when the selection or layout of the files changes
PKG=virtiofsd
BIN=usr/libexec/virtiofsd
VERSION_RE='virtiofsd'
VERSION_LABEL='virtiofsd'

# shellcheck source=scripts/debian-binary-tree.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-binary-tree.sh" "$@"
