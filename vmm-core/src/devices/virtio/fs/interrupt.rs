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

use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::FsError;
use crate::devices::event_loop::{self, EventLoop, Filter, Woken};
use crate::devices::virtio::{VirtioInterrupt, INTERRUPT_USED_RING};
use crate::seccomp::ThreadKind;

/// Epoll token of the vhost-user socket (call eventfds use their queue index).
const SOCKET: u64 = u64::MAX - 1;

/// The forwarding thread; dropping it stops and joins the thread.
pub struct Forwarder {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What the thread owns.
struct Worker {
    events: EventLoop,
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
        let stop = EventFd::new(EFD_NONBLOCK).map_err(FsError::Resource)?;
        let events = EventLoop::new(&stop).map_err(FsError::Resource)?;
        let mut owned = Vec::with_capacity(calls.len());
        for (index, call) in (0u64..).zip(calls) {
            events
                .add(call, EventSet::IN, index)
                .map_err(FsError::Resource)?;
            owned.push(call.try_clone().map_err(FsError::Resource)?);
        }
        let socket = socket.as_raw_fd();
        events
            .add(&socket, EventSet::READ_HANG_UP | EventSet::HANG_UP, SOCKET)
            .map_err(FsError::Resource)?;
        let flag = interrupt.clone();
        let worker = Worker {
            events,
            calls: owned,
            socket,
            interrupt,
            failed,
            tag,
        };
        let thread = event_loop::spawn(
            Filter::Seccomp(ThreadKind::FsIrq),
            move || worker.run(),
            move |_| flag.device_error(),
        )
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
            let ready = match self.events.wait(-1, &mut events) {
                Ok(Woken::Events(ready)) => ready,
                Ok(Woken::Stop) => return,
                Err(e) => {
                    log::error!("virtio-fs {}: epoll failed: {e}", self.tag);
                    return;
                }
            };
            for event in ready {
                match event.data() {
                    SOCKET => self.backend_gone(),
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

    fn backend_gone(&self) {
        self.failed.store(true, Ordering::SeqCst);
        log::error!(
            "virtio-fs {}: virtiofsd closed the connection; the device is failed",
            self.tag
        );
        self.interrupt.device_error();
        // Level-triggered: stop watching, or the hang-up would spin this thread.
        if let Err(e) = self.events.remove(&self.socket) {
            log::warn!("virtio-fs {}: cannot unwatch the socket: {e}", self.tag);
        }
    }
}
