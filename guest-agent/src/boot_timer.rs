//! Tells the VMM that the guest's init is running: one byte written to the boot-timer register
//! whose address the VMM puts on the kernel command line (`accordion.boot_timer=0x…`). The host then
//! knows exactly how long kernel boot took, independent of console speed (`accordion status`).

use std::os::fd::AsFd;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Errors of the boot-timer write.
#[derive(Debug, thiserror::Error)]
pub enum BootTimerError {
    #[error("Cannot open /dev/mem")]
    Open(#[source] std::io::Error),
    #[error("Cannot map the boot timer at {0:#x}")]
    Map(u64, #[source] nix::Error),
}

/// The register address named on a kernel command line, if any.
pub fn address_from_cmdline(cmdline: &str) -> Option<u64> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("accordion.boot_timer="))
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
}

/// Writes the byte if the command line names a boot timer; `Ok(false)` when it names none.
pub fn signal() -> Result<bool, BootTimerError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(addr) = address_from_cmdline(&cmdline) else {
        return Ok(false);
    };
    let page = addr & !0xfff;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(BootTimerError::Open)?;
    let offset = i64::try_from(page).map_err(|_| BootTimerError::Map(addr, nix::Error::EINVAL))?;
    let len =
        std::num::NonZeroUsize::new(0x1000).ok_or(BootTimerError::Map(addr, nix::Error::EINVAL))?;
    // SAFETY: maps one page of device MMIO (not RAM: STRICT_DEVMEM refuses RAM) that nothing else
    // in this process uses; it is unmapped below.
    let base = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            mem.as_fd(),
            offset,
        )
    }
    .map_err(|e| BootTimerError::Map(addr, e))?;
    // SAFETY: `addr - page` is below 0x1000, inside the mapping; a volatile store is one MMIO write.
    unsafe {
        base.cast::<u8>()
            .add((addr - page) as usize)
            .write_volatile(1);
        let _ = munmap(base, 0x1000);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_address_from_cmdline() {
        assert_eq!(
            address_from_cmdline("console=ttyS0 quiet accordion.boot_timer=0xd001000 panic=-1"),
            Some(0xd00_1000)
        );
        assert_eq!(address_from_cmdline("console=ttyS0"), None);
        assert_eq!(address_from_cmdline("accordion.boot_timer=zz"), None);
    }
}
