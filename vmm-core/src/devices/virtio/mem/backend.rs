//! virtio-mem's thread: takes the guest's requests off the queue, applies them to the block map
//! (which discards unplugged memory), answers each, and wakes whoever waits for a size.
//!
//! A request chain must carry the whole request in its readable part and room for the whole
//! response in its writable part; anything else is a driver bug or a hostile guest, and stops the
//! device (DEVICE_NEEDS_RESET) instead of being guessed at.

use std::sync::Arc;

use log::Level;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::blocks::{Request, REQUEST_LEN, RESPONSE_LEN};
use super::{MemfdDiscard, Shared};
use crate::devices::event_loop::{EventLoop, Woken};
use crate::devices::virtio::chain;
use crate::devices::virtio::VirtioInterrupt;
use crate::log_limited;

const TOKEN_KICK: u64 = 0;

/// The request queue's server.
pub struct Backend {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    shared: Arc<Shared>,
    discard: MemfdDiscard,
    events: EventLoop,
    broken: bool,
}

impl Backend {
    /// A server for `queue`, woken by `kick`, ended by `stop`.
    pub(super) fn new(
        memory: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<VirtioInterrupt>,
        shared: Arc<Shared>,
        discard: MemfdDiscard,
        stop: &EventFd,
        kick: &EventFd,
    ) -> std::io::Result<Self> {
        let events = EventLoop::new(stop)?;
        events.add(kick, EventSet::IN, TOKEN_KICK)?;
        Ok(Self {
            memory,
            queue,
            interrupt,
            shared,
            discard,
            events,
            broken: false,
        })
    }

    /// Serves the queue until `stop` is signalled.
    pub fn run(mut self, kick: &EventFd) {
        let mut events = [EpollEvent::default(); 2];
        loop {
            match self.events.wait(-1, &mut events) {
                Ok(Woken::Events(_)) => {
                    let _ = kick.read();
                    self.process();
                }
                Ok(Woken::Stop) => return,
                Err(e) => {
                    log::error!("virtio-mem: epoll failed, device stops: {e}");
                    return;
                }
            }
        }
    }

    fn malformed(&mut self, what: &dyn std::fmt::Display) {
        if !self.broken {
            log_limited!(
                Level::Error,
                "virtio-mem: {what}; device stopped until the guest resets it"
            );
            self.broken = true;
            self.interrupt.device_error();
        }
    }

    /// Answers every request the guest queued.
    pub fn process(&mut self) {
        let memory = self.memory.clone();
        let mut used = false;
        while !self.broken {
            let chain = match chain::pop(&mut self.queue, &memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.malformed(&e);
                    break;
                }
            };
            let mut bytes = [0u8; REQUEST_LEN];
            if chain.readable_len() < REQUEST_LEN as u64
                || chain.writable_len() < RESPONSE_LEN as u64
                || !chain.read_at(&memory, 0, &mut bytes)
            {
                self.malformed(&format_args!(
                    "request chain with {} readable and {} writable bytes (need {REQUEST_LEN} \
                     and {RESPONSE_LEN})",
                    chain.readable_len(),
                    chain.writable_len()
                ));
                break;
            }
            let request = Request::parse(&bytes);
            let response = {
                let mut state = self.shared.lock();
                let before = state.blocks.plugged_size();
                let response = state.blocks.handle(&request, &self.discard);
                if state.blocks.plugged_size() != before {
                    self.shared.changed.notify_all();
                }
                response
            };
            log::debug!("virtio-mem: {request:?} -> {response:?}");
            if !chain.write_at(&memory, 0, &response.to_bytes()) {
                self.malformed(&"response buffer outside guest memory");
                break;
            }
            if self
                .queue
                .add_used(&memory, chain.head(), RESPONSE_LEN as u32)
                .is_err()
            {
                self.malformed(&"used ring outside guest memory");
                break;
            }
            used = true;
        }
        if used {
            self.interrupt.notify_used(&mut self.queue, &self.memory);
        }
    }
}
