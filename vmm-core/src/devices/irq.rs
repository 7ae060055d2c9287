//! An interrupt line a device raises: an eventfd that KVM turns into a GIC SPI (irqfd).

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors from creating an interrupt line.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// eventfd creation failed.
    #[error("Cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

/// One edge-triggered interrupt line (each trigger is one edge on the SPI).
#[derive(Debug)]
pub struct IrqLine {
    fd: EventFd,
    /// SPI index (the GIC INTID is 32 + spi).
    spi: u32,
}

impl IrqLine {
    /// A new line for `spi`, to be registered with KVM as an irqfd.
    pub fn new(spi: u32) -> Result<Self, IrqError> {
        Ok(Self {
            fd: EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?,
            spi,
        })
    }

    /// The eventfd KVM listens on.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// SPI index.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Another handle on the same line.
    pub fn try_clone(&self) -> Result<Self, IrqError> {
        Ok(Self {
            fd: self.fd.try_clone().map_err(IrqError::EventFd)?,
            spi: self.spi,
        })
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.fd.write(1)
    }
}
