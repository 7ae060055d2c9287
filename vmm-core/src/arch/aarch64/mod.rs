//! ARM64 guests.

pub mod boot_block;
pub mod efi;
pub mod fdt;
#[cfg(target_arch = "aarch64")]
pub mod gic;
pub mod kernel;
pub mod layout;
pub mod psci;
pub mod regs;
