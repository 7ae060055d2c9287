//! ACPI tables for a firmware-less arm64 guest: RSDP → XSDT → FADT (→ DSDT), MADT, GTDT, SPCR.
//!
//! The tables are generated for a fixed guest address and come out as one contiguous blob, so the
//! caller copies it into RAM with one write and can dump each table for `iasl -d`.

mod aml_cpus;
mod dsdt;
mod fadt;
mod gtdt;
mod madt;
mod spcr;

pub use aml_cpus::{ProcessorDevice, STA_NOT_PLUGGED, STA_PLUGGED};
pub use dsdt::{GedDevice, SerialDevice, VirtioMmioDevice};

/// OEM ID written in every table header.
pub const OEM_ID: [u8; 6] = *b"ACCORD";
/// OEM table ID written in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"ACCORDVM";
/// OEM revision written in every table header.
pub const OEM_REVISION: u32 = 1;

/// Errors from laying out the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Too many vCPUs for a single table (the MADT length is a u32; far beyond KVM's limits).
    #[error("ACPI table {0} is too large")]
    TableTooLarge(&'static str),
}

/// One possible vCPU as ACPI describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuDesc {
    /// ACPI processor UID: the GICC's UID and the processor device's `_UID`.
    pub uid: u32,
    /// The vCPU's MPIDR_EL1 as KVM reports it.
    pub mpidr: u64,
    /// Plugged at boot (MADT Enabled) or not (Online Capable). `_STA` asks the hotplug controller.
    pub plugged: bool,
}

/// The GICv3 as the MADT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicDesc {
    /// Distributor base.
    pub gicd_base: u64,
    /// Redistributor region base.
    pub gicr_base: u64,
    /// Redistributor region length (all possible vCPUs).
    pub gicr_size: u32,
}

/// Where the vCPU hotplug hardware sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugDesc {
    /// MMIO base of the CPU hotplug controller (devices/cpu_hotplug.rs).
    pub controller_base: u64,
    /// MMIO base of the GED's event register (devices/ged.rs).
    pub ged_base: u64,
    /// GIC INTID of the GED's interrupt.
    pub ged_gsi: u32,
}

/// Everything the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Every possible vCPU, in vCPU index order.
    pub cpus: Vec<CpuDesc>,
    /// Interrupt controller.
    pub gic: GicDesc,
    /// The console UART (SPCR and DSDT).
    pub serial: SerialDevice,
    /// virtio-mmio transports present at boot.
    pub virtio: Vec<VirtioMmioDevice>,
    /// vCPU hotplug controller and GED.
    pub hotplug: HotplugDesc,
}

/// A generated table and where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    /// Four-character signature ("RSD PTR " for the RSDP is shortened to "RSDP").
    pub signature: String,
    /// Guest physical address.
    pub addr: u64,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// The tables laid out from a base address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    base: u64,
    tables: Vec<PlacedTable>,
}

impl AcpiTables {
    /// Generates every table for guest address `base` (8-byte aligned).
    pub fn build(config: &AcpiConfig, base: u64) -> Result<Self, AcpiError> {
        let dsdt = dsdt::dsdt(config)?;
        let madt = madt::madt(&config.cpus, &config.gic)?;
        let gtdt = gtdt::gtdt();
        let spcr = spcr::spcr(&config.serial);

        // Addresses are needed before the tables that point at them: RSDP, XSDT, then the rest.
        let xsdt_entries = 4; // FADT, MADT, GTDT, SPCR
        let rsdp_len = acpi_tables::rsdp::Rsdp::len();
        let xsdt_len = 36 + 8 * xsdt_entries;
        let mut cursor = base;
        let mut next = |len: usize| {
            let at = cursor;
            cursor = (cursor + len as u64).next_multiple_of(8);
            at
        };
        let rsdp_addr = next(rsdp_len);
        let xsdt_addr = next(xsdt_len);
        let fadt_addr = next(acpi_tables::fadt::FADT::len());
        let dsdt_addr = next(dsdt.len());
        let madt_addr = next(madt.len());
        let gtdt_addr = next(gtdt.len());
        let spcr_addr = next(spcr.len());

        let fadt = fadt::fadt(dsdt_addr);
        let xsdt = {
            let mut x = acpi_tables::xsdt::XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
            for addr in [fadt_addr, madt_addr, gtdt_addr, spcr_addr] {
                x.add_entry(addr);
            }
            to_bytes(&x)
        };
        let rsdp = to_bytes(&acpi_tables::rsdp::Rsdp::new(OEM_ID, xsdt_addr));
        debug_assert_eq!(xsdt.len(), xsdt_len);

        let placed = |signature: &str, addr: u64, bytes: Vec<u8>| PlacedTable {
            signature: signature.to_string(),
            addr,
            bytes,
        };
        Ok(Self {
            base,
            tables: vec![
                placed("RSDP", rsdp_addr, rsdp),
                placed("XSDT", xsdt_addr, xsdt),
                placed("FACP", fadt_addr, fadt),
                placed("DSDT", dsdt_addr, dsdt),
                placed("APIC", madt_addr, madt),
                placed("GTDT", gtdt_addr, gtdt),
                placed("SPCR", spcr_addr, spcr),
            ],
        })
    }

    /// Guest address of the RSDP (for the EFI configuration table).
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }

    /// Every table with its address, RSDP first.
    pub fn tables(&self) -> &[PlacedTable] {
        &self.tables
    }

    /// The tables as one blob starting at the base address (gaps zero-filled).
    pub fn blob(&self) -> Vec<u8> {
        let end = self
            .tables
            .iter()
            .map(|t| t.addr - self.base + t.bytes.len() as u64)
            .max()
            .unwrap_or(0);
        let mut blob = vec![0u8; end as usize];
        for t in &self.tables {
            let at = (t.addr - self.base) as usize;
            blob[at..at + t.bytes.len()].copy_from_slice(&t.bytes);
        }
        blob
    }

    /// Writes each table to `dir` as `<SIG>.dat` (the names acpixtract produces), for inspection
    /// with `iasl -d`.
    pub fn dump(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for t in &self.tables {
            std::fs::write(
                dir.join(format!("{}.dat", t.signature.to_lowercase())),
                &t.bytes,
            )?;
        }
        Ok(())
    }
}

/// Serialises any acpi_tables object.
fn to_bytes(aml: &dyn acpi_tables::Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Recomputes a table's checksum (byte 9) after patching its header.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

#[cfg(test)]
mod tests;
