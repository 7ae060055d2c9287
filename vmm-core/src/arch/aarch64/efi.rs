//! The smallest UEFI environment Linux accepts without firmware: a system table whose only
//! meaningful contents are its configuration tables (the ACPI 2.0 RSDP and an RT_PROPERTIES table
//! saying no runtime services exist) and an EFI memory map.
//!
//! Layouts and GUIDs follow include/linux/efi.h and the UEFI spec. Linux checks only the system
//! table's signature (efi_systab_check_header); a null runtime-services pointer alone is not enough
//! to keep it from calling runtime services, hence RT_PROPERTIES (ENVIRONMENT.md §9).

/// "IBI SYST".
pub const SYSTEM_TABLE_SIGNATURE: u64 = 0x5453_5953_2049_4249;
/// UEFI 2.70.
pub const SYSTEM_TABLE_REVISION: u32 = (2 << 16) | 70;
/// sizeof(efi_system_table_64_t).
pub const SYSTEM_TABLE_SIZE: usize = 120;
/// sizeof(efi_config_table_64_t).
pub const CONFIG_TABLE_ENTRY_SIZE: usize = 24;
/// sizeof(efi_memory_desc_t).
pub const MEMORY_DESCRIPTOR_SIZE: usize = 40;
/// EFI_MEMORY_DESCRIPTOR_VERSION.
pub const MEMORY_DESCRIPTOR_VERSION: u32 = 1;
/// UEFI pages are always 4 KiB.
pub const EFI_PAGE_SIZE: u64 = 4096;

/// EFI_CONVENTIONAL_MEMORY.
pub const CONVENTIONAL_MEMORY: u32 = 7;
/// EFI_ACPI_RECLAIM_MEMORY: Linux keeps it reserved and maps it cacheable.
pub const ACPI_RECLAIM_MEMORY: u32 = 9;
/// EFI_MEMORY_WB: Linux only uses RAM it may map write-back.
pub const MEMORY_WB: u64 = 0x8;

/// An EFI GUID in its in-memory byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid([u8; 16]);

