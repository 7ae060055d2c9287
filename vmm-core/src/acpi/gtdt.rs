//! GTDT: the architected timer's interrupts. acpi_tables has no GTDT, so it is laid out by hand
//! on the generic `Sdt` (ACPI 6.5 §5.2.25, revision 3).

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::arch::aarch64::layout::{
    TIMER_HYP_INTID, TIMER_NONSECURE_PHYS_INTID, TIMER_SECURE_PHYS_INTID, TIMER_VIRT_INTID,
};

const GTDT_REVISION: u8 = 3;
const GTDT_LENGTH: u32 = 104;
/// "Not provided" for CntControlBase and CntReadBase (the guest has no memory-mapped timer).
const NO_ADDRESS: u64 = u64::MAX;
/// Timer interrupt flags: level triggered, active high (how KVM drives the timer PPIs).
const TIMER_FLAGS_LEVEL_HIGH: u32 = 0;

/// Builds the GTDT.
pub fn gtdt() -> Vec<u8> {
    let mut t = Sdt::new(
        *b"GTDT",
        GTDT_LENGTH,
        GTDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_u64(36, NO_ADDRESS); // CntControlBase
    t.write_u32(48, TIMER_SECURE_PHYS_INTID);
    t.write_u32(52, TIMER_FLAGS_LEVEL_HIGH);
    t.write_u32(56, TIMER_NONSECURE_PHYS_INTID);
    t.write_u32(60, TIMER_FLAGS_LEVEL_HIGH);
    t.write_u32(64, TIMER_VIRT_INTID);
    t.write_u32(68, TIMER_FLAGS_LEVEL_HIGH);
    t.write_u32(72, TIMER_HYP_INTID);
    t.write_u32(76, TIMER_FLAGS_LEVEL_HIGH);
    t.write_u64(80, NO_ADDRESS); // CntReadBase
    t.write_u32(88, 0); // no platform timers
    t.write_u32(92, GTDT_LENGTH); // platform timer offset: end of table
                                  // Virtual EL2 timer (offsets 96, 100): 0 = not provided, the guest has no EL2.
    t.as_slice().to_vec()
}
