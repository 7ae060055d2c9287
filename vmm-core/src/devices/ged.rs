//! The ACPI Generic Event Device (`ACPI0013`, Linux drivers/acpi/evged.c): one edge-triggered SPI
//! and one event register. The VMM sets event bits and pulses the line; the guest's `_EVT` method
//! reads the register (which clears it) and runs the handler of each bit, e.g. the CPU hotplug
//! scan.
//!
//! Edge rather than level: KVM's irqfd pulses the SPI once per trigger, the GIC latches the edge
//! even while evged's threaded handler has the line masked, and nothing needs a resample.

use std::sync::{Arc, Mutex};

use vm_superio::Trigger;

use super::irq::IrqLine;
use crate::bus::MmioDevice;

/// Offset of the event register (32 bits, read-to-clear).
pub const REG_EVENTS: u64 = 0x0;
/// Bytes of registers the DSDT's operation region covers.
pub const REGISTER_BLOCK_SIZE: u32 = 4;

/// Event bit: a vCPU is being plugged or unplugged; `_EVT` runs the CPU scan (`CSCN`).
pub const EVENT_CPU_HOTPLUG: u32 = 1 << 0;

/// Errors from raising an event.
#[derive(Debug, thiserror::Error)]
pub enum GedError {
    /// The interrupt eventfd could not be written.
    #[error("Cannot raise the GED interrupt")]
    Trigger(#[source] std::io::Error),
}

/// The GED's registers and interrupt line.
pub struct Ged {
    irq: IrqLine,
    pending: u32,
}

/// A GED shared between the bus and whoever raises events.
pub type SharedGed = Arc<Mutex<Ged>>;

impl Ged {
    /// A GED raising `irq`.
    pub fn new(irq: IrqLine) -> Self {
        Self { irq, pending: 0 }
    }

    /// Latches `events` and pulses the interrupt.
    pub fn raise(&mut self, events: u32) -> Result<(), GedError> {
        self.pending |= events;
        self.irq.trigger().map_err(GedError::Trigger)
    }

    /// Events latched and not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.pending
    }
}

impl MmioDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Only an aligned 32-bit read of the event register returns (and clears) the events, so a
        // stray narrow read cannot swallow half of them.
        if offset == REG_EVENTS && data.len() == 4 {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable; a guest writing here is confused, not dangerous.
        crate::log_limited!(
            log::Level::Debug,
            "Ignoring a {}-byte GED write at offset {offset:#x}",
            data.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ged() -> Ged {
        Ged::new(IrqLine::new(2).unwrap())
    }

    #[test]
    fn test_raise_latches_events_and_pulses_the_line() {
        let mut ged = ged();
        ged.raise(EVENT_CPU_HOTPLUG).unwrap();
        ged.raise(EVENT_CPU_HOTPLUG).unwrap();
        assert_eq!(ged.pending(), EVENT_CPU_HOTPLUG);
        assert_eq!(ged.irq.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn test_read_of_event_register_returns_and_clears_events() {
        let mut ged = ged();
        ged.raise(EVENT_CPU_HOTPLUG).unwrap();
        let mut data = [0u8; 4];
        ged.read(REG_EVENTS, &mut data);
        assert_eq!(u32::from_le_bytes(data), EVENT_CPU_HOTPLUG);
        ged.read(REG_EVENTS, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn test_narrow_or_misplaced_reads_return_zero_and_keep_events() {
        let mut ged = ged();
        ged.raise(EVENT_CPU_HOTPLUG).unwrap();
        let mut byte = [0xffu8; 1];
        ged.read(REG_EVENTS, &mut byte);
        let mut far = [0xffu8; 8];
        ged.read(0xff8, &mut far);
        ged.write(0, &[0xff; 4]);
        assert_eq!((byte, far), ([0], [0; 8]));
        assert_eq!(ged.pending(), EVENT_CPU_HOTPLUG);
    }
}
