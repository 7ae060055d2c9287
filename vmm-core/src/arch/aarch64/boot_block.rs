//! The boot block: the top `BOOT_BLOCK_SIZE` bytes of RAM, holding what firmware would have left
//! for the kernel — EFI system table and memory map, the stub DTB, and the ACPI tables. The EFI
//! memory map marks it ACPI Reclaim, so the kernel keeps it intact.
//!
//! ```text
//! +0x0000  EFI system table, then the firmware vendor string
//! +0x0100  EFI configuration tables
//! +0x0180  RT_PROPERTIES table (+ MEMRESERVE root when there is an ITS)
//! +0x0200  EFI memory map
//! +0x1000  stub DTB (at most 60 KiB)
//! +0x10000 ACPI tables (RSDP first)
//! ```

use super::efi::{self, Guid};
use super::fdt::{self, Chosen, FdtError};
use super::layout::BOOT_BLOCK_SIZE;
use crate::acpi::{AcpiConfig, AcpiError, AcpiTables};

const VENDOR_OFFSET: u64 = 0x80;
const CONFIG_TABLES_OFFSET: u64 = 0x100;
const RT_PROPERTIES_OFFSET: u64 = 0x180;
const MEMRESERVE_OFFSET: u64 = 0x190;
const MEMORY_MAP_OFFSET: u64 = 0x200;
const DTB_OFFSET: u64 = 0x1000;
const ACPI_OFFSET: u64 = 0x1_0000;
const FIRMWARE_VENDOR: &str = "Accordion";

