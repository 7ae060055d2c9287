//! SPCR: tells Linux which UART is the console (and its earlycon). acpi_tables only has the
//! RISC-V SBI flavour, so the ARM one is laid out by hand on the generic `Sdt` (revision 2).

use acpi_tables::sdt::Sdt;

use super::{SerialDevice, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

const SPCR_REVISION: u8 = 2;
const SPCR_LENGTH: u32 = 80;
/// DBG2 port subtype 0x0000: full 16550.
const INTERFACE_16550: u8 = 0;
/// Interrupt type bit 3: ARMH GIC interrupt.
const INTERRUPT_TYPE_GIC: u8 = 1 << 3;
/// 115200 baud.
const BAUD_115200: u8 = 7;

/// Builds the SPCR for the 16550 console.
pub fn spcr(serial: &SerialDevice) -> Vec<u8> {
    let mut t = Sdt::new(
        *b"SPCR",
        SPCR_LENGTH,
        SPCR_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_u8(36, INTERFACE_16550);
    // Base address, a Generic Address Structure: system memory, 8-bit registers, byte access.
    t.write_u8(40, 0); // address space: system memory
    t.write_u8(41, 8); // register bit width
    t.write_u8(42, 0); // register bit offset
    t.write_u8(43, 1); // access size: byte
    t.write_u64(44, serial.base);
    t.write_u8(52, INTERRUPT_TYPE_GIC);
    t.write_u32(54, serial.gsi);
    t.write_u8(58, BAUD_115200);
    t.write_u8(59, 0); // no parity
    t.write_u8(60, 1); // one stop bit
    t.write_u8(61, 0); // no flow control
    t.write_u8(62, 0); // terminal: VT100
    t.write_u16(64, 0xffff); // not a PCI device
    t.write_u16(66, 0xffff);
    t.as_slice().to_vec()
}
