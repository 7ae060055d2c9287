//! For unit tests only: the guest driver's side of a split virtqueue, so hostile-ring tests of
//! every device back end write descriptor chains the same way.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

/// Writes `descs` (address, length, flags) as one chain at the next free descriptor indices
/// (`next`, advanced) of a queue of `size` entries, each linked to the following one (used when
/// it has F_NEXT), and makes the chain's head available.
pub fn offer(
    queue: &MockSplitQueue<'_, GuestMemoryMmap>,
    size: u16,
    next: &mut u16,
    descs: &[(u64, u32, u16)],
) {
    let head = *next;
    for &(addr, len, flags) in descs {
        let index = *next;
        *next = (*next + 1) % size;
        let desc = SplitDescriptor::new(addr, len, flags, *next);
        queue
            .desc_table()
            .store(index, RawDescriptor::from(desc))
            .unwrap();
    }
    let avail: u16 = queue.avail().idx().load();
    queue
        .avail()
        .ring()
        .ref_at(usize::from(avail % size))
        .unwrap()
        .store(head);
    queue.avail().idx().store(avail.wrapping_add(1));
}
