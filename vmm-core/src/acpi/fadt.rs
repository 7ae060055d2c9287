//! FADT: a hardware-reduced ACPI platform whose CPUs are managed through PSCI over HVC.

use acpi_tables::fadt::{FADTBuilder, Flags};

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// ARM boot architecture flags: PSCI_COMPLIANT | PSCI_USE_HVC (KVM's PSCI conduit is HVC).
const ARM_BOOT_ARCH_PSCI_HVC: u16 = 0x1 | 0x2;

/// Builds the FADT (revision 6.5) pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    builder.arm_boot_arch = ARM_BOOT_ARCH_PSCI_HVC.into();
    to_bytes(&builder.finalize())
}
