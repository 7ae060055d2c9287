//! virtio devices and their MMIO transport (virtio 1.2, §4.2).

#[cfg(any(test, feature = "fuzzing"))]
pub mod alloc_probe;
pub(crate) mod chain;
pub mod fs;
pub mod mem;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_ring;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::irq::IrqLine;

/// VIRTIO_F_VERSION_1: the only mode the transport offers (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used ring changed.
pub const INTERRUPT_USED_RING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed (or the device needs a reset).
pub const INTERRUPT_CONFIG: u32 = 0x2;

/// Errors a device reports when the driver starts it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured something the device cannot work with.
    #[error("Bad virtio device configuration: {0}")]
    BadConfig(String),
    /// A host resource (socket, thread, eventfd) could not be set up.
    #[error("Cannot start the virtio device back end")]
    Backend(#[source] std::io::Error),
}

/// The device's interrupt: the transport's InterruptStatus bits plus the line to the GIC.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// An interrupt on `line`.
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.eventfd().write(1) {
            crate::log_limited!(
                log::Level::Warn,
                "Cannot raise virtio interrupt on SPI {}: {e}",
                self.line.spi()
            );
        }
    }

    /// The device met something it cannot go on with (e.g. a malformed descriptor chain): the
    /// transport reports DEVICE_NEEDS_RESET and the driver gets a config interrupt.
    pub fn device_error(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG);
    }

    /// Whether `device_error` was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The driver reset the device.
    pub fn clear(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Tells the driver `queue` has new used entries, unless it asked not to be told. A failed
    /// check (the ring outside guest memory) notifies anyway: a spurious interrupt is harmless, a
    /// lost one stalls the driver.
    pub fn notify_used(&self, queue: &mut Queue, memory: &GuestMemoryMmap) {
        if !matches!(queue.needs_notification(memory), Ok(false)) {
            self.raise(INTERRUPT_USED_RING);
        }
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Reads `data.len()` bytes of a device's configuration space `config` from `offset`; bytes past
/// its end read as zero (the driver may read any width anywhere).
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (the transport adds nothing; include VERSION_1).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore this).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Counts the configuration changes the device made on its own (the transport adds its
    /// own), so a driver reading a multi-word field sees the change and reads again.
    fn config_generation(&self) -> u32 {
        0
    }
    /// The driver set DRIVER_OK: start serving `queues` in `memory`.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (called on the notifying vCPU's thread).
    fn queue_notify(&mut self, index: u16);
    /// For a device served outside the VMM (vhost-user): one eventfd per queue that KVM signals
    /// directly on the queue's notification (an ioeventfd), without a vCPU exit to the VMM.
    fn kick_eventfds(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        &[]
    }
    /// The driver reset the device: stop using the queues. Returns whether the device can be
    /// activated again.
    fn reset(&mut self) -> bool;
}
