//! Real boots of both guest kernels under KVM (run in the ARM64 node: `cargo xtask node-test --filter boot`).
//!
//! Each test boots the default guest initramfs plus a `/accordion/cmd` script, then checks what
//! the guest itself reports. Without a usable /dev/kvm the tests are skipped with a message, unless
//! ACCORDION_REQUIRE_KVM=1 (CI) makes that a failure.

// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use accordion_vmm::{ExitReason, VcpuState, Vm, VmConfig};

mod common;
use common::{guest_dir, initrd_with, kvm_available, one_vm_at_a_time, open_fds, Console};

/// Generous: nested TCG boots of the Debian kernel take tens of seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest script shared by the boot tests: CPU sysfs, firmware complaints, then exit 3.
const CPU_FACTS: &str = r#"#!/bin/sh
c=/sys/devices/system/cpu
echo "online=$(cat $c/online)"
echo "present=$(cat $c/present)"
echo "possible=$(cat $c/possible)"
echo "nproc=$(nproc)"
echo "firmware_errors=$(dmesg | grep -ciE 'ACPI Error|ACPI BIOS Error|FW_BUG|Firmware Bug')"
exit 3
"#;

struct Booted {
    reason: ExitReason,
    console: Console,
    states: Vec<VcpuState>,
}

fn boot(kernel: &str, vcpus: u32, max_vcpus: u32, script: &str) -> Booted {
    let name = format!("{kernel}-{vcpus}-{max_vcpus}");
    let initrd = initrd_with(script, &name);
    let console = Console::default();
    let mut config = VmConfig::new(guest_dir().join(kernel));
    config.initrd = Some(initrd.clone().into());
    config.boot_vcpus = vcpus;
    config.max_vcpus = max_vcpus;
    config.console = Box::new(console.clone());
    let vm = Vm::start(config).unwrap();
    let reason = vm.wait_timeout(BOOT_TIMEOUT).unwrap_or_else(|| {
        vm.shutdown();
        panic!(
            "{name}: guest did not finish in {BOOT_TIMEOUT:?}; console:\n{}",
            console.text()
        )
    });
    let states = vm.vcpu_states();
    drop(vm);
    std::fs::remove_file(initrd).unwrap();
    Booted {
        reason,
        console,
        states,
    }
}

fn assert_boot(kernel: &str, vcpus: u32, max_vcpus: u32, online: &str) {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    let b = boot(kernel, vcpus, max_vcpus, CPU_FACTS);
    let all = format!("0-{}", max_vcpus - 1);
    let console = b.console.text();
    assert_eq!(b.reason, ExitReason::PowerOff, "{console}");
    assert_eq!(
        b.console.value("online").as_deref(),
        Some(online),
        "{console}"
    );
    assert_eq!(
        b.console.value("present").as_deref(),
        Some(all.as_str()),
        "{console}"
    );
    assert_eq!(
        b.console.value("possible").as_deref(),
        Some(all.as_str()),
        "{console}"
    );
    assert_eq!(
        b.console.value("nproc"),
        Some(vcpus.to_string()),
        "{console}"
    );
    assert_eq!(
        b.console.value("firmware_errors").as_deref(),
        Some("0"),
        "{console}"
    );
    assert_eq!(
        b.console.value("@@EXIT-CODE").as_deref(),
        Some("3"),
        "{console}"
    );
    let online_vcpus = b.states.iter().filter(|s| **s == VcpuState::Online).count();
    let unplugged = b
        .states
        .iter()
        .filter(|s| **s == VcpuState::Unplugged)
        .count();
    assert_eq!(
        (online_vcpus, unplugged),
        (vcpus as usize, (max_vcpus - vcpus) as usize)
    );
}

#[test]
fn test_minimal_kernel_1_of_128_has_only_cpu0_online() {
    assert_boot("Image", 1, 128, "0");
}

#[test]
fn test_debian_kernel_1_of_128_has_only_cpu0_online() {
    assert_boot("Image-debian", 1, 128, "0");
}

#[test]
fn test_minimal_kernel_4_of_8_has_cpus_0_to_3_online() {
    assert_boot("Image", 4, 8, "0-3");
}

#[test]
fn test_debian_kernel_4_of_8_has_cpus_0_to_3_online() {
    assert_boot("Image-debian", 4, 8, "0-3");
}

fn vcpu_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("vcpu"))
        .count()
}