impl Guid {
    /// Builds a GUID from the EFI_GUID(a, b, c, d0..d7) notation.
    pub const fn new(a: u32, b: u16, c: u16, d: [u8; 8]) -> Self {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    /// A GUID from its stored bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes as stored in tables.
    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// ACPI_20_TABLE_GUID: points at the RSDP.
pub const ACPI_20_TABLE_GUID: Guid = Guid::new(
    0x8868_e871,
    0xe4f1,
    0x11d3,
    [0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81],
);
/// EFI_RT_PROPERTIES_TABLE_GUID.
pub const RT_PROPERTIES_TABLE_GUID: Guid = Guid::new(
    0xeb66_918a,
    0x7eef,
    0x402a,
    [0x84, 0x2e, 0x93, 0x1d, 0x21, 0xc3, 0x8a, 0xe9],
);
/// LINUX_EFI_MEMRESERVE_TABLE_GUID: where Linux records GIC ITS tables across kexec.
pub const MEMRESERVE_TABLE_GUID: Guid = Guid::new(
    0x888e_b0c6,
    0x8ede,
    0x4ff5,
    [0xa8, 0xf0, 0x9a, 0xee, 0x5c, 0xb9, 0x77, 0xc2],
);

/// efi_rt_properties_table_t { version 1, length 8, runtime_services_supported 0 }.
pub fn rt_properties_table() -> [u8; 8] {
    let mut t = [0u8; 8];
    t[0..2].copy_from_slice(&1u16.to_le_bytes());
    t[2..4].copy_from_slice(&8u16.to_le_bytes());
    t
}

/// An empty linux_efi_memreserve root { size 0, count 0, next 0 }; Linux needs one when the MADT
/// has a GIC ITS, to record the ITS tables it allocates.
pub fn memreserve_root() -> [u8; 16] {
    [0u8; 16]
}

/// Configuration table entries: GUID followed by the table's physical address.
pub fn config_tables(entries: &[(Guid, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * CONFIG_TABLE_ENTRY_SIZE);
    for (guid, addr) in entries {
        out.extend_from_slice(guid.bytes());
        out.extend_from_slice(&addr.to_le_bytes());
    }
    out
}

/// efi_system_table_64_t with a vendor string and configuration tables; every protocol and
/// service pointer is null.
pub fn system_table(fw_vendor: u64, config_tables: u64, nr_tables: u64) -> [u8; SYSTEM_TABLE_SIZE] {
    let mut t = [0u8; SYSTEM_TABLE_SIZE];
    t[0..8].copy_from_slice(&SYSTEM_TABLE_SIGNATURE.to_le_bytes());
    t[8..12].copy_from_slice(&SYSTEM_TABLE_REVISION.to_le_bytes());
    t[12..16].copy_from_slice(&(SYSTEM_TABLE_SIZE as u32).to_le_bytes());
    // crc32 (16..20) is not checked by Linux and stays 0.
    t[24..32].copy_from_slice(&fw_vendor.to_le_bytes());
    t[104..112].copy_from_slice(&nr_tables.to_le_bytes());
    t[112..120].copy_from_slice(&config_tables.to_le_bytes());
    t
}

/// A NUL-terminated UCS-2 string, as the system table's firmware vendor.
pub fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain([0])
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// One efi_memory_desc_t.
fn descriptor(kind: u32, start: u64, end: u64) -> [u8; MEMORY_DESCRIPTOR_SIZE] {
    let mut d = [0u8; MEMORY_DESCRIPTOR_SIZE];
    d[0..4].copy_from_slice(&kind.to_le_bytes());
    d[8..16].copy_from_slice(&start.to_le_bytes());
    d[24..32].copy_from_slice(&((end - start) / EFI_PAGE_SIZE).to_le_bytes());
    d[32..40].copy_from_slice(&MEMORY_WB.to_le_bytes());
    d
}

/// The EFI memory map: RAM below the boot block is conventional memory, the boot block itself
/// (tables the kernel keeps reading) is ACPI reclaim. MMIO is left out, as firmware does.
pub fn memory_map(ram_base: u64, boot_block: u64, ram_end: u64) -> Vec<u8> {
    let mut map = Vec::with_capacity(2 * MEMORY_DESCRIPTOR_SIZE);
    map.extend_from_slice(&descriptor(CONVENTIONAL_MEMORY, ram_base, boot_block));
    map.extend_from_slice(&descriptor(ACPI_RECLAIM_MEMORY, boot_block, ram_end));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn test_acpi_20_guid_has_efi_mixed_endian_layout() {
        assert_eq!(
            ACPI_20_TABLE_GUID.bytes(),
            &[
                0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11, 0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c,
                0x88, 0x81
            ]
        );
    }

    #[test]
    fn test_system_table_has_signature_and_config_table_pointer() {
        let t = system_table(0x1000, 0x2000, 2);
        assert_eq!(&t[0..8], b"IBI SYST");
        assert_eq!(u64_at(&t, 24), 0x1000);
        assert_eq!(u64_at(&t, 88), 0, "runtime services pointer must be null");
        assert_eq!(u64_at(&t, 104), 2);
        assert_eq!(u64_at(&t, 112), 0x2000);
    }

    #[test]
    fn test_config_tables_are_guid_then_address() {
        let t = config_tables(&[
            (ACPI_20_TABLE_GUID, 0x7ff0_0000),
            (RT_PROPERTIES_TABLE_GUID, 0x7ff0_1000),
        ]);
        assert_eq!(t.len(), 48);
        assert_eq!(&t[24..40], RT_PROPERTIES_TABLE_GUID.bytes());
        assert_eq!(u64_at(&t, 40), 0x7ff0_1000);
    }

    #[test]
    fn test_rt_properties_declares_no_runtime_services() {
        assert_eq!(rt_properties_table(), [1, 0, 8, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn test_memory_map_splits_ram_into_conventional_and_acpi_reclaim() {
        let map = memory_map(0x4000_0000, 0x7fe0_0000, 0x8000_0000);
        assert_eq!(map.len(), 2 * MEMORY_DESCRIPTOR_SIZE);
        let (ram, block) = map.split_at(MEMORY_DESCRIPTOR_SIZE);
        assert_eq!(ram[0], CONVENTIONAL_MEMORY as u8);
        assert_eq!((u64_at(ram, 8), u64_at(ram, 24)), (0x4000_0000, 0x3fe00));
        assert_eq!(block[0], ACPI_RECLAIM_MEMORY as u8);
        assert_eq!((u64_at(block, 8), u64_at(block, 24)), (0x7fe0_0000, 0x200));
        assert_eq!(u64_at(block, 32), MEMORY_WB);
    }

    #[test]
    fn test_ucs2_vendor_is_nul_terminated() {
        assert_eq!(ucs2("Ab"), vec![b'A', 0, b'b', 0, 0, 0]);
    }
}
