//! DSDT: one ACPI0007 processor device per possible vCPU with the CPU hotplug methods
//! (aml_cpus.rs), the GED that announces hotplug events, the console UART and the virtio-mmio
//! transports, all under `\_SB`. Each ACPI object is a small type implementing `Aml`.

use acpi_tables::aml::{
    And, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, MethodCall, Name, OpRegion,
    OpRegionSpace, Path, ResourceTemplate, Scope, Store, ONE,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::aml_cpus::{CpuHotplugMethods, ProcessorDevice, SCAN_METHOD};
use super::{AcpiConfig, AcpiError, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::ged::{EVENT_CPU_HOTPLUG, REGISTER_BLOCK_SIZE as GED_REGISTER_BLOCK_SIZE};

const DSDT_REVISION: u8 = 2;

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

/// The Generic Event Device (`ACPI0013`, bound by Linux's evged): its interrupt runs `_EVT`, which
/// reads (and so clears) the event register and runs the CPU scan for the hotplug bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GedDevice {
    /// MMIO base of the event register.
    pub base: u64,
    /// GIC INTID (SPI + 32).
    pub gsi: u32,
}

impl Aml for GedDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Edge: the VMM pulses the line through an irqfd once per event (devices/ged.rs).
        let irq = Interrupt::new(true, true, false, false, self.gsi);
        let base = low32(self.base);
        let region = OpRegion::new(
            "GDRG".into(),
            OpRegionSpace::SystemMemory,
            &base,
            &GED_REGISTER_BLOCK_SIZE,
        );
        let field = Field::new(
            "GDRG".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![FieldEntry::Named(*b"GEVT", 32)],
        );
        let events = Path::new("GEVT");
        let read = Store::new(&Local(0), &events);
        let cpu_bit = And::new(&Local(1), &Local(0), &EVENT_CPU_HOTPLUG);
        let is_cpu = Equal::new(&cpu_bit, &EVENT_CPU_HOTPLUG);
        let scan = MethodCall::new(SCAN_METHOD.into(), vec![]);
        let on_cpu = If::new(&is_cpu, vec![&scan]);
        Device::new(
            "GED0".into(),
            vec![
                &Name::new("_HID".into(), &"ACPI0013"),
                &Name::new("_UID".into(), &0u8),
                &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq])),
                &region,
                &field,
                &Method::new("_EVT".into(), 1, false, vec![&read, &on_cpu]),
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
        .map(|c| ProcessorDevice { uid: c.uid })
        .collect();
    let hotplug = CpuHotplugMethods {
        base: low32(config.hotplug.controller_base),
        count: config.cpus.len() as u32,
    };
    let ged = GedDevice {
        base: config.hotplug.ged_base,
        gsi: config.hotplug.ged_gsi,
    };
    let mut children: Vec<&dyn Aml> = vec![&hotplug];
    children.extend(processors.iter().map(|p| p as &dyn Aml));
    children.push(&ged);
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
