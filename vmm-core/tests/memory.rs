//! Memory resize through virtio-mem, with real guests under KVM and both guest kernels (run in
//! the ARM64 node: `cargo xtask node-test --filter memory`).
//!
//! The guest boots 256 MiB with room for 2 GiB and runs a shell loop that prints its MemTotal
//! whenever it changes; the first time it has more than 900 MiB it fills 600 MiB of a tmpfs,
//! checks it reads back, frees it and says `filled=ok`. The test drives `Vm::set_memory`, waits
//! for the device (`MemoryRequest::wait`) and for the guest's MemTotal, and reads the VMM's
//! resident pages of the region's memfd from /proc/self/smaps.
//! Without a usable /dev/kvm the tests are skipped with a message, unless
//! ACCORDION_REQUIRE_KVM=1 (CI) makes that a failure.

// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use accordion_vmm::{MemoryResizeError, Vm, VmConfig, VmMemory};

mod common;
use common::{
    guest_dir, initrd_with, kvm_available, one_vm_at_a_time, open_fds, report, tasks, Console,
};

const MIB: u64 = 1 << 20;
const BOOT_MIB: u64 = 256;
const MAX_MIB: u64 = 2048;
/// Generous: a nested TCG boot of the Debian kernel takes tens of seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// One grow or shrink, guest included (onlining or offlining memory blocks under TCG).
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

const GUEST_SCRIPT: &str = r#"#!/bin/sh
last=
filled=
while true; do
    t=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
    if [ "$t" != "$last" ]; then
        last=$t
        w=$(dmesg | grep -ciE 'WARNING:|BUG:|virtio_mem.*(error|fail)')
        echo "memtotal_kb=$t warnings=$w"
    fi
    if [ -z "$filled" ] && [ "$t" -gt 900000 ]; then
        filled=1
        r=fail
        mkdir -p /fill
        if mount -t tmpfs -o size=700m fill /fill &&
            dd if=/dev/zero of=/fill/x bs=1M count=600 2>/dev/null &&
            [ "$(wc -c < /fill/x)" = 629145600 ]; then
            r=ok
        fi
        rm -f /fill/x
        umount /fill
        echo "filled=$r"
    fi
    sleep 0.2
done
"#;

/// Resident bytes of this process's mappings of the virtio-mem region's memfd.
fn region_rss() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_region = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_region = line.contains("memfd:accordion-hotplug-ram");
        } else if in_region {
            if let Some(v) = line.strip_prefix("Rss:") {
                kb += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    kb * 1024
}

/// The guest's last MemTotal and warning count.
fn last_memtotal(console: &Console) -> Option<(u64, u64)> {
    let text = console.text();
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("memtotal_kb="))?
        .to_string();
    let (kb, warnings) = line.split_once(" warnings=")?;
    Some((kb.parse().ok()?, warnings.trim().parse().ok()?))
}

struct Guest {
    name: String,
    vm: Vm,
    console: Console,
    initrd: PathBuf,
    /// MemTotal at boot, in KiB.
    boot_kb: u64,
}

impl Guest {
    fn boot(kernel: &str) -> Self {
        let name = format!("{kernel}-mem");
        let initrd = initrd_with(GUEST_SCRIPT, &name);
        let console = Console::default();
        let mut config = VmConfig::new(guest_dir().join(kernel));
        config.initrd = Some(initrd.clone().into());
        config.memory_mib = BOOT_MIB;
        config.max_memory_mib = Some(MAX_MIB);
        config.boot_vcpus = 2;
        config.max_vcpus = 2;
        config.console = Box::new(console.clone());
        let vm = Vm::start(config).unwrap();
        let mut guest = Self {
            name,
            vm,
            console,
            initrd,
            boot_kb: 0,
        };
        guest.boot_kb = guest.wait_memtotal(BOOT_TIMEOUT, |_| true);
        guest
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{}: {what}; console:\n{}", self.name, self.console.text())
    }