#[test]
fn test_shutdown_of_a_running_guest_joins_its_threads_and_closes_its_fds() {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    let initrd = initrd_with(
        "#!/bin/sh\necho guest-command-running\nsleep 600\n",
        "shutdown",
    );
    let fds_before = open_fds();
    let console = Console::default();
    let mut config = VmConfig::new(guest_dir().join("Image"));
    config.initrd = Some(initrd.clone().into());
    config.boot_vcpus = 2;
    config.max_vcpus = 4;
    config.console = Box::new(console.clone());
    let vm = Vm::start(config).unwrap();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while !console.text().contains("guest-command-running") {
        assert!(
            std::time::Instant::now() < deadline,
            "guest never ran its command:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let states = vm.vcpu_states();
    let threads_running = vcpu_threads();

    let reason = vm.shutdown();
    drop(vm);

    std::fs::remove_file(initrd).unwrap();
    assert_eq!(
        states,
        [
            VcpuState::Online,
            VcpuState::Online,
            VcpuState::Unplugged,
            VcpuState::Unplugged
        ]
    );
    assert_eq!(threads_running, 2);
    assert_eq!(reason, ExitReason::Shutdown);
    assert_eq!(vcpu_threads(), 0);
    assert_eq!(open_fds(), fds_before);
}

#[test]
fn test_guest_cpu_off_parks_the_vcpu_and_cpu_on_brings_it_back() {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    // Offline and re-online cpu1 twice: PSCI CPU_OFF ends its thread, CPU_ON spawns a new one.
    let script = r#"#!/bin/sh
f=/sys/devices/system/cpu/cpu1/online
echo 0 > $f && echo "after_off=$(cat /sys/devices/system/cpu/online)"
echo 1 > $f && echo 0 > $f && echo 1 > $f && echo "after_on=$(cat /sys/devices/system/cpu/online)"
echo "cpu_errors=$(dmesg | grep -iE 'CPU1.*(failed|not come|shut down cleanly)' | wc -l)"
echo "kernel_warnings=$(dmesg | grep -E 'WARNING:|BUG:' | wc -l)"
"#;
    let b = boot("Image", 2, 4, script);
    let console = b.console.text();
    assert_eq!(b.reason, ExitReason::PowerOff, "{console}");
    assert_eq!(
        b.console.value("after_off").as_deref(),
        Some("0"),
        "{console}"
    );
    assert_eq!(
        b.console.value("after_on").as_deref(),
        Some("0-1"),
        "{console}"
    );
    assert_eq!(
        b.console.value("cpu_errors").as_deref(),
        Some("0"),
        "{console}"
    );
    assert_eq!(b.states[..2], [VcpuState::Online, VcpuState::Online]);
}

#[test]
fn test_guest_reboot_stops_the_vm_with_reset() {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    let b = boot("Image", 1, 2, "#!/bin/sh\nreboot -f\n");
    assert_eq!(b.reason, ExitReason::Reset, "{}", b.console.text());
}

#[test]
fn test_garbage_kernel_and_oversized_initrd_fail_before_any_vm_exists() {
    let dir = std::env::temp_dir().join(format!("accordion-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x42u8; 1 << 16]).unwrap();
    let big_initrd = dir.join("big");
    std::fs::File::create(&big_initrd)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();

    // A valid Image header (8 MiB image_size) is enough to get to the initrd check.
    let kernel = dir.join("Image");
    let mut header = vec![0u8; 4096];
    header[16..24].copy_from_slice(&(8u64 << 20).to_le_bytes());
    header[56..60].copy_from_slice(b"ARM\x64");
    std::fs::write(&kernel, header).unwrap();

    let garbage_result = Vm::start(VmConfig::new(&garbage));
    let mut config = VmConfig::new(&kernel);
    config.memory_mib = 48;
    config.initrd = Some(big_initrd.into());
    let big_result = Vm::start(config);

    std::fs::remove_dir_all(&dir).unwrap();
    let garbage_error = garbage_result.err().map(|e| e.to_string());
    assert_eq!(
        garbage_error.as_deref(),
        Some("Cannot use the kernel or initrd")
    );
    let big_error = big_result.err().map(|e| format!("{e:?}"));
    assert!(
        big_error
            .as_deref()
            .is_some_and(|e| e.contains("InitrdTooLarge")),
        "{big_error:?}"
    );
}
