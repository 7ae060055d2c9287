//! MADT: the GICv3 distributor, one redistributor range covering every possible vCPU, and one
//! GICC per possible vCPU. Plugged vCPUs are Enabled; the rest are Online Capable, which is how
//! Linux (Documentation/arch/arm64/cpu-hotplug.rst) learns they may appear later.

use acpi_tables::madt::{
    EnabledStatus, GicVersion, Gicc, Gicd, Gicr, LocalInterruptController, MADT,
};

use super::{
    fix_checksum, to_bytes, AcpiError, CpuDesc, GicDesc, OEM_ID, OEM_REVISION, OEM_TABLE_ID,
};

/// ACPI 6.3 introduced the Online Capable flag with MADT revision 5; acpi_tables writes 1.
const MADT_REVISION: u8 = 5;
/// MPIDR affinity fields (Aff3, Aff2, Aff1, Aff0): the GICC's MPIDR must not carry other bits.
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Builds the MADT.
pub fn madt(cpus: &[CpuDesc], gic: &GicDesc) -> Result<Vec<u8>, AcpiError> {
    // Header (44) + GICD (24) + GICR (16) + 82 per GICC must fit the u32 length.
    if cpus.len() > 1 << 20 {
        return Err(AcpiError::TableTooLarge("APIC"));
    }
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(0),
    );
    madt.add_structure(Gicd::new(0, gic.gicd_base, GicVersion::GICv3));
    madt.add_structure(Gicr::new(gic.gicr_base, gic.gicr_size));
    for cpu in cpus {
        let status = if cpu.plugged {
            EnabledStatus::Enabled
        } else {
            EnabledStatus::DisabledOnlineCapable
        };
        // GICv3: no CPU interface frames and no per-CPU GICR (the GICR structure covers them).
        madt.add_structure(
            Gicc::new(status)
                .cpu_interface_number(cpu.uid)
                .acpi_processor_uid(cpu.uid)
                .mpidr(cpu.mpidr & MPIDR_AFFINITY_MASK),
        );
    }
    let mut bytes = to_bytes(&madt);
    bytes[8] = MADT_REVISION;
    fix_checksum(&mut bytes);
    Ok(bytes)
}
