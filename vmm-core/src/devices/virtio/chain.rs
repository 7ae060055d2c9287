//! Descriptor chains checked before a device acts on them (virtio 1.2 §2.7.5).
//!
//! virtio-queue's own iterators follow an indirect table whether or not VIRTIO_F_INDIRECT_DESC
//! was negotiated, end a looping chain silently wherever their budget runs out, and log every bad
//! avail index through `log::error!` (a line per guest kick). No userspace device here offers
//! INDIRECT_DESC, so `pop` reads the chain itself and hands a device a `Chain` only if
//! - the avail index is at most a queue ahead and every descriptor index is inside the queue;
//! - no descriptor is indirect and the chain ends within `queue size` descriptors (no loop);
//! - device-readable buffers come before device-writable ones;
//! - every buffer lies in guest memory.
//!
//! A chain therefore holds at most `queue size` buffers (4 KiB of bookkeeping for 256), whatever
//! lengths the guest wrote into them: descriptors may alias the same pages and add up to almost
//! 4 GiB. A device decides itself how many of those bytes it is willing to touch, and touches
//! them in place (`readable_slices`, `writable_slices`), never through a copy sized by the guest.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Bytes of one split-ring descriptor.
const DESCRIPTOR_SIZE: u64 = 16;

/// Why a chain was refused. Every variant is a driver bug or a hostile guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The avail index runs more than a queue ahead of the device.
    #[error("available ring index more than a queue ahead")]
    AvailIndex,
    /// The avail ring could not be read.
    #[error("available ring outside guest memory")]
    AvailRing,
    /// A head or `next` index outside the queue.
    #[error("descriptor index {index} outside a queue of {size}")]
    Index {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// An indirect descriptor: the feature is never offered.
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    Indirect,
    /// The chain does not end within the queue size: it loops.
    #[error("chain longer than its queue (a loop)")]
    Loop,
    /// A device-readable buffer after a device-writable one.
    #[error("readable descriptor after a writable one")]
    Order,
    /// A buffer (or the descriptor table) outside guest memory.
    #[error("buffer of {len} bytes at {addr:#x} outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    addr: GuestAddress,
    len: u32,
}

/// A checked descriptor chain: its head (for the used ring) and its buffers.
#[derive(Debug)]
pub struct Chain {
    head: u16,
    buffers: Vec<Buffer>,
    /// The first `readable` buffers are device-readable, the rest device-writable.
    readable: usize,
}

/// Takes the next chain the driver made available, checked; `Ok(None)` if there is none (or the
/// queue was never made ready).
pub fn pop(queue: &mut Queue, memory: &GuestMemoryMmap) -> Result<Option<Chain>, ChainError> {
    let head = match queue.iter(memory) {
        Ok(mut iter) => match iter.next() {
            Some(chain) => chain.head_index(),
            // `next` also ends when the avail ring entry cannot be read; activation checked the
            // ring lies in guest memory, so this is "nothing available".
            None => return Ok(None),
        },
        Err(virtio_queue::Error::QueueNotReady) => return Ok(None),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => return Err(ChainError::AvailIndex),
        Err(_) => return Err(ChainError::AvailRing),
    };
    walk(memory, GuestAddress(queue.desc_table()), queue.size(), head).map(Some)
}

/// Reads the chain from `head` in the descriptor table at `table` of a queue of `size`.
fn walk(
    memory: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Chain, ChainError> {
    let mut buffers = Vec::new();
    let mut readable = 0;
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Err(ChainError::Index { index, size });
        }
        let at = table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .ok_or(ChainError::OutsideMemory {
                addr: table.raw_value(),
                len: u64::from(size) * DESCRIPTOR_SIZE,
            })?;
        let desc: Descriptor = memory.read_obj(at).map_err(|_| ChainError::OutsideMemory {
            addr: at.raw_value(),
            len: DESCRIPTOR_SIZE,
        })?;
        if desc.refers_to_indirect_table() {
            return Err(ChainError::Indirect);
        }
        let buffer = Buffer {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !memory.check_range(buffer.addr, buffer.len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: buffer.addr.raw_value(),
                len: u64::from(buffer.len),
            });
        }
        if !desc.is_write_only() {
            if buffers.len() > readable {
                return Err(ChainError::Order);
            }
            readable += 1;
        }
        buffers.push(buffer);
        if !desc.has_next() {
            return Ok(Chain {
                head,
                buffers,
                readable,
            });
        }
        index = desc.next();
    }
    Err(ChainError::Loop)
}

impl Chain {
    /// The head index, for the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Device-readable bytes (descriptors may alias: this is what the guest claims).
    pub fn readable_len(&self) -> u64 {
        total(&self.buffers[..self.readable])
    }

