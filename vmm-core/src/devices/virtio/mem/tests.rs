//! virtio-mem driven as a guest would, honest and hostile: the request queue in guest memory,
//! the region a real memfd whose pages are counted before and after an unplug.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::blocks::*;
use super::*;
use crate::devices::irq::IrqLine;
use crate::devices::virtio::alloc_probe::largest_allocation;
use crate::devices::virtio::INTERRUPT_USED_RING;
use crate::memory::GuestRam;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const QUEUE_SIZE: u16 = 128;
/// Boot RAM of the rig: rings and request buffers.
const RAM_BASE: u64 = 0;
const RAM: u64 = 1 << 20;
const REQ: u64 = 0x8_0000;
const RESP: u64 = 0x9_0000;
/// The region: 256 MiB at 1 GiB.
const REGION_BASE: u64 = 1 << 30;
const REGION: u64 = 256 << 20;

struct Rig {
    ram: GuestRam,
    device: Mem,
    interrupt: Arc<VirtioInterrupt>,
    /// Where the rings are (virtio-queue's mock laid them out once; making it again would
    /// zero their indices).
    rings: (GuestAddress, GuestAddress, GuestAddress),
    /// Chains offered so far (the avail index).
    next: u16,
}

impl Rig {
    fn new() -> Self {
        let ram = GuestRam::with_hotplug(RAM_BASE, RAM, Some((REGION_BASE, REGION))).unwrap();
        let memfd = ram.hotplug().unwrap().memfd.clone();
        let mut device = Mem::new(REGION_BASE, REGION, memfd).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).unwrap()));
        let mock = MockSplitQueue::create(ram.memory(), GuestAddress(0), QUEUE_SIZE);
        let rings = (mock.desc_table_addr(), mock.avail_addr(), mock.used_addr());
        let queue = mock.create_queue().unwrap();
        device
            .activate(ram.memory().clone(), 0, vec![queue], interrupt.clone())
            .unwrap();
        Self {
            ram,
            device,
            interrupt,
            rings,
            next: 0,
        }
    }

    fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    fn used_idx(&self) -> u16 {
        self.memory()
            .read_obj(self.rings.2.unchecked_add(2))
            .unwrap()
    }

    /// Offers `descs` (address, length, flags) as one chain, each linked to the next, and kicks;
    /// waits (bounded) for the used index to move or the device to give up.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        let before = self.used_idx();
        let (table, avail, _) = self.rings;
        let head = self.next.wrapping_mul(4) % QUEUE_SIZE;
        for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&((head + i + 1) % QUEUE_SIZE).to_le_bytes());
            let at = table.unchecked_add(16 * u64::from((head + i) % QUEUE_SIZE));
            self.memory().write_slice(&d, at).unwrap();
        }
        let slot = avail.unchecked_add(4 + 2 * u64::from(self.next % QUEUE_SIZE));
        self.memory().write_obj(head, slot).unwrap();
        self.next = self.next.wrapping_add(1);
        self.memory()
            .write_obj(self.next, avail.unchecked_add(2))
            .unwrap();
        self.device.queue_notify(0);
        for _ in 0..500 {
            if self.used_idx() != before || self.interrupt.needs_reset() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends one well-formed request and returns the device's answer.
    fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> Response {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[..2].copy_from_slice(&kind.to_le_bytes());
        bytes[8..16].copy_from_slice(&addr.to_le_bytes());
        bytes[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        self.memory()
            .write_slice(&bytes, GuestAddress(REQ))
            .unwrap();
        self.memory()
            .write_slice(&[0xee; RESPONSE_LEN], GuestAddress(RESP))
            .unwrap();
        let before = self.used_idx();
        self.submit(&[
            (REQ, REQUEST_LEN as u32, F_NEXT),
            (RESP, RESPONSE_LEN as u32, F_WRITE),
        ]);
        assert_ne!(
            self.used_idx(),
            before,
            "no answer to {kind} at {addr:#x} (device broken: {})",
            self.interrupt.needs_reset()
        );
        let mut out = [0u8; RESPONSE_LEN];
        self.memory()
            .read_slice(&mut out, GuestAddress(RESP))
            .unwrap();
        Response {
            kind: u16::from_le_bytes([out[0], out[1]]),
            state: u16::from_le_bytes([out[8], out[9]]),
        }
    }

    fn block(&self, n: u64) -> u64 {
        REGION_BASE + n * BLOCK_SIZE
    }

    /// Pages of the region's memfd resident on the host, in bytes.
    fn resident(&self) -> u64 {
        let memfd = &self.ram.hotplug().unwrap().memfd;
        let len = REGION as usize;
        // SAFETY: a fresh read-only shared mapping of our own memfd, unmapped below; mincore only
        // reports which of its pages are resident.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&**memfd),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            let page = 4096;
            let mut vec = vec![0u8; len / page];
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
            vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64
        }
    }
}

fn ack() -> Response {
    Response {
        kind: RESP_ACK,
        state: 0,
    }
}

