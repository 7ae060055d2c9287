//! virtio-mem (virtio 1.2 §5.15): guest RAM that grows and shrinks while the VM runs.
//!
//! The device owns a region of guest physical memory above boot RAM, backed by a memfd of its
//! own and mapped into the VM (one KVM memslot) from the start. The host sets `requested_size`
//! ([`MemoryControl::set_requested`], a config-change interrupt); the guest's driver plugs or
//! unplugs blocks to reach it, one request at a time on the device's only queue. Blocks the guest
//! unplugs are punched out of the memfd, so the host gets the memory back; plugs beyond the
//! requested size are refused.
//!
//! Block size: 2 MiB. Linux (6.12) on arm64 with 4 KiB pages manages virtio-mem memory in
//! pageblocks of 2 MiB (it uses the larger of its pageblock and the device's block), and 2 MiB is
//! the host's transparent huge page: a discarded block frees whole huge pages. The region starts
//! and ends on 128 MiB, Linux's arm64 memory block, or the guest could not use its edges.
//!
//! The guest cannot take more than the region: every request's range is checked against it, and
//! a guest touching unplugged memory behind the driver's back can fault in at most the region
//! (docs/security.md, "Memory resize").

mod backend;
pub mod blocks;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::blocks::{Blocks, Discard};
use super::INTERRUPT_CONFIG;
use super::{read_config_space, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::event_loop::{self, Filter};
use crate::seccomp::ThreadKind;

pub use backend::Backend;

/// virtio device ID of a memory device.
pub const DEVICE_ID: u32 = 24;
/// One request queue.
const QUEUE_SIZES: [u16; 1] = [128];
/// Bytes per block (see the module comment for why 2 MiB).
pub const BLOCK_SIZE: u64 = 2 << 20;
/// The region's alignment and size granule: Linux's arm64 memory block (4 KiB pages).
pub const REGION_ALIGN: u64 = 128 << 20;
/// VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: the driver must not read or write unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
/// Bytes of struct virtio_mem_config.
const CONFIG_LEN: usize = 56;

/// Errors from creating the device or changing its size.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The region is empty, misaligned or not a whole number of memory blocks.
    #[error("invalid virtio-mem region of {size:#x} bytes at {base:#x}: both must be multiples of 128 MiB")]
    Region {
        /// Guest address.
        base: u64,
        /// Bytes.
        size: u64,
    },
    /// The host asked for more than the region holds.
    #[error("cannot ask for {requested} bytes of hotplugged memory: the region holds {region}")]
    AboveRegion {
        /// Bytes asked for.
        requested: u64,
        /// Bytes in the region.
        region: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create a virtio-mem eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The device's sizes at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySnapshot {
    /// Guest address of the region.
    pub region_base: u64,
    /// Bytes in the region.
    pub region_size: u64,
    /// Bytes per block.
    pub block_size: u64,
    /// Bytes the guest has plugged.
    pub plugged: u64,
    /// Bytes the host asked for.
    pub requested: u64,
}

/// What the device thread, the vCPUs (config reads) and the VM's owner (resizes) share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever the plugged or the requested size changes.
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    blocks: Blocks,
    /// Bumped on every host-side config change (the transport adds its own).
    generation: u32,
    /// The driver's interrupt, once it started the device.
    interrupt: Option<Arc<VirtioInterrupt>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot {
            region_base: self.blocks.base(),
            region_size: self.blocks.region_size(),
            block_size: self.blocks.block_size(),
            plugged: self.blocks.plugged_size(),
            requested: self.blocks.requested_size(),
        }
    }
}

/// The host's handle on the device: ask for a size, see how far the guest got.
#[derive(Debug, Clone)]
pub struct MemoryControl {
    shared: Arc<Shared>,
}

impl MemoryControl {
    /// The sizes now.
    pub fn snapshot(&self) -> MemorySnapshot {
        self.shared.lock().snapshot()
    }

    /// Asks the guest to have `bytes` of the region plugged (rounded up to whole blocks), and
    /// tells it so with a config-change interrupt if its driver runs. Returns the size asked for.
    /// More than the region changes nothing.
    pub fn set_requested(&self, bytes: u64) -> Result<u64, MemError> {
        let mut state = self.shared.lock();
        let region = state.blocks.region_size();
        if bytes > region {
            return Err(MemError::AboveRegion {
                requested: bytes,
                region,
            });
        }
        let blocks = bytes.div_ceil(state.blocks.block_size());
        state.blocks.set_requested_blocks(blocks);
        state.generation = state.generation.wrapping_add(1);
        if let Some(interrupt) = &state.interrupt {
            interrupt.raise(INTERRUPT_CONFIG);
        }
        self.shared.changed.notify_all();
        Ok(state.blocks.requested_size())
    }

    /// Which blocks are plugged, in order (the fuzz targets check the memfd against it).
    #[cfg(feature = "fuzzing")]
    pub fn plugged_blocks(&self) -> Vec<bool> {
        let state = self.shared.lock();
        (0..state.blocks.count())
            .map(|b| state.blocks.is_plugged(b))
            .collect()
    }

