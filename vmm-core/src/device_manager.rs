//! The device manager: the one way a device joins a VM (its interrupt line wired to the GIC
//! through an irqfd, a KVM ioeventfd per queue for devices served outside the VMM, its window
//! on the MMIO bus) and, once the VM runs, the thread that does the devices' slow work.
//!
//! A vCPU's write of DRIVER_OK only records the activation in the transport and wakes this
//! thread (an eventfd write); the activation itself (spawning a back-end thread, the vhost-user
//! handshake with virtiofsd) runs here. That keeps vCPU threads to KVM_RUN, register emulation
//! and eventfd writes (docs/architecture.md, "Device manager").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::aarch64::layout;
use crate::bus::{Bus, BusError, SharedDevice};
use crate::devices::event_loop::{self, EventLoop, Filter, Woken};
use crate::devices::irq::{IrqError, IrqLine};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::seccomp::ThreadKind;

/// Errors from attaching devices or starting the device manager's thread.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// A KVM call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The device's MMIO window is taken or invalid.
    #[error("cannot map a device")]
    Bus(#[from] BusError),
    /// An interrupt line could not be made.
    #[error("cannot create an interrupt line")]
    Irq(#[from] IrqError),
    /// The layout has no such virtio-mmio slot.
    #[error("virtio-mmio slot {0} does not exist")]
    NoSlot(u32),
    /// The wake eventfd or the thread could not be made.
    #[error("cannot start the device manager thread")]
    Thread(#[source] std::io::Error),
}

/// Transports with deferred work, one bit per virtio-mmio slot, and the eventfd that says so.
struct Requests {
    slots: AtomicU32,
    wake: EventFd,
}

impl Requests {
    fn request(&self, slot: u32) {
        self.slots.fetch_or(1 << slot, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            crate::log_limited!(log::Level::Error, "cannot wake the device manager: {e}");
        }
    }
}

/// Builds the VM's device set; [`DeviceManager::start`] hands the bus to the vCPUs.
pub(crate) struct DeviceManager<'vm> {
    vm: &'vm VmFd,
    memory: GuestMemoryMmap,
    bus: Bus,
    transports: BTreeMap<u32, Arc<Mutex<MmioTransport>>>,
    requests: Arc<Requests>,
}

// The layout has at most 32 slots: one bit each in `Requests::slots`.
const _: () = assert!(layout::VIRTIO_MMIO_SLOTS <= 32);

impl<'vm> DeviceManager<'vm> {
    /// A manager attaching devices to `vm`, whose guest RAM is `memory`.
    pub(crate) fn new(vm: &'vm VmFd, memory: GuestMemoryMmap) -> Result<Self, DeviceManagerError> {
        Ok(Self {
            vm,
            memory,
            bus: Bus::new(),
            transports: BTreeMap::new(),
            requests: Arc::new(Requests {
                slots: AtomicU32::new(0),
                wake: EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::Thread)?,
            }),
        })
    }

    /// An interrupt line for SPI `spi`, wired to the GIC (irqfd).
    pub(crate) fn irq_line(&self, spi: u32) -> Result<IrqLine, DeviceManagerError> {
        let line = IrqLine::new(spi)?;
        self.vm
            .register_irqfd(line.eventfd(), line.spi())
            .map_err(|e| DeviceManagerError::Kvm("wire an interrupt (irqfd)", e))?;
        Ok(line)
    }

    /// Maps an emulated device's register window at `base`.
    pub(crate) fn attach_mmio(
        &mut self,
        name: &str,
        base: u64,
        device: SharedDevice,
    ) -> Result<(), DeviceManagerError> {
        Ok(self.bus.insert(name, base, layout::DEVICE_SIZE, device)?)
    }

    /// Puts `device` behind a virtio-mmio transport in `slot`: its interrupt, an ioeventfd per
    /// queue when it is served outside the VMM (KVM signals the queue's kick eventfd on a
    /// QueueNotify write with the queue index as datamatch), its window on the bus, and its
    /// activation on this manager's thread.
    pub(crate) fn attach_virtio(
        &mut self,
        name: &str,
        slot: u32,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceManagerError> {
        let (Some(base), Some(spi)) = (
            layout::virtio_mmio_base(slot),
            layout::virtio_mmio_spi(slot),
        ) else {
            return Err(DeviceManagerError::NoSlot(slot));
        };
        let irq = self.irq_line(spi)?;
        let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY);
        for (kick, queue) in device.kick_eventfds().iter().zip(0u32..) {
            self.vm
                .register_ioevent(kick, &notify, queue)
                .map_err(|e| DeviceManagerError::Kvm("register a queue notifier (ioeventfd)", e))?;
        }
        let mut transport = MmioTransport::new(
            device,
            self.memory.clone(),
            Arc::new(VirtioInterrupt::new(irq)),
        );
        let requests = self.requests.clone();
        transport.set_waker(Box::new(move || requests.request(slot)));
        let transport = Arc::new(Mutex::new(transport));
        self.bus
            .insert(name, base, layout::DEVICE_SIZE, transport.clone())?;
        self.transports.insert(slot, transport);
        Ok(())
    }

    /// Starts the manager's thread; returns the bus for the vCPUs. `on_failure` runs, with the
    /// reason, should the thread fail (it stops the VM: its devices could no longer start).
    pub(crate) fn start(
        self,
        on_failure: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<(Bus, DeviceThread), DeviceManagerError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::Thread)?;
        let events = EventLoop::new(&stop).map_err(DeviceManagerError::Thread)?;
        events
            .add(&self.requests.wake, EventSet::IN, 0)
            .map_err(DeviceManagerError::Thread)?;
        let (requests, transports) = (self.requests, self.transports);
        let on_failure = Arc::new(on_failure);
        let on_panic = on_failure.clone();
        let thread = event_loop::spawn(
            Filter::Seccomp(ThreadKind::DeviceManager),
            move || {
                if let Err(e) = serve(&events, &requests, &transports) {
                    log::error!("device manager: {e}");
                    on_failure(e);
                }
            },
            move |what| on_panic(what),
        )
        .map_err(DeviceManagerError::Thread)?;
        Ok((
            self.bus,
            DeviceThread {
                stop,
                thread: Some(thread),
            },
        ))
    }
}

/// Services every transport that asked, until stopped.
fn serve(
    events: &EventLoop,
    requests: &Requests,
    transports: &BTreeMap<u32, Arc<Mutex<MmioTransport>>>,
) -> Result<(), String> {
    let mut ready = [EpollEvent::default(); 2];
    loop {
        match events.wait(-1, &mut ready) {
            Ok(Woken::Stop) => return Ok(()),
            Ok(Woken::Events(_)) => {}
            Err(e) => return Err(format!("epoll failed: {e}")),
        }
        let _ = requests.wake.read();
        let slots = requests.slots.swap(0, Ordering::SeqCst);
        for (slot, transport) in transports {
            if slots & (1 << slot) != 0 {
                transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .service();
            }
        }
    }
}

/// The running device manager thread; dropping it stops and joins it.
pub(crate) struct DeviceThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            // A panic was reported by the thread itself (event_loop::spawn).
            let _ = thread.join();
        }
    }
}
