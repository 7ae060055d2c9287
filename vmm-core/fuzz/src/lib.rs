//! What the fuzz targets share: a reader over the fuzzer's bytes, guest memory with split queues
//! laid out in it, and an allocator that turns any single allocation above `MAX_ALLOCATION` into
//! a crash, so "the host's memory stays bounded whatever the guest writes" is checked on every
//! input, not only in the unit tests.

use accordion_vmm::devices::virtio::alloc_probe::ObservedAlloc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Largest single allocation a target may make. The largest legitimate one is a vsock
/// connection's buffer (256 KiB); guest memory itself is an mmap, not an allocation.
pub const MAX_ALLOCATION: usize = 1 << 20;

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // No formatting here: it could allocate.
        let msg = b"fuzz: single allocation above MAX_ALLOCATION\n";
        // SAFETY: writes a static buffer to stderr; the result does not matter, we abort next.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
}

/// The system allocator, aborting (a crash libFuzzer reports) on an allocation above the bound.
#[global_allocator]
static ALLOC: ObservedAlloc = ObservedAlloc(check);

/// libFuzzer's `main` is not Rust's: SIGPIPE is not ignored. A host socket the VMM writes to after
/// the harness closed it must give EPIPE, as in the shim, not kill the fuzzer.
pub fn ignore_sigpipe() {
    // SAFETY: sets a signal disposition to SIG_IGN; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// The fuzzer's bytes, taken front to back; exhausted input reads as zeros.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// Guest RAM of the targets: 64 KiB at address 0.
pub const MEMORY: usize = 64 * 1024;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 16;

/// Where a split queue lives in guest memory: descriptor table, avail ring, used ring.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Ring {
    /// Queue `index`'s rings in the first pages of guest memory (1 KiB apart per queue).
    pub const fn nth(index: u64) -> Self {
        let base = index * 0x400;
        Self {
            desc: base,
            avail: base + 0x100,
            used: base + 0x200,
        }
    }

    /// A ready queue of `QUEUE_SIZE` over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("a power-of-two queue size");
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// The driver makes descriptor `head` available (whatever the table holds there).
    pub fn offer(&self, memory: &GuestMemoryMmap, head: u16) {
        let idx: u16 = memory
            .read_obj(GuestAddress(self.avail + 2))
            .unwrap_or_default();
        let slot = self.avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        let _ = memory.write_obj(head, GuestAddress(slot));
        let _ = memory.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2));
    }
}

/// Guest memory holding `image` from address 0 (the rest zero).
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)])
        .expect("64 KiB of anonymous memory");
    let _ = memory.write_slice(&image[..image.len().min(MEMORY)], GuestAddress(0));
    memory
}

/// The driver writes `bytes` at `addr` (anything it likes, rings included).
pub fn guest_write(memory: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    let _ = memory.write_slice(bytes, GuestAddress(addr));
}
