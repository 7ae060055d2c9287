//! The CPU hotplug controller: the register block the DSDT's processor methods use to learn which
//! vCPUs are plugged and which are being plugged or unplugged, and to eject them (QEMU's
//! hw/acpi/cpu.c is the model; the layout is ours, see docs/architecture.md).
//!
//! Every register is 32 bits wide and little-endian; any other access reads zeros and writes
//! nothing:
//!
//! ```text
//! 0x00 SELECT  RW  vCPU index the FLAGS register talks about
//! 0x04 FLAGS   R   bit 0 enabled (plugged), bit 1 inserting, bit 2 removing
//!              W   bit 1: the guest has notified the insertion (clears inserting)
//!                  bit 2: the guest has notified the removal (clears removing)
//!                  bit 3: eject (`_EJ0`): unplugs the vCPU before the write returns
//! 0x08 NEXT    R   lowest vCPU index with inserting or removing set, 0xFFFF_FFFF if none
//! 0x0C COUNT   R   number of possible vCPUs
//! ```
//!
//! The controller owns the plug *target* and reconciles the vCPUs with it: the lowest-numbered
//! `target` vCPUs are wanted, the rest are not (so vCPU 0 always stays). Guest writes are
//! untrusted: any value at any offset is handled, and an eject the VMM cannot honour is refused
//! and logged (rate-limited, as every line a guest can trigger), leaving the vCPU plugged.

use std::sync::Arc;

use log::Level;

use super::ged::{GedError, SharedGed, EVENT_CPU_HOTPLUG};
use crate::bus::MmioDevice;
use crate::log_limited;

/// Offset of the SELECT register.
pub const REG_SELECT: u64 = 0x0;
/// Offset of the FLAGS register.
pub const REG_FLAGS: u64 = 0x4;
/// Offset of the NEXT register.
pub const REG_NEXT: u64 = 0x8;
/// Offset of the COUNT register.
pub const REG_COUNT: u64 = 0xc;
/// Bytes of registers the DSDT's operation region covers.
pub const REGISTER_BLOCK_SIZE: u32 = 0x10;

/// FLAGS bit: the selected vCPU is plugged (`_STA` enabled).
pub const FLAG_ENABLED: u32 = 1 << 0;
/// FLAGS bit: the selected vCPU waits for the guest's Device Check.
pub const FLAG_INSERTING: u32 = 1 << 1;
/// FLAGS bit: the selected vCPU waits for the guest's Eject Request.
pub const FLAG_REMOVING: u32 = 1 << 2;
/// FLAGS write bit: eject the selected vCPU.
pub const FLAG_EJECT: u32 = 1 << 3;
/// NEXT when no vCPU has an event pending.
pub const NO_EVENT: u32 = u32::MAX;

/// Errors from the hotplug controller.
#[derive(Debug, thiserror::Error)]
pub enum CpuHotplugError {
    /// A target of 0 or more than the possible vCPUs; nothing was changed.
    #[error("Invalid vCPU target {target}: must be 1 to {max}")]
    InvalidTarget {
        /// What was asked for.
        target: u32,
        /// Possible vCPUs.
        max: u32,
    },
    /// The guest could not be told (the flags stay set for the next interrupt).
    #[error("Cannot notify the guest")]
    Ged(#[from] GedError),
    /// vCPU 0 is never unplugged.
    #[error("vCPU 0 cannot be unplugged")]
    BootVcpu,
    /// The vCPU still runs guest code: the guest ejected a CPU it had not turned off.
    #[error("vCPU {0} is still running")]
    StillRunning(u32),
}

/// What the controller needs from the vCPUs. The VMM's vCPU table implements it; the plugged state
/// lives there so PSCI CPU_ON and `_STA` can never disagree.
pub trait CpuSlots: Send + Sync {
    /// Number of possible vCPUs.
    fn count(&self) -> u32;
    /// Whether vCPU `index` is plugged (Plugged or Online).
    fn is_plugged(&self, index: u32) -> bool;
    /// Unplugged → Plugged; nothing if already plugged.
    fn plug(&self, index: u32);
    /// Plugged → Unplugged, refused while a thread runs the vCPU.
    fn unplug(&self, index: u32) -> Result<(), CpuHotplugError>;
    /// The guest has read vCPU `index` as enabled, so its ACPI layer may now know the CPU. Until
    /// then a plugged vCPU's CPU_ON is denied: at boot Linux sends CPU_ON to every Online Capable
    /// CPU before it reads any `_STA`, and one that comes up that way has broken sysfs.
    fn seen_enabled(&self, index: u32);
}

/// Where a vCPU stands in a plug or unplug the guest has not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Nothing in flight.
    None,
    /// Plugged; FLAGS shows inserting until the guest's scan notifies it.
    Inserting,
    /// To be unplugged; FLAGS shows removing until the guest's scan notifies it.
    Removing,
    /// The guest was told to remove it; waiting for its `_EJ0`.
    EjectAwaited,
}

