//! The guest physical address map of an Accordion microVM.
//!
//! Everything below 1 GiB is MMIO, RAM starts at 1 GiB (like QEMU `virt` and Firecracker):
//!
//! ```text
//! 0x0800_0000  GICv3 distributor                 64 KiB
//! 0x0808_0000  (reserved for a GIC ITS)          128 KiB
//! 0x0810_0000  GICv3 redistributors              max_vcpus x 128 KiB (room for 512 vCPUs)
//! 0x0C10_0000  end of the redistributor window
//! 0x0D00_0000  platform devices, 4 KiB each: serial, boot timer, GED, CPU hotplug
//! 0x0E00_0000  virtio-mmio slots, 4 KiB each
//! 0x4000_0000  RAM; its top 2 MiB hold the firmware-less boot block (EFI, ACPI, DTB)
//! next 1 GiB   the virtio-mem region when memory can grow (max_memory - memory)
//! ```
//!
//! Interrupt numbers are SPI indices (the GIC INTID is `32 + spi`).

/// Start of guest RAM.
pub const RAM_BASE: u64 = 0x4000_0000;

/// GICv3 distributor.
pub const GICD_BASE: u64 = 0x0800_0000;
/// Size of the GICv3 distributor frame.
pub const GICD_SIZE: u64 = 0x1_0000;

/// Where a GIC ITS would go; nothing is mapped there today (no MSIs without PCI).
pub const GITS_BASE: u64 = 0x0808_0000;
/// Size of a GICv3 ITS frame.
pub const GITS_SIZE: u64 = 0x2_0000;

/// The single redistributor region, one 128 KiB frame (RD + SGI) per possible vCPU.
pub const GICR_BASE: u64 = 0x0810_0000;
/// Size of one vCPU's redistributor (RD_base + SGI_base frames).
pub const GICR_FRAME_SIZE: u64 = 0x2_0000;
/// The most vCPUs the map has room for (KVM's arm64 limit is 512 too).
pub const MAX_VCPUS: u32 = 512;
/// End of the redistributor window (exclusive).
pub const GICR_WINDOW_END: u64 = GICR_BASE + MAX_VCPUS as u64 * GICR_FRAME_SIZE;

/// Platform devices start here.
pub const PLATFORM_BASE: u64 = 0x0D00_0000;
/// Each platform device and virtio-mmio slot gets one page.
pub const DEVICE_SIZE: u64 = 0x1000;

/// 16550 UART (console).
pub const SERIAL_BASE: u64 = PLATFORM_BASE;
/// SPI of the UART.
pub const SERIAL_SPI: u32 = 1;
/// Boot timer: the guest writes one byte here when its init starts.
pub const BOOT_TIMER_BASE: u64 = PLATFORM_BASE + DEVICE_SIZE;
/// ACPI Generic Event Device (hotplug notifications, devices/ged.rs).
pub const GED_BASE: u64 = PLATFORM_BASE + 2 * DEVICE_SIZE;
/// SPI of the GED.
pub const GED_SPI: u32 = 2;
/// CPU hotplug controller registers (devices/cpu_hotplug.rs).
pub const CPU_HOTPLUG_BASE: u64 = PLATFORM_BASE + 3 * DEVICE_SIZE;

/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0x0E00_0000;
/// Number of virtio-mmio slots.
pub const VIRTIO_MMIO_SLOTS: u32 = 32;
/// SPI of virtio-mmio slot 0; slot `n` uses `VIRTIO_MMIO_FIRST_SPI + n`.
pub const VIRTIO_MMIO_FIRST_SPI: u32 = 16;

/// Interrupt lines the VGIC is configured with (32 private + 96 SPIs), a multiple of 32.
pub const GIC_NR_IRQS: u32 = 128;
/// First SPI's INTID.
pub const SPI_BASE_INTID: u32 = 32;

/// Architected timer PPIs (INTIDs), as KVM wires them.
pub const TIMER_SECURE_PHYS_INTID: u32 = 29;
/// Non-secure EL1 physical timer.
pub const TIMER_NONSECURE_PHYS_INTID: u32 = 30;
/// EL1 virtual timer.
pub const TIMER_VIRT_INTID: u32 = 27;
/// EL2 (hypervisor) physical timer.
pub const TIMER_HYP_INTID: u32 = 26;

