//! The CPU hotplug controller and the GED, driven by host vCPU targets interleaved with any guest
//! register access (any offset, width and value), vCPUs starting and stopping, and the guest's
//! own scan (what the DSDT's CSCN method does: while NEXT names a vCPU, select it, read FLAGS,
//! acknowledge what it shows).
//!
//! Checked on every input: no panic; vCPU 0 stays plugged; a vCPU whose thread runs is never
//! unplugged; the guest's scan ends within one pass per possible vCPU (the DSDT gives up after
//! four); the GED only ever reports the CPU hotplug event.
#![no_main]

use std::sync::{Arc, Mutex};

use accordion_vmm::bus::MmioDevice;
use accordion_vmm::devices::cpu_hotplug::{
    CpuHotplug, CpuSlots, FLAG_INSERTING, FLAG_REMOVING, NO_EVENT, REG_FLAGS, REG_NEXT, REG_SELECT,
};
use accordion_vmm::devices::ged::{Ged, EVENT_CPU_HOTPLUG};
use accordion_vmm::devices::irq::IrqLine;
use accordion_vmm::CpuHotplugError;
use accordion_vmm_fuzz::Input;
use libfuzzer_sys::fuzz_target;

const MAX_ACTIONS: usize = 256;

/// The vCPU table: plugged, running (a thread runs it), seen enabled by the guest.
struct Table {
    plugged: Mutex<Vec<bool>>,
    running: Mutex<Vec<bool>>,
}

impl CpuSlots for Table {
    fn count(&self) -> u32 {
        self.plugged.lock().expect("not poisoned").len() as u32
    }
    fn is_plugged(&self, index: u32) -> bool {
        self.plugged.lock().expect("not poisoned")[index as usize]
    }
    fn plug(&self, index: u32) {
        self.plugged.lock().expect("not poisoned")[index as usize] = true;
    }
    fn unplug(&self, index: u32) -> Result<(), CpuHotplugError> {
        assert_ne!(index, 0, "the controller asked to unplug vCPU 0");
        if self.running.lock().expect("not poisoned")[index as usize] {
            return Err(CpuHotplugError::StillRunning(index));
        }
        self.plugged.lock().expect("not poisoned")[index as usize] = false;
        Ok(())
    }
    fn seen_enabled(&self, _index: u32) {}
}

fn read(hp: &mut CpuHotplug, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    hp.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write(hp: &mut CpuHotplug, offset: u64, value: u32) {
    hp.write(offset, &value.to_le_bytes());
}

/// The DSDT's CSCN loop; returns the passes it took.
fn guest_scan(hp: &mut CpuHotplug, count: u32) -> u32 {
    let mut passes = 0;
    let mut cpu = read(hp, REG_NEXT);
    while cpu < count {
        write(hp, REG_SELECT, cpu);
        let flags = read(hp, REG_FLAGS);
        if flags & FLAG_INSERTING != 0 {
            write(hp, REG_FLAGS, FLAG_INSERTING);
        }
        if flags & FLAG_REMOVING != 0 {
            write(hp, REG_FLAGS, FLAG_REMOVING);
        }
        cpu = read(hp, REG_NEXT);
        passes += 1;
        assert!(
            passes <= count,
            "the scan did not end within {count} passes"
        );
    }
    assert_eq!(cpu, NO_EVENT, "NEXT named a vCPU that does not exist");
    passes
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let count = 1 + u32::from(input.u8() % 16);
    let boot = 1 + u32::from(input.u8()) % count;
    let table = Arc::new(Table {
        plugged: Mutex::new((0..count).map(|i| i < boot).collect()),
        running: Mutex::new((0..count).map(|i| i == 0).collect()),
    });
    let ged = Arc::new(Mutex::new(Ged::new(IrqLine::new(2).expect("eventfd"))));
    let mut hp = CpuHotplug::new(table.clone(), ged.clone(), boot);
    for _ in 0..MAX_ACTIONS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            // The host asks for a vCPU count (0 and too many included: refused, nothing changes).
            0 => {
                let _ = hp.set_target(u32::from(input.u8() % 20));
            }
            1 => {
                let offset = u64::from(input.u8() % 0x14);
                let mut data = vec![0u8; [4usize, 1, 2, 8][usize::from(input.u8() % 4)]];
                hp.read(offset, &mut data);
            }
            2 => {
                let offset = u64::from(input.u8() % 0x14);
                let width = [4usize, 1, 2, 8][usize::from(input.u8() % 4)];
                let value = input.u32().to_le_bytes();
                hp.write(offset, &value.repeat(2)[..width]);
            }
            // A plugged vCPU's thread starts (the guest onlined it), or a thread stops.
            3 => {
                let i = u32::from(input.u8()) % count;
                if i != 0 {
                    let plugged = table.is_plugged(i);
                    let mut running = table.running.lock().expect("not poisoned");
                    running[i as usize] = plugged && !running[i as usize];
                }
            }
            4 => {
                guest_scan(&mut hp, count);
            }
            _ => {
                let mut events = [0u8; 4];
                ged.lock().expect("not poisoned").read(0, &mut events);
                assert_eq!(u32::from_le_bytes(events) & !EVENT_CPU_HOTPLUG, 0);
            }
        }
        assert!(table.is_plugged(0), "vCPU 0 was unplugged");
        let plugged = table.plugged.lock().expect("not poisoned").clone();
        let running = table.running.lock().expect("not poisoned").clone();
        assert!(
            running.iter().zip(&plugged).all(|(&r, &p)| !r || p),
            "a running vCPU was unplugged"
        );
    }
    guest_scan(&mut hp, count);
});
