//! `accordion run` as a user runs it, in the emulated ARM64 node (or on an ARM64 KVM host): a real
//! microVM boots through firmware-less ACPI, the agent is PID 1, the command runs through gRPC over
//! virtio-vsock. Needs /dev/kvm and the guest assets; fails instead of skipping when
//! ACCORDION_REQUIRE_KVM=1.

use accordion_tests::{
    accordion, accordion_with_stdin, assert_code, can_run, one_vm, run_dir_entries, share, text,
};

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

/// The `vsock_peer` example of vmm-core (a test-only vsock client the node has on its PATH).
fn vsock_peer() -> Vec<u8> {
    let path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("vsock_peer"))
        .find(|p| p.is_file())
        .expect("vsock_peer on PATH (built with the workspace's examples)");
    std::fs::read(path).expect("read vsock_peer")
}

#[test]
fn test_run_guest_process_reaching_the_agent_over_vsock_loopback_is_refused() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    // The minimal guest kernel has vsock's loopback transport built in (VSOCKETS_LOOPBACK=y, its
    // Kconfig default), so a process in the guest can connect to the agent's port 1024 through
    // CID 1 (loopback) or CID 3 (its own CID, also looped back). The agent must close those
    // connections unanswered: served, they would get its SETTINGS frame at once and then every
    // RPC, exec as root outside any container included. The connect itself succeeds (the
    // kernel completes it before the agent's accept), which shows the port was reached.
    let script = "cat > /tmp/vsock_peer && chmod +x /tmp/vsock_peer && \
                  for cid in 1 3; do echo \"cid $cid\"; /tmp/vsock_peer connect $cid 1024 PRI 2>&1; \
                  echo \"exit $?\"; done";
    let out = accordion_with_stdin(&["run", "--", "sh", "-c", script], Some(&vsock_peer()));
    assert_code(&out, 0);
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("connect:"),
        "the port was not reached: {stdout}"
    );
    let replies: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("cid ") && !l.starts_with("exit "))
        .collect();
    assert_eq!(replies.len(), 2, "{stdout}");
    for reply in replies {
        // EOF before any byte, or the agent's close seen as a reset or a broken pipe: never an
        // answer (the agent's SETTINGS frame would show as bytes or as invalid UTF-8).
        let closed =
            reply.starts_with("vsock_peer: write:") || reply.starts_with("vsock_peer: read:");
        assert!(
            reply == "vsock_peer: reply="
                || (closed && (reply.contains("reset") || reply.contains("Broken pipe"))),
            "the agent answered a guest process: {stdout}"
        );
    }
}

#[test]
fn test_a_forbidden_system_call_from_a_device_thread_kills_the_vmm_process_and_is_reported() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    // The vsock back end's filter has no getppid; the test hook makes that thread call it right
    // after it is confined, i.e. when the guest's driver activates the device.
    let out = std::process::Command::new("accordion")
        .args(["run", "--name", "seccomp", "--", "true"])
        .env("ACCORDION_SECCOMP", "kill")
        .env("ACCORDION_TEST_SECCOMP_VIOLATION", "vsock")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run accordion");
    // The VMM process dies of it; `accordion run` outlives it, says so and cleans up.
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(125),
        "{:?}; stderr: {stderr}",
        out.status
    );
    assert!(stderr.contains("killed by SIGSYS"), "{stderr}");
    assert!(
        !run_dir_entries().contains(&"seccomp".to_string()),
        "state left behind"
    );
    // The same VM with the same filters, without the hook, runs to the end.
    let out = accordion(&["run", "--name", "seccomp", "--", "true"]);
    assert_code(&out, 0);
    assert!(
        !run_dir_entries().contains(&"seccomp".to_string()),
        "state left behind"
    );
}
