//! Emulated devices on the MMIO bus.

pub mod boot_timer;
pub mod cpu_hotplug;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ged;
pub mod irq;
pub mod serial;
pub mod virtio;