    /// Waits until the guest reports a MemTotal `accept` takes; returns it (KiB).
    fn wait_memtotal(&self, timeout: Duration, accept: impl Fn(u64) -> bool) -> u64 {
        let start = Instant::now();
        loop {
            if let Some((kb, _)) = last_memtotal(&self.console).filter(|(kb, _)| accept(*kb)) {
                return kb;
            }
            if let Some(reason) = self.vm.wait_timeout(Duration::ZERO) {
                self.fail(&format!("VM stopped ({reason:?})"));
            }
            if start.elapsed() > timeout {
                self.fail(&format!(
                    "MemTotal not as expected within {timeout:?} (last {:?})",
                    last_memtotal(&self.console)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resizes to `mib`, waits for the device and the guest; returns the time the device took
    /// and the guest's MemTotal growth over boot in MiB.
    fn resize(&self, mib: u64) -> (Duration, u64) {
        let start = Instant::now();
        let request = self.vm.set_memory(mib * MIB).unwrap();
        assert_eq!(request.target, mib * MIB);
        let reached = request
            .wait(STEP_TIMEOUT)
            .unwrap_or_else(|got| self.fail(&format!("resize to {mib} MiB stopped at {got:?}")));
        let took = start.elapsed();
        assert_eq!(reached.current(), mib * MIB);
        let extra_kb = (mib - BOOT_MIB) * 1024;
        let kb = self.wait_memtotal(STEP_TIMEOUT, |kb| kb == self.boot_kb + extra_kb);
        (took, (kb - self.boot_kb) / 1024)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vm.shutdown();
        let _ = std::fs::remove_file(&self.initrd);
    }
}

fn assert_memory_resize(kernel: &str, cycles: u32) {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    let started = Instant::now();
    let g = Guest::boot(kernel);
    let booted = started.elapsed();
    let fixed = VmMemory {
        boot: BOOT_MIB * MIB,
        max: MAX_MIB * MIB,
        plugged: 0,
        requested: 0,
    };
    assert_eq!(g.vm.memory(), fixed);
    assert_eq!(region_rss(), 0, "the region costs nothing before a plug");

    // Out of range: nothing changes.
    assert!(matches!(
        g.vm.set_memory(128 * MIB),
        Err(MemoryResizeError::BelowBoot { .. })
    ));
    assert!(matches!(
        g.vm.set_memory((MAX_MIB + 2) * MIB),
        Err(MemoryResizeError::AboveMax { .. })
    ));
    assert_eq!(g.vm.memory(), fixed);

    // Grow to 1 GiB: the guest sees 768 MiB more and can fill 600 MiB of it.
    let (grow, grown) = g.resize(1024);
    assert_eq!(grown, 768);
    let start = Instant::now();
    while g.console.value("filled").is_none() && start.elapsed() < STEP_TIMEOUT {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        g.console.value("filled").as_deref(),
        Some("ok"),
        "{}",
        g.console.text()
    );
    let rss_full = region_rss();
    assert!(
        rss_full >= 500 * MIB,
        "region RSS {rss_full} after the fill"
    );

    // Back to 256 MiB: the guest gives it all back, and so does the host.
    let (shrink, shrunk) = g.resize(BOOT_MIB);
    assert_eq!(shrunk, 0);
    let rss_after = region_rss();
    assert!(
        rss_after <= 2 * MIB,
        "region RSS {rss_after} after the shrink"
    );

    // Cycles: no thread, fd or resident memory left behind.
    let (tasks_before, fds_before) = (tasks(), open_fds());
    let cycles_started = Instant::now();
    for _ in 0..cycles {
        g.resize(512);
        g.resize(BOOT_MIB);
    }
    let cycle_time = cycles_started.elapsed();
    let rss_cycled = region_rss();
    assert!(
        rss_cycled <= 2 * MIB,
        "region RSS {rss_cycled} after {cycles} cycles"
    );
    assert_eq!((tasks(), open_fds()), (tasks_before, fds_before));
    let (_, warnings) = last_memtotal(&g.console).unwrap();
    assert_eq!(warnings, 0, "{}", g.console.text());
    report(&format!(
        "memory {kernel}: boot {:.1}s; grow 256->1024 MiB {:.2}s, shrink {:.2}s; region RSS \
         {} MiB filled, {} MiB after shrink, {} MiB after {cycles} cycles of 256<->512 ({:.1}s)",
        booted.as_secs_f64(),
        grow.as_secs_f64(),
        shrink.as_secs_f64(),
        rss_full / MIB,
        rss_after / MIB,
        rss_cycled / MIB,
        cycle_time.as_secs_f64()
    ));
}

#[test]
fn test_minimal_kernel_grows_fills_shrinks_and_cycles_returning_memory_to_the_host() {
    assert_memory_resize("Image", 20);
}

#[test]
fn test_debian_kernel_grows_fills_shrinks_and_cycles_returning_memory_to_the_host() {
    assert_memory_resize("Image-debian", 20);
}

#[test]
fn test_a_vm_without_max_memory_refuses_a_resize() {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    let mut config = VmConfig::new(guest_dir().join("Image"));
    config.initrd = Some(guest_dir().join("initrd.cpio").into());
    let vm = Vm::start(config).unwrap();
    assert_eq!(
        vm.set_memory(512 * MIB).unwrap_err(),
        MemoryResizeError::Fixed { boot: 256 * MIB }
    );
    assert_eq!(vm.memory().max, 256 * MIB);
    vm.shutdown();
}