/// What one `set_target` changed (serializable: it crosses the jailed VMM's process boundary as
/// JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HotplugRequest {
    /// vCPUs newly plugged and announced to the guest.
    pub plugging: Vec<u32>,
    /// vCPUs the guest is newly asked to remove.
    pub unplugging: Vec<u32>,
    /// vCPUs whose earlier, not yet announced plug or unplug was withdrawn.
    pub cancelled: Vec<u32>,
}

impl HotplugRequest {
    fn announces(&self) -> bool {
        !self.plugging.is_empty() || !self.unplugging.is_empty()
    }
}

/// The controller.
pub struct CpuHotplug {
    slots: Arc<dyn CpuSlots>,
    ged: SharedGed,
    target: u32,
    selected: u32,
    pending: Vec<Pending>,
}

impl CpuHotplug {
    /// A controller for `slots` whose first `boot_vcpus` are plugged, notifying through `ged`.
    pub fn new(slots: Arc<dyn CpuSlots>, ged: SharedGed, boot_vcpus: u32) -> Self {
        let count = slots.count();
        Self {
            slots,
            ged,
            target: boot_vcpus.clamp(1, count.max(1)),
            selected: 0,
            pending: vec![Pending::None; count as usize],
        }
    }

    /// The number of vCPUs the VMM wants plugged.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Asks for `target` plugged vCPUs: plugs the lowest-numbered missing ones, asks the guest to
    /// remove the highest-numbered extra ones, withdraws what an earlier target started and this
    /// one no longer wants, and raises the GED if the guest has something to do. Returns at once.
    pub fn set_target(&mut self, target: u32) -> Result<HotplugRequest, CpuHotplugError> {
        let max = self.slots.count();
        if target == 0 || target > max {
            return Err(CpuHotplugError::InvalidTarget { target, max });
        }
        self.target = target;
        let request = self.reconcile();
        // Also when only older events are pending: an interrupt raised before the guest's GED
        // driver was bound may have been lost, and this one delivers them.
        if request.announces() || self.next_event() != NO_EVENT {
            self.ged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .raise(EVENT_CPU_HOTPLUG)?;
        }
        Ok(request)
    }

    /// Brings every vCPU's plug state and pending flags in line with the target.
    fn reconcile(&mut self) -> HotplugRequest {
        let mut request = HotplugRequest::default();
        for (index, pending) in (0u32..).zip(self.pending.iter_mut()) {
            let wanted = index < self.target;
            match (wanted, self.slots.is_plugged(index), *pending) {
                (true, false, _) => {
                    self.slots.plug(index);
                    *pending = Pending::Inserting;
                    request.plugging.push(index);
                }
                (true, true, Pending::Removing) => {
                    // The guest has not seen the request yet: withdraw it.
                    *pending = Pending::None;
                    request.cancelled.push(index);
                }
                (false, true, Pending::Inserting) => {
                    // Not announced yet: unplug it quietly (its `_STA` reads disabled again).
                    if self.slots.unplug(index).is_ok() {
                        *pending = Pending::None;
                        request.cancelled.push(index);
                    } else {
                        *pending = Pending::Removing;
                        request.unplugging.push(index);
                    }
                }
                (false, true, Pending::None) => {
                    *pending = Pending::Removing;
                    request.unplugging.push(index);
                }
                (false, false, _) => *pending = Pending::None,
                // Wanted and plugged (an awaited eject re-plugs it when it comes), or unwanted
                // with the removal already under way.
                _ => {}
            }
        }
        request
    }