#[test]
fn test_config_space_describes_the_region_and_follows_requests() {
    let rig = Rig::new();
    let read = |at: u64| {
        let mut v = [0u8; 8];
        rig.device.read_config(at, &mut v);
        u64::from_le_bytes(v)
    };
    assert_eq!(
        (read(0), read(16), read(24), read(32), read(40), read(48)),
        (BLOCK_SIZE, REGION_BASE, REGION, REGION, 0, 0)
    );
    let generation = rig.device.config_generation();
    let control = rig.device.control();
    // 3 MiB is rounded up to two blocks.
    assert_eq!(control.set_requested(3 << 20).unwrap(), 4 << 20);
    assert_eq!(read(48), 4 << 20);
    assert_ne!(rig.device.config_generation(), generation);
    assert_ne!(rig.interrupt.status() & INTERRUPT_CONFIG, 0);
}

#[test]
fn test_guest_plugs_up_to_the_request_and_waiters_see_it() {
    let mut rig = Rig::new();
    let control = rig.device.control();
    control.set_requested(8 << 20).unwrap();
    let waiter = {
        let control = control.clone();
        std::thread::spawn(move || control.wait_plugged(Duration::from_secs(10)))
    };
    assert_eq!(rig.request(REQ_PLUG, rig.block(0), 2), ack());
    assert_eq!(rig.request(REQ_PLUG, rig.block(10), 2), ack());
    // A fifth block is more than asked for.
    assert_eq!(rig.request(REQ_PLUG, rig.block(20), 1).kind, RESP_NACK);
    let reached = waiter.join().unwrap().unwrap();
    assert_eq!((reached.plugged, reached.requested), (8 << 20, 8 << 20));
    assert_ne!(rig.interrupt.status() & INTERRUPT_USED_RING, 0);
}

#[test]
fn test_unplugged_blocks_go_back_to_the_host() {
    let mut rig = Rig::new();
    let control = rig.device.control();
    control.set_requested(64 << 20).unwrap();
    assert_eq!(rig.request(REQ_PLUG, rig.block(0), 32), ack());
    // The guest fills what it plugged.
    let fill = vec![0x5au8; (64 << 20) as usize];
    rig.memory()
        .write_slice(&fill, GuestAddress(REGION_BASE))
        .unwrap();
    assert_eq!(rig.resident(), 64 << 20);
    control.set_requested(16 << 20).unwrap();
    assert_eq!(rig.request(REQ_UNPLUG, rig.block(8), 24), ack());
    assert_eq!(rig.resident(), 16 << 20);
    // What stays plugged keeps its contents; what went reads as zero.
    let mut byte = [0u8; 1];
    let memfd = rig.ram.hotplug().unwrap().memfd.clone();
    memfd.read_exact_at(&mut byte, (16 << 20) - 1).unwrap();
    assert_eq!(byte, [0x5a]);
    memfd.read_exact_at(&mut byte, 16 << 20).unwrap();
    assert_eq!(byte, [0]);
    assert_eq!(rig.request(REQ_UNPLUG_ALL, 0, 0), ack());
    assert_eq!(rig.resident(), 0);
    assert_eq!(control.snapshot().plugged, 0);
}

#[test]
fn test_state_requests_answer_for_the_range() {
    let mut rig = Rig::new();
    rig.device.control().set_requested(4 << 20).unwrap();
    assert_eq!(rig.request(REQ_PLUG, rig.block(1), 1), ack());
    let state = rig.request(REQ_STATE, rig.block(0), 3);
    assert_eq!((state.kind, state.state), (RESP_ACK, STATE_MIXED));
}

#[test]
fn test_hostile_ranges_are_refused_and_nothing_outside_the_region_is_discarded() {
    let mut rig = Rig::new();
    let control = rig.device.control();
    control.set_requested(REGION).unwrap();
    // Boot RAM holds data a hostile unplug would like to destroy.
    rig.memory()
        .write_slice(b"boot", GuestAddress(0xa_0000))
        .unwrap();
    let hostile = [
        (REQ_PLUG, REGION_BASE - BLOCK_SIZE, 1),
        (REQ_PLUG, REGION_BASE + REGION, 1),
        (REQ_PLUG, REGION_BASE + REGION - BLOCK_SIZE, 2),
        (REQ_PLUG, REGION_BASE + 4096, 1),
        (REQ_PLUG, u64::MAX - 4095, u16::MAX),
        (REQ_UNPLUG, 0, 1),
        (REQ_UNPLUG, REGION_BASE, u16::MAX),
        (REQ_STATE, 0xa_0000, 1),
        (0x7777, REGION_BASE, 1),
    ];
    for (kind, addr, n) in hostile {
        assert_eq!(
            rig.request(kind, addr, n).kind,
            RESP_ERROR,
            "{kind} {addr:#x} {n}"
        );
    }
    let mut boot = [0u8; 4];
    rig.memory()
        .read_slice(&mut boot, GuestAddress(0xa_0000))
        .unwrap();
    assert_eq!(&boot, b"boot");
    assert_eq!(control.snapshot().plugged, 0);
    assert!(!rig.interrupt.needs_reset());
}

