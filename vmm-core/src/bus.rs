//! The MMIO bus: a vCPU's MMIO exit → the device whose range holds the address → its register.
//!
//! Devices see offsets from their base. Accesses nobody claims are ignored (reads return zeros),
//! as real buses with no decoder there would do; they are counted, and logged at a limited rate
//! (a guest can make them at will).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::Level;

use crate::log_limited;

/// A device with MMIO registers.
pub trait MmioDevice: Send {
    /// Fills `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between vCPU threads.
pub type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

/// Errors from building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("MMIO range of {new} at {base:#x} overlaps {existing}")]
    Overlap {
        /// Device being added.
        new: String,
        /// Device already there.
        existing: String,
        /// Base of the new range.
        base: u64,
    },
    /// A zero-sized or wrapping range.
    #[error("MMIO range of {0} is empty or wraps")]
    BadRange(String),
}

struct Range {
    base: u64,
    size: u64,
    name: String,
    device: SharedDevice,
}

/// The MMIO bus.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
    unknown: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + size)`.
    pub fn insert(
        &mut self,
        name: &str,
        base: u64,
        size: u64,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or_else(|| BusError::BadRange(name.into()))?;
        if let Some(r) = self
            .ranges
            .iter()
            .find(|r| base < r.base + r.size && r.base < end)
        {
            return Err(BusError::Overlap {
                new: name.into(),
                existing: r.name.clone(),
                base,
            });
        }
        self.ranges.push(Range {
            base,
            size,
            name: name.into(),
            device,
        });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&Range, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[idx];
        let offset = addr - r.base;
        (offset + len as u64 <= r.size).then_some((r, offset))
    }

    /// Handles a guest read; unclaimed reads return zeros.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((r, offset)) => lock(&r.device).read(offset, data),
            None => {
                data.fill(0);
                self.log_unknown("read", addr, data.len());
            }
        }
    }

    /// Handles a guest write; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((r, offset)) => lock(&r.device).write(offset, data),
            None => self.log_unknown("write", addr, data.len()),
        }
    }

    fn log_unknown(&self, what: &str, addr: u64, len: usize) {
        self.unknown.fetch_add(1, Ordering::Relaxed);
        log_limited!(
            Level::Warn,
            "Ignoring guest MMIO {what} of {len} bytes at {addr:#x}: no device there"
        );
    }

    /// Number of unclaimed accesses so far.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }
}

/// A device's lock; a panic in another vCPU thread must not take this one down with it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn MmioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the low byte of the offset.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl MmioDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus_with_probe() -> (Bus, Arc<Mutex<Probe>>) {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert("probe", 0x1000, 0x100, probe.clone()).unwrap();
        (bus, probe)
    }

    #[test]
    fn test_write_reaches_device_at_offset_from_its_base() {
        let (bus, probe) = bus_with_probe();
        bus.write(0x1010, &[7, 8]);
        assert_eq!(probe.lock().unwrap().writes, vec![(0x10, vec![7, 8])]);
    }

    #[test]
    fn test_read_returns_device_data() {
        let (bus, _) = bus_with_probe();
        let mut data = [0u8; 4];
        bus.read(0x1020, &mut data);
        assert_eq!(data, [0x20; 4]);
    }

    #[test]
    fn test_unclaimed_reads_return_zeros_and_are_counted() {
        let (bus, _) = bus_with_probe();
        let mut data = [0xffu8; 4];
        bus.read(0x5000, &mut data);
        bus.read(0x5000, &mut data);
        assert_eq!(data, [0; 4]);
        assert_eq!(bus.unknown_accesses(), 2);
    }

    #[test]
    fn test_access_straddling_the_end_of_a_range_is_unclaimed() {
        let (bus, probe) = bus_with_probe();
        bus.write(0x10fe, &[1, 2, 3, 4]);
        assert!(probe.lock().unwrap().writes.is_empty());
        assert_eq!(bus.unknown_accesses(), 1);
    }

    #[test]
    fn test_overlapping_insert_is_rejected() {
        let (mut bus, probe) = bus_with_probe();
        let err = bus.insert("other", 0x10f0, 0x100, probe).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap {
                new: "other".into(),
                existing: "probe".into(),
                base: 0x10f0
            }
        );
    }
}