    /// The guest's `_EJ0` for the selected vCPU.
    fn eject(&mut self, index: u32) {
        let Some(pending) = self.pending.get(index as usize).copied() else {
            return;
        };
        if !self.slots.is_plugged(index) {
            return;
        }
        let result = if index == 0 {
            Err(CpuHotplugError::BootVcpu)
        } else {
            self.slots.unplug(index)
        };
        match result {
            Ok(()) => {
                if pending != Pending::EjectAwaited {
                    log_limited!(
                        Level::Warn,
                        "Guest ejected vCPU {index} without a removal request"
                    );
                }
                self.pending[index as usize] = Pending::None;
                // A target changed while the removal was under way may want it back.
                let request = self.reconcile();
                if request.announces() {
                    if let Err(e) = self
                        .ged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .raise(EVENT_CPU_HOTPLUG)
                    {
                        log_limited!(
                            Level::Error,
                            "vCPU {index} ejected; cannot announce the re-plug: {e}"
                        );
                    }
                }
            }
            Err(e) => {
                // A guest bug: keep the vCPU plugged; the next target change asks again.
                log_limited!(
                    Level::Error,
                    "Refusing the guest's eject of vCPU {index}: {e}"
                );
                self.pending[index as usize] = Pending::None;
            }
        }
    }

    fn flags(&self, index: u32) -> u32 {
        let Some(pending) = self.pending.get(index as usize) else {
            return 0;
        };
        let mut flags = 0;
        if self.slots.is_plugged(index) {
            flags |= FLAG_ENABLED;
        }
        match pending {
            Pending::Inserting => flags |= FLAG_INSERTING,
            Pending::Removing => flags |= FLAG_REMOVING,
            Pending::None | Pending::EjectAwaited => {}
        }
        flags
    }

    fn write_flags(&mut self, value: u32) {
        let index = self.selected;
        let Some(pending) = self.pending.get_mut(index as usize) else {
            return;
        };
        if value & FLAG_INSERTING != 0 && *pending == Pending::Inserting {
            *pending = Pending::None;
        }
        if value & FLAG_REMOVING != 0 && *pending == Pending::Removing {
            *pending = Pending::EjectAwaited;
        }
        if value & FLAG_EJECT != 0 {
            self.eject(index);
        }
    }

    fn next_event(&self) -> u32 {
        (0u32..)
            .zip(&self.pending)
            .find(|(_, p)| matches!(p, Pending::Inserting | Pending::Removing))
            .map_or(NO_EVENT, |(i, _)| i)
    }

    fn bad_access(&self, what: &str, offset: u64, len: usize) {
        log_limited!(
            Level::Warn,
            "Ignoring a {len}-byte CPU hotplug {what} at offset {offset:#x}"
        );
    }
}

