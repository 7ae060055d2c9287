//! vCPU hotplug and hot-unplug of real guests under KVM, with both guest kernels (run in the ARM64
//! node: `cargo xtask node-test --filter hotplug`).
//!
//! The guest boots 1 of 8 vCPUs (the VMM plugs a second one before the guest is up) and runs a shell loop that onlines every offline CPU it finds
//! (the kernel registers a hot-added CPU but leaves it offline; in production the agent does this)
//! and prints `online=<list> errors=<n> warnings=<n>` whenever the online list changes. The test
//! drives `Vm::set_vcpus` and waits for the guest's line and for `Vm::vcpu_states` to agree.
//! Without a usable /dev/kvm the tests are skipped with a message, unless
//! ACCORDION_REQUIRE_KVM=1 (CI) makes that a failure.

// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use accordion_vmm::{CpuHotplugError, VcpuEvent, VcpuState, Vm, VmConfig};

mod common;
use common::{
    guest_dir, initrd_with, kvm_available, one_vm_at_a_time, open_fds, report, tasks, Console,
};

const MAX_VCPUS: u32 = 8;
/// Generous: a nested TCG boot of the Debian kernel takes tens of seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// One plug or unplug step, guest included (TCG: each CPU online is a secondary boot).
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Onlines what it finds offline, reports every change of the online list, never exits.
const GUEST_SCRIPT: &str = r#"#!/bin/sh
c=/sys/devices/system/cpu
if echo 1 > $c/cpu7/online 2>/dev/null; then r=ok; else r=fail; fi
echo "unplugged_online=$r"
last=
while true; do
    for f in $c/cpu[1-9]*/online; do
        [ -f "$f" ] && [ "$(cat $f 2>/dev/null)" = 0 ] && echo 1 > $f 2>/dev/null
    done
    now=$(cat $c/online)
    if [ "$now" != "$last" ]; then
        last=$now
        e=$(dmesg | grep -ciE 'ACPI Error|ACPI BIOS Error|FW_BUG|Firmware Bug')
        w=$(dmesg | grep -ciE 'WARNING:|BUG:|Eject incomplete|failed to')
        if echo 1 > $c/cpu7/online 2>/dev/null; then p=ok; else p=fail; fi
        echo "online=$now errors=$e warnings=$w cpu7_online=$p"
    fi
    sleep 0.2
done
"#;

/// The guest's last `online=... errors=... warnings=... cpu7_online=...` line, split.
fn last_report(console: &Console) -> Option<(String, String, String, String)> {
    let text = console.text();
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("online="))?
        .to_string();
    let mut parts = line.split_whitespace();
    let online = parts.next()?.to_string();
    let errors = parts.next()?.strip_prefix("errors=")?.to_string();
    let warnings = parts.next()?.strip_prefix("warnings=")?.to_string();
    let cpu7 = parts.next()?.strip_prefix("cpu7_online=")?.to_string();
    Some((online, errors, warnings, cpu7))
}

/// States with vCPUs `0..target` Online and the rest Unplugged.
fn settled(target: u32) -> Vec<VcpuState> {
    (0..MAX_VCPUS)
        .map(|i| {
            if i < target {
                VcpuState::Online
            } else {
                VcpuState::Unplugged
            }
        })
        .collect()
}

fn online_list(target: u32) -> String {
    if target == 1 {
        "0".into()
    } else {
        format!("0-{}", target - 1)
    }
}

struct Guest {
    name: String,
    vm: Vm,
    console: Console,
    initrd: PathBuf,
}

impl Guest {
    /// Boots 1 of 8 and at once (before the guest has brought up its CPUs or bound its GED)
    /// asks for 2: the guest's boot-time CPU_ON of the Online Capable vCPU 1 must be denied,
    /// and the guest must find vCPU 1 enabled when it reads `_STA`.
    fn boot(kernel: &str) -> Self {
        let name = format!("{kernel}-1-{MAX_VCPUS}");
        let initrd = initrd_with(GUEST_SCRIPT, &name);
        let console = Console::default();
        let mut config = VmConfig::new(guest_dir().join(kernel));
        config.initrd = Some(initrd.clone().into());
        config.boot_vcpus = 1;
        config.max_vcpus = MAX_VCPUS;
        config.console = Box::new(console.clone());
        let vm = Vm::start(config).unwrap();
        vm.set_vcpus(2).unwrap();
        let guest = Self {
            name,
            vm,
            console,
            initrd,
        };
        guest.wait_for(2, BOOT_TIMEOUT);
        guest
    }

