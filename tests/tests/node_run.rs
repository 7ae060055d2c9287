//! `accordion run` as a user runs it, in the emulated ARM64 node (or on an ARM64 KVM host): a real
//! microVM boots through firmware-less ACPI, the agent is PID 1, the command runs through gRPC over
//! virtio-vsock. Needs /dev/kvm and the guest assets; fails instead of skipping when
//! ACCORDION_REQUIRE_KVM=1.

use accordion_tests::{accordion, can_run, one_vm, run_dir_entries, share, text};

#[test]
fn test_run_keeps_stdout_and_stderr_apart_and_propagates_exit_5() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let out = accordion(&[
        "run",
        "--name",
        "streams",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert!(
        !run_dir_entries().contains(&"streams".to_string()),
        "state left behind"
    );
}

#[test]
fn test_run_agent_onlines_an_offline_cpu_on_its_add_uevent() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    // The agent (PID 1) onlines a CPU when the kernel announces it with `add` — here a synthetic
    // uevent for a CPU taken offline first, which reaches the VMM as PSCI CPU_OFF then CPU_ON.
    let script = "cd /sys/devices/system/cpu; cat online; echo 0 > cpu1/online; cat online; \
                  echo add > cpu1/uevent; i=0; \
                  while [ \"$(cat online)\" != 0-1 ] && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done; \
                  cat online";
    let out = accordion(&[
        "run",
        "--vcpus",
        "2",
        "--max-vcpus",
        "4",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0-1\n0\n0-1\n");
}

#[test]
fn test_run_minimal_kernel_1_of_128_has_only_cpu0_online() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let out = accordion(&[
        "run",
        "--vcpus",
        "1",
        "--max-vcpus",
        "128",
        "--",
        "sh",
        "-c",
        "cat /sys/devices/system/cpu/online; nproc; cat /sys/devices/system/cpu/present",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0\n1\n0-127\n");
}

#[test]
fn test_run_debian_kernel_1_of_128_has_only_cpu0_online_and_exit_3() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let kernel = share().join("guest/Image-debian");
    let out = accordion(&[
        "run",
        "--kernel",
        &kernel.to_string_lossy(),
        "--vcpus",
        "1",
        "--max-vcpus",
        "128",
        "--",
        "sh",
        "-c",
        "cat /sys/devices/system/cpu/online; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0\n");
}

#[test]
fn test_run_with_missing_kernel_is_a_clear_error_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let out = accordion(&[
        "run",
        "--name",
        "nokernel",
        "--kernel",
        "/nonexistent/Image",
        "--",
        "true",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("/nonexistent/Image"), "stderr: {stderr}");
    assert!(
        !run_dir_entries().contains(&"nokernel".to_string()),
        "state left behind"
    );
}

#[test]
fn test_run_refuses_boot_vcpus_above_max() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let out = accordion(&["run", "--vcpus", "9", "--max-vcpus", "8", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(125),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).is_empty());
}