#[test]
fn test_short_or_misordered_chains_stop_the_device_without_acting() {
    for descs in [
        // The request cut short.
        vec![(REQ, 8, F_NEXT), (RESP, RESPONSE_LEN as u32, F_WRITE)],
        // No room for the answer.
        vec![(REQ, REQUEST_LEN as u32, F_NEXT), (RESP, 4, F_WRITE)],
        // No answer buffer at all.
        vec![(REQ, REQUEST_LEN as u32, 0)],
        // The answer buffer first.
        vec![
            (RESP, RESPONSE_LEN as u32, F_WRITE | F_NEXT),
            (REQ, REQUEST_LEN as u32, 0),
        ],
        // An indirect table (never offered).
        vec![(REQ, 16, F_INDIRECT)],
        // The answer buffer outside guest memory.
        vec![
            (REQ, REQUEST_LEN as u32, F_NEXT),
            (RAM + (1 << 40), RESPONSE_LEN as u32, F_WRITE),
        ],
    ] {
        let mut rig = Rig::new();
        rig.device.control().set_requested(REGION).unwrap();
        let mut plug = [0u8; REQUEST_LEN];
        plug[8..16].copy_from_slice(&REGION_BASE.to_le_bytes());
        plug[16] = 4;
        rig.memory().write_slice(&plug, GuestAddress(REQ)).unwrap();
        rig.submit(&descs);
        assert!(rig.interrupt.needs_reset(), "{descs:?}");
        assert_eq!(rig.device.control().snapshot().plugged, 0, "{descs:?}");
    }
}

#[test]
fn test_a_flood_of_requests_allocates_nothing_sized_by_the_guest() {
    let mut rig = Rig::new();
    rig.device.control().set_requested(REGION).unwrap();
    let (result, largest) = largest_allocation(|| {
        for block in 0..64 {
            assert_eq!(rig.request(REQ_PLUG, rig.block(block * 2), 2), ack());
        }
        rig.request(REQ_STATE, REGION_BASE, (REGION / BLOCK_SIZE) as u16)
    });
    assert_eq!((result.kind, result.state), (RESP_ACK, STATE_PLUGGED));
    assert!(largest < 64 * 1024, "largest allocation {largest} bytes");
}

#[test]
fn test_reset_keeps_the_plugged_blocks_and_the_device_starts_again() {
    let mut rig = Rig::new();
    let control = rig.device.control();
    control.set_requested(4 << 20).unwrap();
    assert_eq!(rig.request(REQ_PLUG, rig.block(0), 2), ack());
    assert!(rig.device.reset());
    assert_eq!(control.snapshot().plugged, 4 << 20);
    // The driver starts over: fresh rings in the same place.
    let mock = MockSplitQueue::create(rig.memory(), GuestAddress(0), QUEUE_SIZE);
    let queue = mock.create_queue().unwrap();
    let memory = rig.memory().clone();
    rig.device
        .activate(memory, 0, vec![queue], rig.interrupt.clone())
        .unwrap();
    rig.next = 0;
    assert_eq!(rig.request(REQ_UNPLUG_ALL, 0, 0), ack());
    assert_eq!(control.snapshot().plugged, 0);
}

#[test]
fn test_a_region_off_the_memory_block_granule_is_refused() {
    let memfd = Arc::new(std::fs::File::open("/dev/null").unwrap());
    for (base, size) in [
        (REGION_BASE, 0),
        (REGION_BASE + BLOCK_SIZE, REGION),
        (REGION_BASE, REGION + BLOCK_SIZE),
    ] {
        assert!(matches!(
            Mem::new(base, size, memfd.clone()),
            Err(MemError::Region { .. })
        ));
    }
}

#[test]
fn test_wait_plugged_times_out_with_how_far_the_guest_got() {
    let mut rig = Rig::new();
    let control = rig.device.control();
    control.set_requested(8 << 20).unwrap();
    assert_eq!(rig.request(REQ_PLUG, rig.block(0), 1), ack());
    let reached = control.wait_plugged(Duration::from_millis(50)).unwrap_err();
    assert_eq!((reached.plugged, reached.requested), (2 << 20, 8 << 20));
    assert!(control.set_requested(REGION + 1).is_err());
    assert_eq!(control.snapshot().requested, 8 << 20);
}

#[test]
fn test_wait_changed_wakes_on_a_plug_and_times_out_without_one() {
    let mut rig = Rig::new();
    let control = rig.device.control();
    control.set_requested(8 << 20).unwrap();
    let seen = control.snapshot();
    // Nothing happens: the same sizes after the timeout.
    assert_eq!(control.wait_changed(&seen, Duration::from_millis(20)), seen);
    let waiter = {
        let control = control.clone();
        std::thread::spawn(move || control.wait_changed(&seen, Duration::from_secs(10)))
    };
    assert_eq!(rig.request(REQ_PLUG, rig.block(0), 1), ack());
    let now = waiter.join().unwrap();
    assert_eq!((now.plugged, now.requested), (2 << 20, 8 << 20));
}