/// The virtio-mem region starts on the first boundary of this size above boot RAM: a multiple of
/// every arm64 memory block size (128 MiB with 4 KiB pages, 512 MiB with 64 KiB).
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// Size of the boot block at the top of RAM (EFI tables, memory map, DTB, ACPI tables).
pub const BOOT_BLOCK_SIZE: u64 = 0x20_0000;

/// Alignment of the kernel base required by the arm64 boot protocol.
pub const KERNEL_ALIGN: u64 = 0x20_0000;

/// Guest physical address of virtio-mmio slot `n`.
pub fn virtio_mmio_base(slot: u32) -> Option<u64> {
    (slot < VIRTIO_MMIO_SLOTS).then(|| VIRTIO_MMIO_BASE + u64::from(slot) * DEVICE_SIZE)
}

/// SPI of virtio-mmio slot `n`.
pub fn virtio_mmio_spi(slot: u32) -> Option<u32> {
    (slot < VIRTIO_MMIO_SLOTS).then(|| VIRTIO_MMIO_FIRST_SPI + slot)
}

/// Size of the redistributor region for `vcpus` possible vCPUs.
pub fn gicr_size(vcpus: u32) -> u64 {
    u64::from(vcpus) * GICR_FRAME_SIZE
}

/// INTID of an SPI, as ACPI and the GIC name it.
pub fn spi_intid(spi: u32) -> u32 {
    SPI_BASE_INTID + spi
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, base, size) of every MMIO region at its largest.
    fn regions() -> Vec<(&'static str, u64, u64)> {
        let mut r = vec![
            ("gicd", GICD_BASE, GICD_SIZE),
            ("gits", GITS_BASE, GITS_SIZE),
            ("gicr", GICR_BASE, gicr_size(MAX_VCPUS)),
            ("serial", SERIAL_BASE, DEVICE_SIZE),
            ("boot_timer", BOOT_TIMER_BASE, DEVICE_SIZE),
            ("ged", GED_BASE, DEVICE_SIZE),
            ("cpu_hotplug", CPU_HOTPLUG_BASE, DEVICE_SIZE),
        ];
        r.extend(
            (0..VIRTIO_MMIO_SLOTS).map(|s| ("virtio", virtio_mmio_base(s).unwrap(), DEVICE_SIZE)),
        );
        r
    }

    #[test]
    fn test_mmio_regions_with_512_vcpus_do_not_overlap_each_other_or_ram() {
        let mut r = regions();
        r.sort_by_key(|x| x.1);
        for pair in r.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(a.1 + a.2 <= b.1, "{} overlaps {}", a.0, b.0);
        }
        let last = r.last().unwrap();
        assert!(last.1 + last.2 <= RAM_BASE);
    }

    #[test]
    fn test_gicr_region_for_128_vcpus_is_16_mib_and_64k_aligned() {
        assert_eq!(gicr_size(128), 16 << 20);
        assert_eq!(GICR_BASE % 0x1_0000, 0);
        assert!(GICR_BASE + gicr_size(128) <= GICR_WINDOW_END);
    }

    #[test]
    fn test_spis_are_distinct_and_fit_the_vgic() {
        let mut spis = vec![SERIAL_SPI, GED_SPI];
        spis.extend((0..VIRTIO_MMIO_SLOTS).map(|s| virtio_mmio_spi(s).unwrap()));
        let count = spis.len();
        spis.sort_unstable();
        spis.dedup();
        assert_eq!(spis.len(), count);
        assert!(spis.iter().all(|&s| spi_intid(s) < GIC_NR_IRQS));
    }

    #[test]
    fn test_virtio_slot_out_of_range_is_none() {
        assert_eq!(virtio_mmio_base(VIRTIO_MMIO_SLOTS), None);
        assert_eq!(virtio_mmio_spi(VIRTIO_MMIO_SLOTS), None);
    }

    #[test]
    fn test_ram_base_is_kernel_aligned() {
        assert_eq!(RAM_BASE % KERNEL_ALIGN, 0);
    }
}