    /// Device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        total(&self.buffers[self.readable..])
    }

    /// The readable bytes `[offset, offset + len)` as slices of guest memory, in order; `None`
    /// if the chain has fewer readable bytes.
    pub fn readable_slices<'m>(
        &self,
        memory: &'m GuestMemoryMmap,
        offset: u64,
        len: usize,
    ) -> Option<Vec<VolatileSlice<'m>>> {
        slices(memory, &self.buffers[..self.readable], offset, len)
    }

    /// The writable bytes `[offset, offset + len)` as slices of guest memory, in order; `None`
    /// if the chain has fewer writable bytes.
    pub fn writable_slices<'m>(
        &self,
        memory: &'m GuestMemoryMmap,
        offset: u64,
        len: usize,
    ) -> Option<Vec<VolatileSlice<'m>>> {
        slices(memory, &self.buffers[self.readable..], offset, len)
    }

    /// Copies readable bytes from `offset` into `out`; false if the chain has fewer.
    pub fn read_at(&self, memory: &GuestMemoryMmap, offset: u64, out: &mut [u8]) -> bool {
        let Some(slices) = self.readable_slices(memory, offset, out.len()) else {
            return false;
        };
        let mut at = 0;
        for s in slices {
            at += s.copy_to(&mut out[at..]);
        }
        at == out.len()
    }

    /// Copies `data` into the writable bytes from `offset`; false if the chain has fewer.
    pub fn write_at(&self, memory: &GuestMemoryMmap, offset: u64, data: &[u8]) -> bool {
        let Some(slices) = self.writable_slices(memory, offset, data.len()) else {
            return false;
        };
        let mut at = 0;
        for s in slices {
            s.copy_from(&data[at..at + s.len()]);
            at += s.len();
        }
        at == data.len()
    }
}

fn total(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// `[offset, offset + len)` of the concatenation of `buffers`, as guest-memory slices (a buffer
/// crossing a memory region boundary gives one slice per region).
fn slices<'m>(
    memory: &'m GuestMemoryMmap,
    buffers: &[Buffer],
    offset: u64,
    len: usize,
) -> Option<Vec<VolatileSlice<'m>>> {
    let mut out = Vec::new();
    let mut skip = offset;
    let mut want = len as u64;
    for b in buffers {
        if want == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(want);
        let start = b.addr.checked_add(skip)?;
        for s in memory.get_slices(start, usize::try_from(take).ok()?) {
            out.push(s.ok()?);
        }
        want -= take;
        skip = 0;
    }
    (want == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Stores `descs` at indices 0.. and makes index `head` available.
    fn offer(
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        descs: &[(u64, u32, u16, u16)],
        head: u16,
    ) -> Queue {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            q.desc_table().store(i as u16, d).unwrap();
        }
        q.avail().ring().ref_at(0).unwrap().store(head);
        q.avail().idx().store(1);
        q.create_queue().unwrap()
    }

    #[test]
    fn test_pop_returns_readable_then_writable_buffers() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 10, F_NEXT, 1), (0x9000, 20, F_WRITE, 0)], 0);
        let chain = pop(&mut queue, &m).unwrap().unwrap();
        assert_eq!(
            (chain.head(), chain.readable_len(), chain.writable_len()),
            (0, 10, 20)
        );
        assert!(pop(&mut queue, &m).unwrap().is_none());
    }

    #[test]
    fn test_pop_refuses_a_looping_chain() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 10, F_NEXT, 1), (0x8000, 10, F_NEXT, 0)], 0);
        assert_eq!(pop(&mut queue, &m).unwrap_err(), ChainError::Loop);
    }

    #[test]
    fn test_pop_refuses_indirect_descriptors() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 16 * 4, F_INDIRECT, 0)], 0);
        assert_eq!(pop(&mut queue, &m).unwrap_err(), ChainError::Indirect);
    }

    #[test]
    fn test_pop_refuses_a_head_outside_the_queue() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 10, 0, 0)], 99);
        assert_eq!(
            pop(&mut queue, &m).unwrap_err(),
            ChainError::Index {
                index: 99,
                size: 16
            }
        );
    }

    #[test]
    fn test_pop_refuses_a_next_outside_the_queue() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 10, F_NEXT, 16)], 0);
        assert_eq!(
            pop(&mut queue, &m).unwrap_err(),
            ChainError::Index {
                index: 16,
                size: 16
            }
        );
    }

    #[test]
    fn test_pop_refuses_a_buffer_outside_guest_memory() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(1 << 30, 10, 0, 0)], 0);
        assert!(matches!(
            pop(&mut queue, &m).unwrap_err(),
            ChainError::OutsideMemory { .. }
        ));
    }

    #[test]
    fn test_pop_refuses_readable_after_writable() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(
            &q,
            &[(0x8000, 10, F_WRITE | F_NEXT, 1), (0x9000, 10, 0, 0)],
            0,
        );
        assert_eq!(pop(&mut queue, &m).unwrap_err(), ChainError::Order);
    }

    #[test]
    fn test_pop_refuses_an_avail_index_more_than_a_queue_ahead() {
        let m = memory();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 10, 0, 0)], 0);
        q.avail().idx().store(17);
        assert_eq!(pop(&mut queue, &m).unwrap_err(), ChainError::AvailIndex);
    }

    #[test]
    fn test_slices_span_buffers_from_an_offset() {
        let m = memory();
        m.write_slice(b"abcdef", GuestAddress(0x8000)).unwrap();
        m.write_slice(b"ghij", GuestAddress(0x9000)).unwrap();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut queue = offer(&q, &[(0x8000, 6, F_NEXT, 1), (0x9000, 4, 0, 0)], 0);
        let chain = pop(&mut queue, &m).unwrap().unwrap();
        let mut out = [0u8; 6];
        let ok = chain.read_at(&m, 3, &mut out);
        let short = chain.read_at(&m, 5, &mut out);
        assert!(ok);
        assert_eq!(&out, b"defghi");
        assert!(!short);
    }
}