impl MmioDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return self.bad_access("read", offset, data.len());
        }
        let value = match offset {
            REG_SELECT => self.selected,
            REG_FLAGS => {
                let flags = self.flags(self.selected);
                if flags & FLAG_ENABLED != 0 {
                    self.slots.seen_enabled(self.selected);
                }
                flags
            }
            REG_NEXT => self.next_event(),
            REG_COUNT => self.slots.count(),
            _ => return self.bad_access("read", offset, data.len()),
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.bad_access("write", offset, data.len());
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_SELECT => self.selected = value,
            REG_FLAGS => self.write_flags(value),
            _ => self.bad_access("write", offset, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::ged::Ged;
    use crate::devices::irq::IrqLine;

    /// A vCPU table without KVM: plugged flags, and which vCPUs "run".
    struct Table {
        plugged: Mutex<Vec<bool>>,
        running: Mutex<Vec<bool>>,
        seen: Mutex<Vec<bool>>,
    }

    impl Table {
        fn new(count: usize, plugged: usize) -> Arc<Self> {
            Arc::new(Self {
                plugged: Mutex::new((0..count).map(|i| i < plugged).collect()),
                running: Mutex::new(vec![false; count]),
                seen: Mutex::new((0..count).map(|i| i < plugged).collect()),
            })
        }

        fn plugged(&self) -> Vec<u32> {
            (0u32..)
                .zip(self.plugged.lock().unwrap().iter())
                .filter(|(_, p)| **p)
                .map(|(i, _)| i)
                .collect()
        }
    }

    impl CpuSlots for Table {
        fn count(&self) -> u32 {
            self.plugged.lock().unwrap().len() as u32
        }
        fn is_plugged(&self, index: u32) -> bool {
            self.plugged.lock().unwrap()[index as usize]
        }
        fn plug(&self, index: u32) {
            self.plugged.lock().unwrap()[index as usize] = true;
            self.seen.lock().unwrap()[index as usize] = false;
        }
        fn unplug(&self, index: u32) -> Result<(), CpuHotplugError> {
            if self.running.lock().unwrap()[index as usize] {
                return Err(CpuHotplugError::StillRunning(index));
            }
            self.plugged.lock().unwrap()[index as usize] = false;
            Ok(())
        }
        fn seen_enabled(&self, index: u32) {
            self.seen.lock().unwrap()[index as usize] = true;
        }
    }

    struct Rig {
        table: Arc<Table>,
        ged: SharedGed,
        hp: CpuHotplug,
    }

    fn rig(count: usize, plugged: usize) -> Rig {
        let table = Table::new(count, plugged);
        let ged = Arc::new(Mutex::new(Ged::new(IrqLine::new(2).unwrap())));
        let hp = CpuHotplug::new(table.clone(), ged.clone(), plugged as u32);
        Rig { table, ged, hp }
    }

    fn read(hp: &mut CpuHotplug, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        hp.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(hp: &mut CpuHotplug, offset: u64, value: u32) {
        hp.write(offset, &value.to_le_bytes());
    }

    fn flags_of(hp: &mut CpuHotplug, index: u32) -> u32 {
        write(hp, REG_SELECT, index);
        read(hp, REG_FLAGS)
    }

    /// What the guest's CSCN method does: notify and acknowledge every pending event.
    fn guest_scan(hp: &mut CpuHotplug) -> Vec<(u32, u32)> {
        let mut notified = Vec::new();
        loop {
            let next = read(hp, REG_NEXT);
            if next == NO_EVENT {
                return notified;
            }
            write(hp, REG_SELECT, next);
            let flags = read(hp, REG_FLAGS);
            if flags & FLAG_INSERTING != 0 {
                notified.push((next, 1));
                write(hp, REG_FLAGS, FLAG_INSERTING);
            }
            if flags & FLAG_REMOVING != 0 {
                notified.push((next, 3));
                write(hp, REG_FLAGS, FLAG_REMOVING);
            }
        }
    }

    #[test]
    fn test_grow_plugs_lowest_unplugged_marks_them_inserting_and_raises_ged() {
        let mut r = rig(8, 1);
        let request = r.hp.set_target(3).unwrap();
        assert_eq!(request.plugging, [1, 2]);
        assert_eq!(r.table.plugged(), [0, 1, 2]);
        assert_eq!(flags_of(&mut r.hp, 1), FLAG_ENABLED | FLAG_INSERTING);
        assert_eq!(flags_of(&mut r.hp, 3), 0);
        assert_eq!(r.ged.lock().unwrap().pending(), EVENT_CPU_HOTPLUG);
        assert_eq!(guest_scan(&mut r.hp), [(1, 1), (2, 1)]);
        assert_eq!(read(&mut r.hp, REG_NEXT), NO_EVENT);
    }

    #[test]
    fn test_shrink_marks_highest_removing_and_eject_unplugs_synchronously() {
        let mut r = rig(8, 4);
        let request = r.hp.set_target(2).unwrap();
        assert_eq!(request.unplugging, [2, 3]);
        assert_eq!(guest_scan(&mut r.hp), [(2, 3), (3, 3)]);
        write(&mut r.hp, REG_SELECT, 3);
        write(&mut r.hp, REG_FLAGS, FLAG_EJECT);
        assert_eq!(read(&mut r.hp, REG_FLAGS), 0);
        assert_eq!(r.table.plugged(), [0, 1, 2]);
    }

    #[test]
    fn test_plugged_vcpu_is_seen_once_the_guest_reads_it_enabled() {
        let mut r = rig(4, 1);
        r.hp.set_target(2).unwrap();
        let before = r.table.seen.lock().unwrap()[1];
        flags_of(&mut r.hp, 1);
        flags_of(&mut r.hp, 2);
        assert!(!before);
        assert_eq!(*r.table.seen.lock().unwrap(), [true, true, false, false]);
    }

    #[test]
    fn test_new_target_raises_ged_again_while_events_are_pending() {
        let mut r = rig(4, 1);
        r.hp.set_target(2).unwrap();
        r.ged.lock().unwrap().read(0, &mut [0; 4]);
        let request = r.hp.set_target(2).unwrap();
        assert_eq!(request, HotplugRequest::default());
        assert_eq!(r.ged.lock().unwrap().pending(), EVENT_CPU_HOTPLUG);
    }

    #[test]
    fn test_invalid_targets_are_rejected_and_change_nothing() {
        let mut r = rig(8, 2);
        assert!(matches!(
            r.hp.set_target(0),
            Err(CpuHotplugError::InvalidTarget { target: 0, max: 8 })
        ));
        assert!(matches!(
            r.hp.set_target(9),
            Err(CpuHotplugError::InvalidTarget { target: 9, max: 8 })
        ));
        assert_eq!((r.hp.target(), r.table.plugged()), (2, vec![0, 1]));
        assert_eq!(r.ged.lock().unwrap().pending(), 0);
    }

    #[test]
    fn test_new_target_before_the_guest_scans_withdraws_unannounced_plugs() {
        let mut r = rig(8, 1);
        r.hp.set_target(4).unwrap();
        let request = r.hp.set_target(2).unwrap();
        assert_eq!(request.cancelled, [2, 3]);
        assert_eq!(r.table.plugged(), [0, 1]);
        assert_eq!(guest_scan(&mut r.hp), [(1, 1)]);
    }

    #[test]
    fn test_new_target_before_the_guest_scans_withdraws_unannounced_removals() {
        let mut r = rig(8, 4);
        r.hp.set_target(1).unwrap();
        let request = r.hp.set_target(3).unwrap();
        assert_eq!(request.cancelled, [1, 2]);
        assert_eq!(guest_scan(&mut r.hp), [(3, 3)]);
    }

    #[test]
    fn test_announced_plug_no_longer_wanted_becomes_a_removal() {
        let mut r = rig(4, 1);
        r.hp.set_target(2).unwrap();
        guest_scan(&mut r.hp);
        let request = r.hp.set_target(1).unwrap();
        assert_eq!(request.unplugging, [1]);
        assert_eq!(guest_scan(&mut r.hp), [(1, 3)]);
    }

    #[test]
    fn test_eject_of_a_vcpu_wanted_again_replugs_it_and_raises_ged() {
        let mut r = rig(4, 2);
        r.hp.set_target(1).unwrap();
        guest_scan(&mut r.hp);
        r.hp.set_target(2).unwrap();
        r.ged.lock().unwrap().read(0, &mut [0; 4]);
        write(&mut r.hp, REG_SELECT, 1);
        write(&mut r.hp, REG_FLAGS, FLAG_EJECT);
        assert_eq!(r.table.plugged(), [0, 1]);
        assert_eq!(flags_of(&mut r.hp, 1), FLAG_ENABLED | FLAG_INSERTING);
        assert_eq!(r.ged.lock().unwrap().pending(), EVENT_CPU_HOTPLUG);
    }

    #[test]
    fn test_eject_of_a_running_vcpu_or_vcpu0_is_refused() {
        let mut r = rig(4, 2);
        r.table.running.lock().unwrap()[1] = true;
        write(&mut r.hp, REG_SELECT, 1);
        write(&mut r.hp, REG_FLAGS, FLAG_EJECT);
        write(&mut r.hp, REG_SELECT, 0);
        write(&mut r.hp, REG_FLAGS, FLAG_EJECT);
        assert_eq!(r.table.plugged(), [0, 1]);
    }

    #[test]
    fn test_any_guest_access_is_harmless() {
        let mut r = rig(4, 2);
        for offset in [0u64, 1, 3, 4, 8, 0xc, 0x10, 0xffc, u64::MAX] {
            for len in [1usize, 2, 4, 8] {
                for value in [0u8, 0xff] {
                    write(&mut r.hp, REG_SELECT, u32::MAX);
                    r.hp.write(offset, &vec![value; len]);
                    let mut data = vec![0u8; len];
                    r.hp.read(offset, &mut data);
                }
            }
        }
        write(&mut r.hp, REG_SELECT, u32::MAX);
        write(&mut r.hp, REG_FLAGS, u32::MAX);
        assert_eq!(read(&mut r.hp, REG_FLAGS), 0);
        assert_eq!(read(&mut r.hp, REG_COUNT), 4);
        assert_eq!(r.table.plugged(), [0, 1]);
    }
}
