#!/usr/bin/env bash
# scripts/fuzz.sh run|smoke: the cargo-fuzz (libFuzzer) targets of every fuzz crate.
#
#   run    fuzzes each target for FUZZ_SECONDS (default 60), starting from its committed corpus;
#          what the fuzzer finds goes to target/fuzz/corpus/<crate>/<target> (scratch, kept between
#          runs), never into the committed corpus. `make fuzz`.
#   smoke  replays every committed input of each target (<crate>/corpus/<target> and
#          <crate>/regressions/<target>), then fuzzes it for FUZZ_SMOKE_SECONDS (default 5) from a
#          fresh scratch corpus; fails on any crash. `make fuzz-smoke`, part of `make test`.
#
# FUZZ_CLEAN_BUILD=1 removes the fuzz build tree once the targets ran (.ci/run sets it: disk is
# finite there, and nothing later reuses the instrumented build).
# FUZZ_DIRS lists the fuzz crates (default "vmm-core/fuzz runtime/fuzz"; missing ones are skipped).
# A crash leaves its input in target/fuzz/artifacts/<crate>/<target>/: fix the bug, then add the
# input to <crate>/regressions/<target>/ and a unit test that replays it.
#
# Built for the host with rustup's stable toolchain and RUSTC_BOOTSTRAP=1 (libFuzzer's coverage
# instrumentation needs -Z flags), in release mode with debug assertions and overflow checks, and
# without a sanitizer: the targets drive safe Rust whose few unsafe blocks are syscalls, so
# AddressSanitizer finds little here, while it makes a cold build a third longer and every
# execution three to five times slower. FUZZ_SANITIZER=address turns it on.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

mode=${1:-}
case "$mode" in
run) seconds=${FUZZ_SECONDS:-60} ;;
smoke) seconds=${FUZZ_SMOKE_SECONDS:-5} ;;
*)
    echo "usage: $0 run|smoke" >&2
    exit 2
    ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scratch=$root/target/fuzz
sanitizer=${FUZZ_SANITIZER:-none}

# The Makefile's aarch64 settings are not for this host build.
unset RUSTC RUSTFLAGS CARGO_BUILD_TARGET
export RUSTC_BOOTSTRAP=1
if command -v rustup >/dev/null; then
    export RUSTUP_TOOLCHAIN=stable
fi
if [ -z "${RUSTC_WRAPPER+set}" ] && [ -x "$HOME/.cargo/bin/sccache" ]; then
    export RUSTC_WRAPPER=$HOME/.cargo/bin/sccache
fi
export PATH=${CARGO_HOME:-$HOME/.cargo}/bin:$PATH

have=$(cargo fuzz --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$CARGO_FUZZ_VERSION" ]; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (found: ${have:-none})"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# One build directory for every fuzz crate: what they share (vmm-core and its dependencies)
# compiles once.
build=$scratch/build
failed=()
ran=0
for dir in ${FUZZ_DIRS:-vmm-core/fuzz runtime/fuzz}; do
    if [ ! -f "$dir/Cargo.toml" ]; then
        echo "fuzz: $dir: no fuzz crate, skipped"
        continue
    fi
    crate=${dir//\//-}
    start=$(date +%s)
    echo "fuzz: $dir: building (sanitizer $sanitizer)"
    cargo fuzz build --fuzz-dir "$dir" -s "$sanitizer" --target-dir "$build"
    echo "fuzz: $dir: built in $(($(date +%s) - start))s"
    for target in $(cargo fuzz list --fuzz-dir "$dir"); do
        corpus=()
        for committed in "$dir/corpus/$target" "$dir/regressions/$target"; do
            if [ -d "$committed" ]; then
                corpus+=("$committed")
            fi
        done
        if [ "$mode" = run ]; then
            work=$scratch/corpus/$crate/$target
        else
            work=$scratch/smoke/$crate/$target
            rm -rf "$work"
        fi
        artifacts=$scratch/artifacts/$crate/$target
        mkdir -p "$work" "$artifacts"
        log=$scratch/$crate-$target.log
        inputs=0
        for committed in "${corpus[@]}"; do
            inputs=$((inputs + $(find "$committed" -type f | wc -l)))
        done
        echo "fuzz: $target: replaying $inputs committed inputs, then fuzzing for ${seconds}s"
        # The first corpus dir is where libFuzzer writes: the scratch one. The committed ones are
        # read (every input run once) before fuzzing starts.
        if cargo fuzz run --fuzz-dir "$dir" -s "$sanitizer" --target-dir "$build" "$target" "$work" "${corpus[@]}" -- \
            -max_total_time="$seconds" -timeout=10 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
            grep -E '^Done|DONE' "$log" | tail -1 | sed "s/^/fuzz: $target: /"
        else
            echo "fuzz: $target: FAILED; the input is in $artifacts/, the log in $log:" >&2
            tail -40 "$log" >&2
            failed+=("$dir:$target")
        fi
        ran=$((ran + 1))
    done
done

if [ "${FUZZ_CLEAN_BUILD:-0}" = 1 ]; then
    echo "fuzz: removing the build tree ($(du -sh "$build" 2>/dev/null | cut -f1))"
    rm -rf "$build"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${#failed[@]} of $ran targets failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: $ran targets passed ($mode)"
