//! Emulated devices on the MMIO bus.

pub mod boot_timer;
pub mod cpu_hotplug;
pub mod event_loop;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ged;
pub mod irq;
pub mod serial;
pub mod virtio;
