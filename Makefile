# Accordion: `make demo` and `make test` do everything from a fresh clone (see README.md).
# Each step installs what it needs, is cached and idempotent, and prints what it does.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
TARGET := aarch64-unknown-linux-gnu
# Cross builds use Debian's rustc-web (rustup's toolchain has no aarch64 std here).
ifeq ($(shell uname -m),aarch64)
  CROSS := env -u RUSTFLAGS cargo
  CROSS_CLIPPY := env -u RUSTFLAGS cargo clippy
else
  CROSS := env -u RUSTFLAGS -u RUSTUP_TOOLCHAIN RUSTC=/usr/bin/rustc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static /usr/bin/cargo
  CROSS_CLIPPY := env -u RUSTFLAGS -u RUSTUP_TOOLCHAIN RUSTC=/usr/bin/rustc /usr/bin/cargo-clippy clippy
endif
STEP := scripts/step.sh

.PHONY: all setup kernels kernel-smoke build fmt-check clippy clippy-x86 clippy-arm64 unit-test adversarial-test fuzz fuzz-smoke node-test harness-test test demo clean

all: build

setup:
	@scripts/setup.sh

kernels: setup
	@$(STEP) 'guest and node kernels (cached)' scripts/kernels.sh

# Both kernels boot to a static /init under plain qemu (DT boot, TCG) and see their CPUs and vsock.
kernel-smoke: kernels
	@$(STEP) 'kernel smoke boots' scripts/kernels.sh --smoke

build: setup
	@$(STEP) 'aarch64 build' $(CROSS) build --workspace --bins --examples --target $(TARGET)

fmt-check: setup
	@$(STEP) 'cargo fmt --check' cargo fmt --all --check
	@$(STEP) 'cargo fmt --check (fuzz crates)' sh -c 'for d in vmm-core/fuzz runtime/fuzz; do cargo fmt --manifest-path $$d/Cargo.toml --all --check || exit 1; done'

clippy-x86: setup
	@$(STEP) 'clippy x86_64 (-D warnings)' cargo clippy --workspace --all-targets -- -D warnings

clippy-arm64: setup
	@$(STEP) 'clippy aarch64 (-D warnings)' $(CROSS_CLIPPY) --workspace --all-targets --target $(TARGET) -- -D warnings

clippy: clippy-x86 clippy-arm64

# Unit tests of every crate for aarch64 (under qemu-user on x86_64), and xtask's natively.
unit-test: setup
	@$(STEP) 'unit tests (aarch64)' $(CROSS) test --workspace --lib --bins --target $(TARGET)

# Guest-facing code against a hostile guest, natively on this host (no VM): the pod's share
# (runtime/share/tests/adversarial.rs: a thread swapping symlinks into the shim's mount paths while
# it mounts, read-only submounts, propagation into a virtiofsd-like sandbox; as root, each case in
# a mount namespace of its own) and vmm-core's devices driven by hostile rings (its unit tests).
adversarial-test: setup
	@$(STEP) 'adversarial tests (native)' cargo test -p accordion-share --test adversarial
	@$(STEP) 'vmm-core devices against hostile rings (native)' cargo test -p accordion-vmm --lib

# The libFuzzer targets of vmm-core/fuzz and runtime/fuzz (scripts/fuzz.sh), on this host:
# `fuzz` runs each for FUZZ_SECONDS (default 60), growing a scratch corpus under target/fuzz;
# `fuzz-smoke` replays every committed corpus and regression input, then fuzzes each a few seconds.
fuzz: setup
	@$(STEP) 'fuzzing (FUZZ_SECONDS per target)' scripts/fuzz.sh run

fuzz-smoke: setup
	@$(STEP) 'fuzz smoke (committed inputs + a few seconds per target)' scripts/fuzz.sh smoke

# Integration tests (each crate's tests/*.rs) run inside one emulated ARM64 node with nested KVM,
# with containerd 1.7 running (the shim's tests drive it with ctr and accordion-cri). 6G: the node's
# root is its initramfs, held in RAM, and the debug test binaries plus containerd's tree and images
# no longer unpack in 3G ("Initramfs unpacking failed: write error"). Then a second node with
# containerd 2.1 runs the tests that go through containerd (NODE_TEST_2_1); the installer's test
# stays on 1.7 (its version 3 drop-in is loaded by containerd 2.x in installer-test).
NODE_TEST_2_1 = node_containerd,node_cri,node_network
node-test: kernels
	@$(STEP) 'integration tests in the emulated ARM64 node (containerd 1.7)' cargo xtask node-test --containerd=1.7 --memory 6G --timeout 2400
	@$(STEP) 'containerd tests in the emulated ARM64 node (containerd 2.1)' cargo xtask node-test --containerd=2.1 --filter $(NODE_TEST_2_1) --memory 6G --timeout 1800

# The harness's own end-to-end checks (xtask/tests): exit status, stdout/stderr, timeouts.
harness-test: kernels
	@$(STEP) 'node harness tests' cargo test -p xtask -- --test-threads=1

# The Helm chart (charts/accordion): rendered with Helm's own engine, every object validated against
# the Kubernetes 1.33/1.34/1.35 schemas (strict), content asserted. Needs no Rust build and no node.
.PHONY: chart-test installer-test image
chart-test:
	@$(STEP) 'Helm chart tests' scripts/chart-test.sh

# accordion install/uninstall on temporary roots, loaded by Debian's containerd 1.7 and 2.x.
installer-test: setup
	@$(STEP) 'installer against containerd 1.7 and 2.x configs' cargo xtask installer-test

# The installer image the chart's DaemonSet runs (OCI archive under target/image/).
image: kernels
	@$(STEP) 'installer image' cargo xtask image

test: fmt-check clippy unit-test adversarial-test fuzz-smoke chart-test installer-test kernel-smoke node-test harness-test
	@echo "make test: all steps passed"

demo: kernels
	cargo xtask demo

clean:
	cargo clean