    /// Waits up to `timeout` for the plugged or the requested size to differ from `seen`'s;
    /// returns the sizes then (unchanged on timeout).
    pub fn wait_changed(&self, seen: &MemorySnapshot, timeout: Duration) -> MemorySnapshot {
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, timeout, |s| {
                let now = s.snapshot();
                now.plugged == seen.plugged && now.requested == seen.requested
            })
            .unwrap_or_else(|e| e.into_inner());
        state.snapshot()
    }

    /// Waits until the plugged size equals the requested size; after `timeout`, returns the
    /// sizes reached as the error.
    pub fn wait_plugged(&self, timeout: Duration) -> Result<MemorySnapshot, MemorySnapshot> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let now = state.snapshot();
            if now.plugged == now.requested {
                return Ok(now);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(now);
            };
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Punches ranges out of the region's memfd: the pages go back to the host and leave every
/// mapping of them (the VMM's, KVM's stage 2, a vhost-user back end's).
#[derive(Debug)]
pub struct MemfdDiscard(Arc<File>);

impl Discard for MemfdDiscard {
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a file descriptor we own; punching a hole changes the file's
        // contents (the guest's unplugged memory), never this process's memory layout.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// The virtio-mem device.
pub struct Mem {
    shared: Arc<Shared>,
    memfd: Arc<File>,
    kick: Arc<EventFd>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Mem {
    /// A device for the region of `size` bytes at guest address `base`, backed by `memfd` (the
    /// region's own, mapped into the VM by the caller); nothing plugged or requested.
    pub fn new(base: u64, size: u64, memfd: Arc<File>) -> Result<Self, MemError> {
        if size == 0 || base % REGION_ALIGN != 0 || size % REGION_ALIGN != 0 {
            return Err(MemError::Region { base, size });
        }
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(MemError::EventFd)
        };
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    blocks: Blocks::new(base, BLOCK_SIZE, size / BLOCK_SIZE),
                    generation: 0,
                    interrupt: None,
                }),
                changed: Condvar::new(),
            }),
            memfd,
            kick: eventfd()?,
            stop: eventfd()?,
            thread: None,
        })
    }

    /// The host's handle for resizing.
    pub fn control(&self) -> MemoryControl {
        MemoryControl {
            shared: self.shared.clone(),
        }
    }

    /// The fuzz targets' way in: this device's request server over `queue`, run by the
    /// caller's thread (`Backend::process`) instead of a thread of its own.
    #[cfg(feature = "fuzzing")]
    pub fn backend_for_fuzzing(
        &self,
        memory: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Backend> {
        Backend::new(
            memory,
            queue,
            interrupt,
            self.shared.clone(),
            MemfdDiscard(self.memfd.clone()),
            &self.stop,
            &self.kick,
        )
    }

    fn stop_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            if thread.join().is_err() {
                log::error!("virtio-mem thread panicked");
            }
            // The next activation starts from a quiet stop eventfd.
            let _ = self.stop.read();
        }
    }

    /// struct virtio_mem_config: block_size, node_id (+6 padding), addr, region_size,
    /// usable_region_size, plugged_size, requested_size (all little endian).
    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let s = self.shared.lock().snapshot();
        let mut c = [0u8; CONFIG_LEN];
        let fields = [
            (0, s.block_size),
            (16, s.region_base),
            (24, s.region_size),
            // The whole region is usable: plugs beyond the requested size are refused anyway.
            (32, s.region_size),
            (40, s.plugged),
            (48, s.requested),
        ];
        for (at, value) in fields {
            c[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        c
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_bytes(), offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.shared.lock().generation
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        _acked_features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.thread.is_some() {
            return Err(ActivateError::BadConfig(
                "virtio-mem activated twice".into(),
            ));
        }
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadConfig(format!("{} queues", queues.len())));
        }
        let Some(queue) = queues.pop() else {
            return Err(ActivateError::BadConfig("no queue".into()));
        };
        let backend = Backend::new(
            memory,
            queue,
            interrupt.clone(),
            self.shared.clone(),
            MemfdDiscard(self.memfd.clone()),
            &self.stop,
            &self.kick,
        )
        .map_err(ActivateError::Backend)?;
        let kick = self.kick.clone();
        let flag = interrupt.clone();
        let thread = event_loop::spawn(
            Filter::Seccomp(ThreadKind::Mem),
            move || backend.run(&kick),
            move |_| flag.device_error(),
        )
        .map_err(ActivateError::Backend)?;
        self.shared.lock().interrupt = Some(interrupt);
        self.thread = Some(thread);
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        if let Err(e) = self.kick.write(1) {
            crate::log_limited!(log::Level::Warn, "cannot wake the virtio-mem thread: {e}");
        }
    }

    fn reset(&mut self) -> bool {
        // Blocks stay as they are: a driver that starts again finds plugged_size and unplugs
        // (UNPLUG_ALL) before it plugs anew.
        self.stop_thread();
        self.shared.lock().interrupt = None;
        true
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
