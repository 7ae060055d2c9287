//! Emulated devices on the MMIO bus.

pub mod boot_timer;
pub mod irq;
pub mod serial;
pub mod virtio;
