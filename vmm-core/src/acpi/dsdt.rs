//! DSDT: one ACPI0007 processor device per possible vCPU, the console UART and the virtio-mmio
//! transports, all under `\_SB`. Each ACPI object is a small type implementing `Aml`.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Method, Name, Path, ResourceTemplate, Return,
    Scope, ONE,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::{AcpiConfig, AcpiError, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

const DSDT_REVISION: u8 = 2;
/// `_STA`: present, enabled, shown in UI, functioning.
const STA_PLUGGED: u8 = 0x0f;
/// `_STA`: present but not enabled; Linux keeps the CPU possible but not usable.
const STA_NOT_PLUGGED: u8 = 0x01;

/// An ACPI0007 processor device. `_UID` equals the GICC's ACPI processor UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessorDevice {
    /// ACPI processor UID.
    pub uid: u32,
    /// Whether `_STA` reports the CPU enabled.
    pub plugged: bool,
}

impl ProcessorDevice {
    /// The device's 4-character name, `C000`..`CFFF`.
    pub fn name(&self) -> String {
        format!("C{:03X}", self.uid & 0xfff)
    }
}

impl Aml for ProcessorDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let sta = if self.plugged {
            STA_PLUGGED
        } else {
            STA_NOT_PLUGGED
        };
        Device::new(
            Path::new(&self.name()),
            vec![
                &Name::new("_HID".into(), &"ACPI0007"),
                &Name::new("_UID".into(), &self.uid),
                &Method::new("_STA".into(), 0, false, vec![&Return::new(&sta)]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// The 16550 console UART (`PNP0501`; Linux binds it with 8250_pnp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialDevice {
    /// MMIO base.
    pub base: u64,
    /// MMIO length.
    pub size: u32,
    /// GIC INTID (SPI + 32).
    pub gsi: u32,
}

impl Aml for SerialDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mem = Memory32Fixed::new(true, low32(self.base), self.size);
        // Edge: the VMM pulses the line through an irqfd.
        let irq = Interrupt::new(true, true, false, false, self.gsi);
        Device::new(
            "COM0".into(),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0501")),
                &Name::new("_UID".into(), &0u8),
                &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq])),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// A virtio-mmio transport (`LNRO0005`, bound by virtio_mmio).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Slot index, used for the name and `_UID`.
    pub slot: u32,
    /// MMIO base.
    pub base: u64,
    /// MMIO length.
    pub size: u32,
    /// GIC INTID (SPI + 32).
    pub gsi: u32,
}

impl Aml for VirtioMmioDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mem = Memory32Fixed::new(true, low32(self.base), self.size);
        let irq = Interrupt::new(true, true, false, false, self.gsi);
        let name = format!("V{:03X}", self.slot & 0xfff);
        Device::new(
            Path::new(&name),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &self.slot),
                // DMA is cache coherent: guest and VMM share ordinary RAM.
                &Name::new("_CCA".into(), &ONE),
                &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq])),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// All devices live below 4 GiB (see layout.rs), so Memory32Fixed can describe them.
fn low32(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

/// Builds the DSDT.
pub fn dsdt(config: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if config.cpus.len() > 0x1000 {
        return Err(AcpiError::TableTooLarge("DSDT"));
    }
    let processors: Vec<ProcessorDevice> = config
        .cpus
        .iter()
        .map(|c| ProcessorDevice {
            uid: c.uid,
            plugged: c.plugged,
        })
        .collect();
    let mut children: Vec<&dyn Aml> = Vec::new();
    children.extend(processors.iter().map(|p| p as &dyn Aml));
    children.push(&config.serial);
    children.extend(config.virtio.iter().map(|v| v as &dyn Aml));
    let mut body = Vec::new();
    Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);

    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(&body);
    Ok(table.as_slice().to_vec())
}