    /// Waits until the guest prints the online list of `target` and the VMM's states agree.
    fn wait_for(&self, target: u32, timeout: Duration) -> Duration {
        let start = Instant::now();
        let want = online_list(target);
        loop {
            let online = last_report(&self.console).map(|r| r.0);
            let states = self.vm.vcpu_states();
            if online.as_deref() == Some(want.as_str()) && states == settled(target) {
                return start.elapsed();
            }
            if let Some(reason) = self.vm.wait_timeout(Duration::ZERO) {
                panic!(
                    "{}: VM stopped ({reason:?}); console:\n{}",
                    self.name,
                    self.console.text()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{}: no online={want} within {timeout:?} (guest says {online:?}, states \
                 {states:?}); console:\n{}",
                self.name,
                self.console.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `set_vcpus(target)`, then waits for the guest and the VMM to settle there.
    fn resize(&self, target: u32) -> Duration {
        self.vm.set_vcpus(target).unwrap();
        self.wait_for(target, STEP_TIMEOUT)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vm.shutdown();
        let _ = std::fs::remove_file(&self.initrd);
    }
}

/// The events received so far for vCPU `index`.
fn events_of(rx: &Receiver<VcpuEvent>, index: u32) -> Vec<VcpuState> {
    rx.try_iter()
        .filter(|e| e.index == index)
        .map(|e| e.state)
        .collect()
}

fn assert_hotplug(kernel: &str, cycles: u32) {
    if !kvm_available() {
        return;
    }
    let _serial = one_vm_at_a_time();
    let started = Instant::now();
    let g = Guest::boot(kernel);
    let booted = started.elapsed();
    let console = || g.console.text();
    assert_eq!(
        g.console.value("unplugged_online").as_deref(),
        Some("fail"),
        "{}",
        console()
    );

    // Invalid targets change nothing.
    for bad in [0, MAX_VCPUS + 1] {
        assert!(
            matches!(
                g.vm.set_vcpus(bad),
                Err(CpuHotplugError::InvalidTarget { .. })
            ),
            "set_vcpus({bad})"
        );
    }
    assert_eq!(g.vm.vcpu_states(), settled(2));

    // 2 → 4 → 2 → 8 → 1: plug, unplug, re-plug the vCPUs just unplugged, unplug all but 0.
    let events = g.vm.subscribe_vcpu_events();
    let mut steps = Vec::new();
    for target in [4, 2, 8, 1] {
        steps.push((target, g.resize(target)));
    }
    assert_eq!(
        events_of(&events, 3),
        [
            VcpuState::Plugged,
            VcpuState::Online,
            VcpuState::Plugged,
            VcpuState::Unplugged,
            VcpuState::Plugged,
            VcpuState::Online,
            VcpuState::Plugged,
            VcpuState::Unplugged
        ]
    );

    // A new target while the previous one is in flight: the guest ends at the last one.
    g.vm.set_vcpus(8).unwrap();
    steps.push((3, g.resize(3)));
    steps.push((1, g.resize(1)));

    // Repeated plug/unplug of the same vCPU leaks no thread and no fd.
    let (tasks_before, fds_before) = (tasks(), open_fds());
    let cycles_started = Instant::now();
    for _ in 0..cycles {
        g.resize(2);
        g.resize(1);
    }
    let cycle_time = cycles_started.elapsed();
    let (tasks_after, fds_after) = (tasks(), open_fds());
    assert_eq!(
        events_of(&events, 1)
            .iter()
            .rev()
            .take(4)
            .rev()
            .copied()
            .collect::<Vec<_>>(),
        [
            VcpuState::Plugged,
            VcpuState::Online,
            VcpuState::Plugged,
            VcpuState::Unplugged
        ]
    );
    assert_eq!((tasks_after, fds_after), (tasks_before, fds_before));

    let (_, errors, warnings, cpu7) = last_report(&g.console).unwrap();
    assert_eq!(
        (errors.as_str(), warnings.as_str(), cpu7.as_str()),
        ("0", "0", "fail"),
        "{}",
        console()
    );
    let step_list: Vec<String> = steps
        .iter()
        .map(|(t, d)| format!("{t}: {:.1}s", d.as_secs_f64()))
        .collect();
    report(&format!(
        "hotplug {kernel}: boot {:.1}s; steps {}; {cycles} plug/unplug cycles {:.1}s; \
         tasks {tasks_before}->{tasks_after}, fds {fds_before}->{fds_after}",
        booted.as_secs_f64(),
        step_list.join(", "),
        cycle_time.as_secs_f64()
    ));
}

#[test]
fn test_minimal_kernel_plugs_early_then_2_4_2_8_1_and_cycles_without_leaks() {
    assert_hotplug("Image", 20);
}

#[test]
fn test_debian_kernel_plugs_early_then_2_4_2_8_1_and_cycles_without_leaks() {
    assert_hotplug("Image-debian", 20);
}

/// What a vCPU thread costs to start on CPU_ON (spawn, as the VMM does) versus waking a parked
/// one (unpark), measured here with the same std primitives. Printed for the record.
#[test]
fn test_measure_thread_spawn_versus_unpark() {
    const ROUNDS: usize = 200;
    // Not while a VM test counts this process's threads.
    let _serial = one_vm_at_a_time();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut spawn = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let (tx, rx) = std::sync::mpsc::channel();
        let t0 = Instant::now();
        let h = std::thread::Builder::new()
            .name("vcpu-probe".into())
            .spawn(move || tx.send(Instant::now()).unwrap())
            .unwrap();
        spawn.push(rx.recv().unwrap() - t0);
        h.join().unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let go = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let go2 = go.clone();
    let parked = std::thread::spawn(move || {
        for _ in 0..ROUNDS {
            while !go2.swap(false, std::sync::atomic::Ordering::AcqRel) {
                std::thread::park();
            }
            tx.send(Instant::now()).unwrap();
        }
    });
    let mut unpark = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        // Let the thread go back to sleep first, as a parked vCPU would be.
        std::thread::sleep(Duration::from_millis(1));
        let t0 = Instant::now();
        go.store(true, std::sync::atomic::Ordering::Release);
        parked.thread().unpark();
        unpark.push(rx.recv().unwrap() - t0);
    }
    parked.join().unwrap();
    let (s, u) = (median(spawn), median(unpark));
    report(&format!(
        "vCPU thread start: spawn median {} us, unpark median {} us ({ROUNDS} rounds)",
        s.as_micros(),
        u.as_micros()
    ));
    assert!(s > Duration::ZERO && u > Duration::ZERO);
}
