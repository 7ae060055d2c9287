//! Memory resize as an operator drives it: `accordion resize --memory` on a sandbox started with
//! room to grow (`accordion run --max-memory`), with both guest kernels, checked against what the
//! guest itself reports and what the host charges. Runs in the emulated ARM64 node (or on an
//! ARM64 KVM host); fails instead of skipping when ACCORDION_REQUIRE_KVM=1 and KVM or the guest
//! assets are missing.

use accordion_tests::{
    accordion, assert_code, can_run, guest_sh, meminfo_total, one_vm, sandbox_status, share, text,
};

const MIB: u64 = 1 << 20;

/// The guest's MemTotal, bytes.
fn guest_memtotal(name: &str) -> u64 {
    meminfo_total(&guest_sh(name, "cat /proc/meminfo"))
}

fn resize_memory(name: &str, size: &str) -> std::process::Output {
    accordion(&["resize", name, "--memory", size, "--timeout", "120"])
}

/// The sandbox's host cgroup memory.max, bytes.
fn host_memory_max(name: &str) -> u64 {
    let path = format!("/sys/fs/cgroup/accordion/{name}/memory.max");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{path}: {text}"))
}

fn memory_sequence(kernel: &str) {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let name = format!("mem-{}", kernel.to_lowercase());
    let image = share().join("guest").join(kernel);
    let out = accordion(&[
        "run",
        "-d",
        "--name",
        &name,
        "--vcpus",
        "1",
        "--max-vcpus",
        "2",
        "--memory",
        "256M",
        "--max-memory",
        "2G",
        "--kernel",
        image.to_str().expect("utf-8 path"),
    ]);
    assert_code(&out, 0);
    let boot_total = guest_memtotal(&name);
    let s = sandbox_status(&name);
    assert_eq!(
        s["memory plugged"], "0 MiB plugged of 0 MiB asked, up to 2048 MiB",
        "{s:?}"
    );
    let host_boot = host_memory_max(&name);

    // Grow to 1 GiB: the guest gets 768 MiB more, and the host cgroup as much.
    let out = resize_memory(&name, "1G");
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("1024 MiB of memory"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(guest_memtotal(&name), boot_total + 768 * MIB);
    assert_eq!(host_memory_max(&name), host_boot + 768 * MIB);

    // The guest can use it: 600 MiB in a tmpfs, read back.
    let filled = guest_sh(
        &name,
        "mkdir -p /fill && mount -t tmpfs -o size=700m fill /fill && \
         dd if=/dev/zero of=/fill/x bs=1M count=600 2>/dev/null && wc -c < /fill/x",
    );
    assert_eq!(filled.trim(), "629145600");

    // Shrinking below what it holds is refused, and nothing changes.
    let out = resize_memory(&name, "256M");
    assert_code(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains("FailedPrecondition") && err.contains("free memory in the guest first"),
        "{err}"
    );
    assert_eq!(guest_memtotal(&name), boot_total + 768 * MIB);
    assert_eq!(guest_sh(&name, "wc -c < /fill/x").trim(), "629145600");

    // Out of range: refused, nothing changed.
    for bad in ["128M", "4G"] {
        let out = resize_memory(&name, bad);
        assert_code(&out, 1);
        let err = text(&out.stderr);
        assert!(
            err.contains("InvalidArgument") && err.contains("256 to 2048 MiB"),
            "{err}"
        );
    }

    // Freed, it shrinks back: the guest and the host see the boot size again.
    guest_sh(&name, "rm /fill/x && umount /fill");
    let out = resize_memory(&name, "256M");
    assert_code(&out, 0);
    assert_eq!(guest_memtotal(&name), boot_total);
    assert_eq!(host_memory_max(&name), host_boot);
    let s = sandbox_status(&name);
    assert_eq!(
        s["memory plugged"], "0 MiB plugged of 0 MiB asked, up to 2048 MiB",
        "{s:?}"
    );

    // The same size again is a no-op.
    let out = resize_memory(&name, "256M");
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("already 256 MiB"),
        "{}",
        text(&out.stdout)
    );
    assert_code(&accordion(&["stop", &name]), 0);
}

#[test]
fn test_memory_resize_minimal_kernel() {
    memory_sequence("Image");
}

#[test]
fn test_memory_resize_debian_kernel() {
    memory_sequence("Image-debian");
}

#[test]
fn test_memory_resize_of_a_sandbox_without_max_memory_is_refused() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let name = "mem-fixed";
    accordion_tests::start_sandbox(name, "Image");
    let out = resize_memory(name, "1G");
    assert_code(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains("FailedPrecondition") && err.contains("fixed"),
        "{err}"
    );
    assert_code(&accordion(&["stop", name]), 0);
}
