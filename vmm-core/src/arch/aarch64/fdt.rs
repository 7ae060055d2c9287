//! The stub device tree: only `/chosen`, so the kernel boots from ACPI (arm64 treats a DT with
//! nothing but /chosen as a stub and looks for ACPI through UEFI).

/// Errors from building the FDT.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// vm-fdt refused a node or property.
    #[error("Cannot build the stub device tree")]
    Build(#[from] vm_fdt::Error),
}

/// What /chosen points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen<'a> {
    /// Kernel command line.
    pub bootargs: &'a str,
    /// Initrd range [start, end), if any.
    pub initrd: Option<(u64, u64)>,
    /// Guest address of the EFI system table.
    pub efi_system_table: u64,
    /// Guest address of the EFI memory map.
    pub efi_mmap_start: u64,
    /// Size of the memory map in bytes.
    pub efi_mmap_size: u32,
    /// Size of one memory descriptor.
    pub efi_mmap_desc_size: u32,
    /// Memory descriptor version.
    pub efi_mmap_desc_ver: u32,
}

/// Debian's (and Ubuntu's) kernels drop EFI without this property; 2 = secure boot disabled.
const SECURE_BOOT_DISABLED: u32 = 2;

/// Builds the stub DTB.
pub fn stub_fdt(chosen: &Chosen<'_>) -> Result<Vec<u8>, FdtError> {
    let mut fdt = vm_fdt::FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", chosen.bootargs)?;
    if let Some((start, end)) = chosen.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.property_u64("linux,uefi-system-table", chosen.efi_system_table)?;
    fdt.property_u64("linux,uefi-mmap-start", chosen.efi_mmap_start)?;
    fdt.property_u32("linux,uefi-mmap-size", chosen.efi_mmap_size)?;
    fdt.property_u32("linux,uefi-mmap-desc-size", chosen.efi_mmap_desc_size)?;
    fdt.property_u32("linux,uefi-mmap-desc-ver", chosen.efi_mmap_desc_ver)?;
    fdt.property_u32("linux,uefi-secure-boot", SECURE_BOOT_DISABLED)?;
    fdt.end_node(node)?;
    fdt.end_node(root)?;
    Ok(fdt.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen() -> Chosen<'static> {
        Chosen {
            bootargs: "console=ttyS0 quiet",
            initrd: Some((0x4220_0000, 0x4230_0000)),
            efi_system_table: 0x7fe0_0000,
            efi_mmap_start: 0x7fe0_0400,
            efi_mmap_size: 80,
            efi_mmap_desc_size: 40,
            efi_mmap_desc_ver: 1,
        }
    }

    /// Finds a property's value by scanning the structure block (good enough for a two-node tree).
    fn property<'a>(dtb: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let be = |at: usize| u32::from_be_bytes(dtb[at..at + 4].try_into().unwrap()) as usize;
        let (structs, strings) = (be(8), be(12));
        let mut at = structs;
        loop {
            match be(at) {
                1 => {
                    at += 4;
                    let end = dtb[at..].iter().position(|&b| b == 0)?;
                    at = (at + end + 1).next_multiple_of(4);
                }
                3 => {
                    let (len, off) = (be(at + 4), be(at + 8));
                    let pname = &dtb[strings + off..];
                    let pname = &pname[..pname.iter().position(|&b| b == 0)?];
                    if pname == name.as_bytes() {
                        return Some(&dtb[at + 12..at + 12 + len]);
                    }
                    at = (at + 12 + len).next_multiple_of(4);
                }
                2 | 4 => at += 4,
                _ => return None,
            }
        }
    }

    #[test]
    fn test_stub_fdt_has_the_six_uefi_properties_with_their_sizes() {
        let dtb = stub_fdt(&chosen()).unwrap();
        assert_eq!(
            property(&dtb, "linux,uefi-system-table"),
            Some(&0x7fe0_0000u64.to_be_bytes()[..])
        );
        assert_eq!(
            property(&dtb, "linux,uefi-mmap-start"),
            Some(&0x7fe0_0400u64.to_be_bytes()[..])
        );
        assert_eq!(
            property(&dtb, "linux,uefi-mmap-size"),
            Some(&80u32.to_be_bytes()[..])
        );
        assert_eq!(
            property(&dtb, "linux,uefi-mmap-desc-size"),
            Some(&40u32.to_be_bytes()[..])
        );
        assert_eq!(
            property(&dtb, "linux,uefi-mmap-desc-ver"),
            Some(&1u32.to_be_bytes()[..])
        );
        assert_eq!(
            property(&dtb, "linux,uefi-secure-boot"),
            Some(&2u32.to_be_bytes()[..])
        );
    }

    #[test]
    fn test_stub_fdt_carries_bootargs_and_initrd_range() {
        let dtb = stub_fdt(&chosen()).unwrap();
        assert_eq!(
            property(&dtb, "bootargs"),
            Some(&b"console=ttyS0 quiet\0"[..])
        );
        assert_eq!(
            property(&dtb, "linux,initrd-start"),
            Some(&0x4220_0000u64.to_be_bytes()[..])
        );
        assert_eq!(
            property(&dtb, "linux,initrd-end"),
            Some(&0x4230_0000u64.to_be_bytes()[..])
        );
    }

    #[test]
    fn test_stub_fdt_without_initrd_omits_initrd_properties() {
        let dtb = stub_fdt(&Chosen {
            initrd: None,
            ..chosen()
        })
        .unwrap();
        assert_eq!(property(&dtb, "linux,initrd-start"), None);
    }

    #[test]
    fn test_stub_fdt_has_no_memory_or_cpu_nodes() {
        let dtb = stub_fdt(&chosen()).unwrap();
        let text = String::from_utf8_lossy(&dtb);
        assert!(!text.contains("memory@") && !text.contains("cpus"));
        assert!(text.contains("chosen"));
    }
}
