//! Guest RAM: memfd-backed regions, so vhost-user back ends can map the same pages: boot RAM,
//! and above it, when memory can grow, the virtio-mem device's region (a memfd of its own, so
//! punching unplugged blocks out of it never touches boot RAM).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// Errors from creating or writing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("Cannot create the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    /// The memfd could not be sized.
    #[error("Cannot size the guest RAM memfd to {0} bytes")]
    Resize(u64, #[source] std::io::Error),
    /// The size does not fit the host's address space.
    #[error("Guest RAM size {0} does not fit this host")]
    TooLarge(u64),
    /// mmap or region bookkeeping failed.
    #[error("Cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// A write fell outside RAM.
    #[error("Cannot write {len} bytes at guest address {addr:#x}")]
    Write {
        /// Guest physical address.
        addr: u64,
        /// Length of the write.
        len: usize,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The guest's RAM and where it sits in the guest physical map.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    base: u64,
    size: u64,
    hotplug: Option<HotplugRegion>,
}

/// The region virtio-mem plugs memory from: mapped like boot RAM, backed by its own memfd.
#[derive(Debug, Clone)]
pub struct HotplugRegion {
    /// Guest physical address of the first byte.
    pub base: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address of the first byte (for the KVM memslot).
    pub host_address: u64,
    /// The memfd behind it (the device punches unplugged blocks out of it).
    pub memfd: Arc<File>,
}

/// One memfd of `size` bytes named `name`, mapped shared for guest address `base`.
fn memfd_region(name: &CStr, base: u64, size: u64) -> Result<GuestRegionMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
    let file = memfd(name)?;
    file.set_len(size)
        .map_err(|e| MemoryError::Resize(size, e))?;
    let region = GuestRegionMmap::from_range(
        GuestAddress(base),
        len,
        Some(FileOffset::from_arc(Arc::new(file), 0)),
    )
    .map_err(MemoryError::Map)?;
    advise_huge_pages(region.as_ptr(), len);
    Ok(region)
}

impl GuestRam {
    /// Maps `size` bytes of shared, memfd-backed RAM for guest address `base`.
    pub fn new(base: u64, size: u64) -> Result<Self, MemoryError> {
        Self::with_hotplug(base, size, None)
    }

    /// Like `new`, plus `hotplug` = (guest address, bytes) of a virtio-mem region above RAM.
    /// Its pages cost the host nothing until the guest touches them.
    pub fn with_hotplug(
        base: u64,
        size: u64,
        hotplug: Option<(u64, u64)>,
    ) -> Result<Self, MemoryError> {
        let mut regions = vec![memfd_region(c"accordion-guest-ram", base, size)?];
        let mut described = None;
        if let Some((hp_base, hp_size)) = hotplug {
            let region = memfd_region(c"accordion-hotplug-ram", hp_base, hp_size)?;
            described = region.file_offset().map(|f| HotplugRegion {
                base: hp_base,
                size: hp_size,
                host_address: region.as_ptr() as u64,
                memfd: f.arc().clone(),
            });
            regions.push(region);
        }
        let memory =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.into()))?;
        Ok(Self {
            memory,
            base,
            size,
            hotplug: described,
        })
    }

    /// The virtio-mem region, if memory can grow.
    pub fn hotplug(&self) -> Option<&HotplugRegion> {
        self.hotplug.as_ref()
    }

    /// The vm-memory view, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest physical address one past the last byte of boot RAM.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Host virtual address of the first byte (for the KVM memslot).
    pub fn host_address(&self) -> Option<u64> {
        self.memory.iter().next().map(|r| r.as_ptr() as u64)
    }

    /// The memfd backing RAM (for sharing with vhost-user back ends).
    pub fn memfd(&self) -> Option<&File> {
        self.memory
            .iter()
            .next()
            .and_then(|r| r.file_offset())
            .map(FileOffset::file)
    }

    /// Copies `data` to guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.memory
            .write_slice(data, GuestAddress(addr))
            .map_err(|source| MemoryError::Write {
                addr,
                len: data.len(),
                source,
            })
    }

    /// Reads `buf.len()` bytes at `addr` (tests and diagnostics).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        self.memory.read_slice(buf, GuestAddress(addr))
    }
}

/// Asks for transparent huge pages. Where the host allows them for shmem
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = advise or always), KVM can map guest
/// RAM with 2 MiB stage-2 blocks: one fault per 2 MiB instead of per 4 KiB. A refusal is harmless.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: [addr, addr + len) is the mapping just created for guest RAM; MADV_HUGEPAGE only
    // changes the kernel's paging policy for it, never its contents.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "MADV_HUGEPAGE on guest RAM refused: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn memfd(name: &CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string and the flags are a valid combination;
    // the kernel returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn test_guest_ram_write_is_visible_through_the_memfd() {
        let ram = GuestRam::new(0x4000_0000, 2 << 20).unwrap();
        ram.write(0x4000_1000, b"accordion").unwrap();
        let mut buf = [0u8; 9];
        ram.memfd()
            .unwrap()
            .read_exact_at(&mut buf, 0x1000)
            .unwrap();
        assert_eq!(&buf, b"accordion");
    }

    #[test]
    fn test_guest_ram_write_past_the_end_fails() {
        let ram = GuestRam::new(0x4000_0000, 1 << 20).unwrap();
        let err = ram
            .write(0x4000_0000 + (1 << 20) - 4, &[0u8; 8])
            .unwrap_err();
        assert!(matches!(
            err,
            MemoryError::Write {
                addr: 0x400f_fffc,
                len: 8,
                ..
            }
        ));
    }

    #[test]
    fn test_hotplug_region_is_guest_memory_with_a_memfd_of_its_own() {
        let ram =
            GuestRam::with_hotplug(0x4000_0000, 2 << 20, Some((0x8000_0000, 4 << 20))).unwrap();
        let hp = ram.hotplug().unwrap().clone();
        assert_eq!((hp.base, hp.size), (0x8000_0000, 4 << 20));
        ram.write(0x8000_2000, b"plugged").unwrap();
        let mut buf = [0u8; 7];
        hp.memfd.read_exact_at(&mut buf, 0x2000).unwrap();
        assert_eq!(&buf, b"plugged");
        // Boot RAM's memfd does not hold it.
        ram.memfd().unwrap().read_exact_at(&mut buf, 0x0).unwrap();
        assert_eq!(buf, [0; 7]);
        assert_eq!(ram.end(), 0x4020_0000);
        assert!(ram.write(0x4020_0000, b"x").is_err());
    }

    #[test]
    fn test_guest_ram_reports_its_bounds() {
        let ram = GuestRam::new(0x4000_0000, 4 << 20).unwrap();
        assert_eq!((ram.base(), ram.end()), (0x4000_0000, 0x4040_0000));
        assert!(ram.host_address().is_some());
    }
}