/// Errors from building the boot block.
#[derive(Debug, thiserror::Error)]
pub enum BootBlockError {
    /// The DTB could not be built.
    #[error("Cannot build the stub device tree")]
    Fdt(#[from] FdtError),
    /// The ACPI tables could not be built.
    #[error("Cannot build the ACPI tables")]
    Acpi(#[from] AcpiError),
    /// A part outgrew its slot in the block.
    #[error("The {0} does not fit in the boot block")]
    TooLarge(&'static str),
}

/// What goes into the boot block.
#[derive(Debug, Clone)]
pub struct BootBlockSpec<'a> {
    /// First byte of RAM.
    pub ram_base: u64,
    /// One past the last byte of RAM.
    pub ram_end: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Initrd range [start, end).
    pub initrd: Option<(u64, u64)>,
    /// The machine ACPI describes.
    pub acpi: &'a AcpiConfig,
    /// Whether the MADT has a GIC ITS (then Linux needs a MEMRESERVE table).
    pub has_its: bool,
}

/// The built block.
#[derive(Debug, Clone)]
pub struct BootBlock {
    /// Guest address of its first byte.
    pub base: u64,
    /// Its contents, to be copied to `base`.
    pub bytes: Vec<u8>,
    /// Guest address of the DTB (x0 for the boot vCPU).
    pub dtb_addr: u64,
    /// The ACPI tables inside it (for dumping).
    pub acpi: AcpiTables,
}

impl BootBlock {
    /// Lays out the block at the top of RAM.
    pub fn build(spec: &BootBlockSpec<'_>) -> Result<Self, BootBlockError> {
        let base = spec.ram_end - BOOT_BLOCK_SIZE;
        let mut bytes = vec![0u8; ACPI_OFFSET as usize];
        let mut put = |offset: u64, data: &[u8]| {
            let at = offset as usize;
            bytes[at..at + data.len()].copy_from_slice(data);
        };

        let acpi = AcpiTables::build(spec.acpi, base + ACPI_OFFSET)?;

        let mut config = vec![
            (efi::ACPI_20_TABLE_GUID, acpi.rsdp_addr()),
            (efi::RT_PROPERTIES_TABLE_GUID, base + RT_PROPERTIES_OFFSET),
        ];
        if spec.has_its {
            config.push((efi::MEMRESERVE_TABLE_GUID, base + MEMRESERVE_OFFSET));
            put(MEMRESERVE_OFFSET, &efi::memreserve_root());
        }
        let config_tables: Vec<u8> = efi::config_tables(&config);
        debug_assert!(config_tables.len() as u64 <= RT_PROPERTIES_OFFSET - CONFIG_TABLES_OFFSET);
        put(
            0,
            &efi::system_table(
                base + VENDOR_OFFSET,
                base + CONFIG_TABLES_OFFSET,
                config.len() as u64,
            ),
        );
        put(VENDOR_OFFSET, &efi::ucs2(FIRMWARE_VENDOR));
        put(CONFIG_TABLES_OFFSET, &config_tables);
        put(RT_PROPERTIES_OFFSET, &efi::rt_properties_table());

        let memory_map = efi::memory_map(spec.ram_base, base, spec.ram_end);
        put(MEMORY_MAP_OFFSET, &memory_map);

        let dtb = fdt::stub_fdt(&Chosen {
            bootargs: spec.cmdline,
            initrd: spec.initrd,
            efi_system_table: base,
            efi_mmap_start: base + MEMORY_MAP_OFFSET,
            efi_mmap_size: memory_map.len() as u32,
            efi_mmap_desc_size: efi::MEMORY_DESCRIPTOR_SIZE as u32,
            efi_mmap_desc_ver: efi::MEMORY_DESCRIPTOR_VERSION,
        })?;
        if dtb.len() as u64 > ACPI_OFFSET - DTB_OFFSET {
            return Err(BootBlockError::TooLarge("device tree"));
        }
        put(DTB_OFFSET, &dtb);

        let blob = acpi.blob();
        if ACPI_OFFSET + blob.len() as u64 > BOOT_BLOCK_SIZE {
            return Err(BootBlockError::TooLarge("ACPI tables"));
        }
        bytes.extend_from_slice(&blob);
        Ok(Self {
            base,
            bytes,
            dtb_addr: base + DTB_OFFSET,
            acpi,
        })
    }
}

/// The GUIDs a boot block's system table lists, in order (tests and diagnostics).
pub fn config_table_guids(block: &BootBlock) -> Vec<Guid> {
    let b = &block.bytes;
    let nr = u64::from_le_bytes(b[104..112].try_into().unwrap_or_default()) as usize;
    (0..nr.min(8))
        .filter_map(|i| {
            let at = CONFIG_TABLES_OFFSET as usize + i * efi::CONFIG_TABLE_ENTRY_SIZE;
            let g: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
            Some(Guid::from_bytes(g))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::{CpuDesc, GicDesc, HotplugDesc, SerialDevice};

    fn acpi_config(possible: u32) -> AcpiConfig {
        AcpiConfig {
            cpus: (0..possible)
                .map(|i| CpuDesc {
                    uid: i,
                    mpidr: u64::from(i),
                    plugged: i == 0,
                })
                .collect(),
            gic: GicDesc {
                gicd_base: 0x0800_0000,
                gicr_base: 0x0810_0000,
                gicr_size: possible * 0x2_0000,
            },
            serial: SerialDevice {
                base: 0x0d00_0000,
                size: 0x1000,
                gsi: 33,
            },
            virtio: vec![],
            hotplug: HotplugDesc {
                controller_base: 0x0d00_3000,
                ged_base: 0x0d00_2000,
                ged_gsi: 34,
            },
        }
    }

    fn u64_at(b: &[u8], at: u64) -> u64 {
        u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
    }

    #[test]
    fn test_boot_block_sits_at_top_of_ram_with_system_table_first() {
        let acpi = acpi_config(4);
        let spec = BootBlockSpec {
            ram_base: 0x4000_0000,
            ram_end: 0x5000_0000,
            cmdline: "quiet",
            initrd: None,
            acpi: &acpi,
            has_its: false,
        };
        let block = BootBlock::build(&spec).unwrap();
        assert_eq!(block.base, 0x4fe0_0000);
        assert_eq!(&block.bytes[0..8], b"IBI SYST");
        assert_eq!(block.dtb_addr, 0x4fe0_1000);
        assert_eq!(&block.bytes[0x1000..0x1004], &[0xd0, 0x0d, 0xfe, 0xed]);
    }

    #[test]
    fn test_config_tables_point_at_rsdp_and_rt_properties_without_memreserve() {
        let acpi = acpi_config(4);
        let spec = BootBlockSpec {
            ram_base: 0x4000_0000,
            ram_end: 0x5000_0000,
            cmdline: "quiet",
            initrd: None,
            acpi: &acpi,
            has_its: false,
        };
        let block = BootBlock::build(&spec).unwrap();
        assert_eq!(
            config_table_guids(&block),
            vec![efi::ACPI_20_TABLE_GUID, efi::RT_PROPERTIES_TABLE_GUID]
        );
        let rsdp = u64_at(&block.bytes, CONFIG_TABLES_OFFSET + 16);
        let at = (rsdp - block.base) as usize;
        assert_eq!(&block.bytes[at..at + 8], b"RSD PTR ");
        let rt = u64_at(&block.bytes, CONFIG_TABLES_OFFSET + 24 + 16) - block.base;
        assert_eq!(
            &block.bytes[rt as usize..rt as usize + 8],
            &efi::rt_properties_table()
        );
    }

    #[test]
    fn test_its_adds_a_memreserve_config_table() {
        let acpi = acpi_config(1);
        let spec = BootBlockSpec {
            ram_base: 0x4000_0000,
            ram_end: 0x5000_0000,
            cmdline: "",
            initrd: None,
            acpi: &acpi,
            has_its: true,
        };
        let block = BootBlock::build(&spec).unwrap();
        assert_eq!(
            config_table_guids(&block).last(),
            Some(&efi::MEMRESERVE_TABLE_GUID)
        );
    }

    #[test]
    fn test_memory_map_marks_the_block_acpi_reclaim() {
        let acpi = acpi_config(1);
        let spec = BootBlockSpec {
            ram_base: 0x4000_0000,
            ram_end: 0x5000_0000,
            cmdline: "",
            initrd: None,
            acpi: &acpi,
            has_its: false,
        };
        let block = BootBlock::build(&spec).unwrap();
        let second = MEMORY_MAP_OFFSET + efi::MEMORY_DESCRIPTOR_SIZE as u64;
        assert_eq!(block.bytes[second as usize], efi::ACPI_RECLAIM_MEMORY as u8);
        assert_eq!(u64_at(&block.bytes, second + 8), block.base);
    }

    #[test]
    fn test_512_possible_vcpus_fit_in_the_block() {
        let acpi = acpi_config(512);
        let spec = BootBlockSpec {
            ram_base: 0x4000_0000,
            ram_end: 0x5000_0000,
            cmdline: "quiet",
            initrd: None,
            acpi: &acpi,
            has_its: false,
        };
        let block = BootBlock::build(&spec).unwrap();
        assert!(block.bytes.len() as u64 <= BOOT_BLOCK_SIZE);
    }
}
