//! virtiofsd's "used" notifications (vring call eventfds) → the virtio-mmio interrupt, and the
//! watch on the vhost-user socket.
//!
//! Why a thread and not the call eventfds as irqfds: a virtio-mmio device has one line, and
//! Linux's handler (`vm_interrupt`) reads InterruptStatus first and looks at the rings only when
//! the USED_RING bit is set. An irqfd would raise the line with the status still 0 and the guest
//! would drop the interrupt. So the thread sets the bit, then raises the transport's irqfd: one
//! host wakeup per interrupt. (With virtio-pci and MSI-X the call eventfd could be the irqfd.)
//!
//! virtiofsd never writes to the main socket unasked, so a hang-up there means it is gone: the
//! device is marked failed and the driver sees DEVICE_NEEDS_RESET.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::FsError;
use crate::devices::virtio::{VirtioInterrupt, INTERRUPT_USED_RING};

/// Epoll token of the stop eventfd (call eventfds use their queue index).
const STOP: u64 = u64::MAX;
/// Epoll token of the vhost-user socket.
const SOCKET: u64 = u64::MAX - 1;

/// The forwarding thread; dropping it stops and joins the thread.
pub struct Forwarder {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What the thread owns.
struct Worker {
    epoll: Epoll,
    calls: Vec<EventFd>,
    socket: RawFd,
    interrupt: Arc<VirtioInterrupt>,
    failed: Arc<AtomicBool>,
    tag: String,
}

impl Forwarder {
    /// Starts forwarding `calls` to `interrupt` and watching `socket`; a hang-up sets `failed`.
    pub fn spawn(
        calls: &[EventFd],
        socket: &impl AsRawFd,
        interrupt: Arc<VirtioInterrupt>,
        failed: Arc<AtomicBool>,
        tag: String,
    ) -> Result<Self, FsError> {
        let epoll = Epoll::new().map_err(FsError::Resource)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(FsError::Resource)?;
        let mut owned = Vec::with_capacity(calls.len());
        for (index, call) in (0u64..).zip(calls) {
            epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, index),
                )
                .map_err(FsError::Resource)?;
            owned.push(call.try_clone().map_err(FsError::Resource)?);
        }
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(FsError::Resource)
        };
        add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        let socket = socket.as_raw_fd();
        add(socket, EventSet::READ_HANG_UP | EventSet::HANG_UP, SOCKET)?;
        let worker = Worker {
            epoll,
            calls: owned,
            socket,
            interrupt,
            failed,
            tag,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-fs-irq".into())
            .spawn(move || worker.run())
            .map_err(FsError::Resource)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("Cannot stop the virtio-fs interrupt thread: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("virtio-fs interrupt thread panicked");
            }
        }
    }
}

impl Worker {
    fn run(self) {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-fs {}: epoll failed: {e}", self.tag);
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    STOP => return,
                    SOCKET => self.backend_gone(*event),
                    index => self.forward(index),
                }
            }
        }
    }

    fn forward(&self, index: u64) {
        let Some(call) = usize::try_from(index).ok().and_then(|i| self.calls.get(i)) else {
            return;
        };
        // EAGAIN: another wakeup already consumed the count; nothing new to report.
        if call.read().is_ok() {
            self.interrupt.raise(INTERRUPT_USED_RING);
        }
    }

    fn backend_gone(&self, event: EpollEvent) {
        self.failed.store(true, Ordering::SeqCst);
        log::error!(
            "virtio-fs {}: virtiofsd closed the connection; the device is failed",
            self.tag
        );
        self.interrupt.device_error();
        // Level-triggered: stop watching, or the hang-up would spin this thread.
        if let Err(e) = self.epoll.ctl(ControlOperation::Delete, self.socket, event) {
            log::warn!("virtio-fs {}: cannot unwatch the socket: {e}", self.tag);
        }
    }
}
