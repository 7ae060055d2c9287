#!/usr/bin/env bash
# Records which system calls each confined thread kind makes in a node run, for
# vmm-core/seccomp/recorded-aarch64.txt (the expectation of vmm-core's seccomp unit test).
#
# The node tests run with ACCORDION_SECCOMP=record: every call of a confined thread is allowed
# and logged by the kernel (audit type 1326, with the thread's name and the syscall number);
# the node collects them and prints `seccomp: <thread> <number>` lines at the end. This maps the numbers to names (asm-generic, which
# arm64 uses) and prints `<thread kind> <syscall>` lines, sorted and unique.
#
# Usage: scripts/seccomp-record.sh [node-test filter, default: every test] > vmm-core/seccomp/recorded-aarch64.txt
set -euo pipefail
ok=0
cd "$(dirname "$0")/.."
filter="${1:-}"
table=/usr/include/asm-generic/unistd.h
[ -f "$table" ] || { echo "seccomp-record: $table is missing (apt install linux-libc-dev)" >&2; exit 1; }
log=$(mktemp /tmp/seccomp-record.XXXXXX)
trap '[ "$ok" = 1 ] && rm -f "$log"' EXIT
ACCORDION_SECCOMP=record ACCORDION_REQUIRE_KVM=1 \
    cargo xtask node-test --containerd --filter "$filter" --memory 6G --timeout 2400 >"$log" 2>&1 || {
    echo "seccomp-record: the node run failed; its output is kept in $log; the end:" >&2
    tail -50 "$log" >&2
    exit 1
}
sed -n '/^=== seccomp log/,$p' "$log" |
    sed -n 's/^seccomp: //p' |
    awk -v table="$table" '
        BEGIN {
            while ((getline line < table) > 0) {
                if (split(line, f, " ") == 3 && f[1] == "#define" && f[3] ~ /^[0-9]+$/ &&
                    f[2] ~ /^__NR(3264)?_/) {
                    name = f[2]; sub(/^__NR(3264)?_/, "", name); names[f[3]] = name
                }
            }
        }
        {
            # Thread names to kinds: vcpu<N> are vCPUs; the VMM process main thread
            # (accordion-vmm) and its exit reporter run under the control filter.
            kind = $1
            if (kind ~ /^vcpu[0-9]+$/) kind = "vcpu"
            if (kind == "accordion-vmm" || kind == "vmm-exit") kind = "vmm-control"
            print kind, ($2 in names ? names[$2] : "unknown-" $2)
        }' |
    sort -u
ok=1
