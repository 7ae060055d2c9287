//! The virtio-net back end thread: frames between the queues and the tap.
//!
//! - Guest → host (TX): each chain is one frame led by its virtio-net header. No offload is
//!   negotiated, so the guest's header must ask for none (flags 0, gso_type NONE): a frame whose
//!   header asks for checksum completion or segmentation is dropped and counted. The tap (which
//!   acts on those fields: IFF_VNET_HDR) never sees the guest's header, only a zero one the device
//!   writes, followed by the frame, in one write.
//! - Host → guest (RX): each tap read is one frame with its header; it goes into one RX chain
//!   (no VIRTIO_NET_F_MRG_RXBUF: the driver posts buffers big enough for a whole frame) behind a
//!   header the device writes: zero, with num_buffers 1. A tap frame whose header asks for an
//!   offload the guest did not negotiate is dropped and counted.
//!
//! One thread owns the queues and the tap; vCPU threads only wake it. Chains are guest-controlled
//! and checked (`chain.rs`): a malformed one (a loop, an indirect table, a buffer outside guest
//! memory, a TX frame shorter than its header or longer than `MAX_FRAME`, an RX buffer too small
//! for the frame) stops the device (DEVICE_NEEDS_RESET), never a panic. The device holds at most
//! two frames (`MAX_FRAME` each, allocated once). When the guest posts no RX buffers, the thread
//! stops polling the tap until the guest kicks RX; frames wait in the tap's queue (and the kernel
//! drops beyond it, as a full NIC ring would).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use log::Level;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;
use crate::devices::event_loop::{EventLoop, Woken};
use crate::devices::virtio::chain;
use crate::devices::virtio::VirtioInterrupt;
use crate::log_limited;

/// Queue indices.
pub const RX: usize = 0;
/// Guest → host frames.
pub const TX: usize = 1;

/// Largest frame with its header: a 64 KiB IP packet, its Ethernet and VLAN headers, the header.
pub const MAX_FRAME: usize = 65_535 + 14 + 4 + VNET_HDR_LEN;

/// struct virtio_net_hdr_v1 fields the device checks (virtio 1.2 §5.1.6).
mod hdr {
    /// flags (u8 at 0): VIRTIO_NET_HDR_F_NEEDS_CSUM 1, DATA_VALID 2, RSC_INFO 4.
    pub const FLAGS: usize = 0;
    /// gso_type (u8 at 1): VIRTIO_NET_HDR_GSO_NONE is 0.
    pub const GSO_TYPE: usize = 1;
    /// num_buffers (le16 at 10).
    pub const NUM_BUFFERS: usize = 10;
    /// flags bit: the receiver must complete the checksum.
    pub const F_NEEDS_CSUM: u8 = 1;
}

const TOKEN_KICK: u64 = 1;
const TOKEN_TAP: u64 = 2;

/// Counters, for `status` and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub rx_frames: u64,
    /// Tap frames whose header asked for an offload the guest did not negotiate.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    /// Frames the tap refused (its interface down, gone), dropped like a NIC drops them.
    pub tx_dropped: u64,
    /// Guest frames whose header asked for an offload that was not negotiated.
    pub tx_bad_header: u64,
}

pub struct Backend {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    tap: File,
    events: EventLoop,
    /// Whether the tap is in the epoll set (it leaves it while the guest has no RX buffers).
    polling_tap: bool,
    /// The TX frame being sent.
    tx_frame: Box<[u8]>,
    /// The last frame read from the tap; `rx_pending` bytes of it found no RX buffer yet.
    rx_frame: Box<[u8]>,
    rx_pending: Option<usize>,
    broken: bool,
    pub counters: Counters,
}

impl Backend {
    /// Sets up epoll over the stop and kick eventfds and the tap.
    pub fn new(
        tap: OwnedFd,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        stop: &EventFd,
        kick: &EventFd,
    ) -> std::io::Result<Self> {
        let events = EventLoop::new(stop)?;
        events.add(kick, EventSet::IN, TOKEN_KICK)?;
        let tap = File::from(tap);
        events.add(&tap, EventSet::IN, TOKEN_TAP)?;
        Ok(Self {
            memory,
            queues,
            interrupt,
            tap,
            events,
            polling_tap: true,
            tx_frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
            rx_frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
            rx_pending: None,
            broken: false,
            counters: Counters::default(),
        })
    }

    /// Serves the queues until `stop` is signalled.
    pub fn run(mut self, kick: &EventFd) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let ready = match self.events.wait(-1, &mut events) {
                Ok(Woken::Events(ready)) => ready,
                Ok(Woken::Stop) => return,
                Err(e) => {
                    log::error!("virtio-net: epoll failed, device stops: {e}");
                    return;
                }
            };
            for event in ready {
                match event.data() {
                    TOKEN_KICK => {
                        let _ = kick.read();
                        self.process_tx();
                        self.process_rx();
                    }
                    TOKEN_TAP => self.process_rx(),
                    _ => {}
                }
            }
        }
    }

    /// Stops the device after a malformed chain (guest-controlled; never a panic).
    fn malformed(&mut self, queue: &str, what: &dyn std::fmt::Display) {
        if !self.broken {
            log_limited!(
                Level::Error,
                "virtio-net: {queue} queue: {what}; device stopped until the guest resets it"
            );
            self.broken = true;
            self.interrupt.device_error();
        }
    }

    /// Sends every frame the guest queued.
    pub fn process_tx(&mut self) {
        let memory = self.memory.clone();
        let mut used = false;
        while !self.broken {
            let chain = match chain::pop(&mut self.queues[TX], &memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.malformed("TX", &e);
                    break;
                }
            };
            let len = chain.readable_len();
            let Some(len) = usize::try_from(len)
                .ok()
                .filter(|len| (VNET_HDR_LEN..=MAX_FRAME).contains(len))
            else {
                self.malformed(
                    "TX",
                    &format_args!(
                        "frame of {len} bytes (header included: {VNET_HDR_LEN} to {MAX_FRAME})"
                    ),
                );
                break;
            };
            let frame = &mut self.tx_frame[..len];
            if !chain.read_at(&memory, 0, frame) {
                self.malformed("TX", &"buffer outside guest memory");
                break;
            }
            let (flags, gso_type) = (frame[hdr::FLAGS], frame[hdr::GSO_TYPE]);
            if flags != 0 || gso_type != 0 {
                self.counters.tx_bad_header += 1;
                log_limited!(
                    Level::Warn,
                    "virtio-net: dropping a guest frame asking for offloads never negotiated \
                     (flags {flags:#x}, gso_type {gso_type})"
                );
            } else {
                // The tap acts on the header: it gets the device's own, all zero.
                frame[..VNET_HDR_LEN].fill(0);
                match self.tap.write(frame) {
                    // A tap takes a frame whole or not at all.
                    Ok(n) if n == frame.len() => self.counters.tx_frames += 1,
                    Ok(_) => self.counters.tx_dropped += 1,
                    // The interface is down or gone, its queue is full, or it refused the frame
                    // (too short for Ethernet): a NIC drops the frame too.
                    Err(e) => {
                        self.counters.tx_dropped += 1;
                        log_limited!(Level::Debug, "virtio-net: tap write: {e}");
                    }
                }
            }
            if self.queues[TX].add_used(&memory, chain.head(), 0).is_err() {
                self.malformed("TX", &"used ring outside guest memory");
                break;
            }
            used = true;
        }
        if used {
            self.notify(TX);
        }
    }

    /// Reads the next frame from the tap into `rx_frame`: its length, or None when the tap has
    /// none (or is gone).
    fn read_tap(&mut self) -> Option<usize> {
        loop {
            match self.tap.read(&mut self.rx_frame) {
                Ok(n) if n < VNET_HDR_LEN => continue,
                Ok(n) => {
                    let (flags, gso_type) =
                        (self.rx_frame[hdr::FLAGS], self.rx_frame[hdr::GSO_TYPE]);
                    if flags & hdr::F_NEEDS_CSUM != 0 || gso_type != 0 {
                        // Never enabled on the tap (no TUNSETOFFLOAD) and not negotiated.
                        self.counters.rx_dropped += 1;
                        log_limited!(
                            Level::Warn,
                            "virtio-net: dropping a tap frame asking for offloads (flags \
                             {flags:#x}, gso_type {gso_type})"
                        );
                        continue;
                    }
                    return Some(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EBADFD and friends: the interface went away. Keep the guest's side alive.
                    log::warn!("virtio-net: tap read: {e}");
                    self.poll_tap(false);
                    return None;
                }
            }
        }
    }

    /// Moves frames from the tap into the guest's RX buffers while both have some.
    pub fn process_rx(&mut self) {
        let memory = self.memory.clone();
        let mut used = false;
        while !self.broken {
            let Some(len) = self.rx_pending.take().or_else(|| self.read_tap()) else {
                break;
            };
            let chain = match chain::pop(&mut self.queues[RX], &memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    // No buffer: keep the frame, stop polling the tap until the guest posts some.
                    self.rx_pending = Some(len);
                    self.poll_tap(false);
                    break;
                }
                Err(e) => {
                    self.malformed("RX", &e);
                    break;
                }
            };
            if chain.writable_len() < len as u64 {
                // The driver posts whole-frame buffers without MRG_RXBUF; a shorter one is a
                // driver bug or a hostile guest.
                self.malformed("RX", &"buffer shorter than a frame");
                break;
            }
            // The device's own header: no offloads, the whole frame in this one buffer.
            let mut header = [0u8; VNET_HDR_LEN];
            header[hdr::NUM_BUFFERS..hdr::NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
            if !chain.write_at(&memory, 0, &header)
                || !chain.write_at(
                    &memory,
                    VNET_HDR_LEN as u64,
                    &self.rx_frame[VNET_HDR_LEN..len],
                )
            {
                self.malformed("RX", &"buffer outside guest memory");
                break;
            }
            if self.queues[RX]
                .add_used(&memory, chain.head(), len as u32)
                .is_err()
            {
                self.malformed("RX", &"used ring outside guest memory");
                break;
            }
            self.counters.rx_frames += 1;
            used = true;
        }
        if self.rx_pending.is_none() && !self.polling_tap && !self.broken {
            self.poll_tap(true);
        }
        if used {
            self.notify(RX);
        }
    }

    fn poll_tap(&mut self, on: bool) {
        if self.polling_tap == on {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        match self.events.modify(&self.tap, events, TOKEN_TAP) {
            Ok(()) => self.polling_tap = on,
            Err(e) => log::error!("virtio-net: cannot change tap polling: {e}"),
        }
    }

    fn notify(&mut self, queue: usize) {
        self.interrupt
            .notify_used(&mut self.queues[queue], &self.memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::IrqLine;
    use crate::devices::virtio::alloc_probe::largest_allocation;
    use crate::devices::virtio::{test_ring, INTERRUPT_USED_RING};
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    const QUEUE_SIZE: u16 = 256;
    /// Guest RAM: large enough for 255 descriptors aliasing all of it to claim 4 GiB.
    const MEMORY: u64 = 16 << 20;
    const RX_BUF: u64 = 0x10_0000;
    const TX_BUF: u64 = 0x80_0000;
    const BUF: u32 = 0x1_0000 + VNET_HDR_LEN as u32;
    /// The largest single allocation processing a hostile chain may make: none beyond the two
    /// frames allocated with the back end, so a few KiB of bookkeeping.
    const ALLOCATION_BOUND: usize = 64 * 1024;
    /// virtio_net_hdr_v1 gso_type VIRTIO_NET_HDR_GSO_TCPV4.
    const GSO_TCPV4: u8 = 1;

    /// A back end driven by hand, with a datagram socket pair standing in for the tap (a tap is
    /// a frame per read or write, as a datagram socket is).
    struct Rig<'a> {
        backend: Backend,
        memory: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        /// Next free descriptor index per queue (RX, TX); RX buffers and TX frames posted.
        next_desc: (u16, u16),
        posted: (u16, u16),
        interrupt: Arc<VirtioInterrupt>,
        wire: UnixDatagram,
        _eventfds: (EventFd, EventFd),
    }

    impl<'a> Rig<'a> {
        fn new(memory: &'a GuestMemoryMmap) -> Self {
            let rx = MockSplitQueue::create(memory, GuestAddress(0), QUEUE_SIZE);
            let tx = MockSplitQueue::create(memory, GuestAddress(0x1_0000), QUEUE_SIZE);
            let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            let (ours, wire) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            wire.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).unwrap()));
            let (stop, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
            let backend = Backend::new(
                OwnedFd::from(ours),
                memory.clone(),
                queues,
                interrupt.clone(),
                &stop,
                &kick,
            )
            .unwrap();
            Self {
                backend,
                memory,
                rx,
                tx,
                next_desc: (0, 0),
                posted: (0, 0),
                interrupt,
                wire,
                _eventfds: (stop, kick),
            }
        }

        /// Writes `descs` (address, length, flags) as one chain on the RX or TX queue.
        fn offer(&mut self, tx: bool, descs: &[(u64, u32, u16)]) {
            let (queue, next) = if tx {
                (&self.tx, &mut self.next_desc.1)
            } else {
                (&self.rx, &mut self.next_desc.0)
            };
            test_ring::offer(queue, QUEUE_SIZE, next, descs);
        }

        /// The guest posts one RX buffer of `len` bytes.
        fn post_rx(&mut self, len: u32) {
            let addr = RX_BUF + u64::from(self.posted.0) * u64::from(BUF);
            self.offer(false, &[(addr, len, F_WRITE)]);
            self.posted.0 += 1;
        }

        /// What the device put in RX buffer `slot`, if it used it.
        fn received(&self, slot: u16) -> Option<Vec<u8>> {
            let used: u16 = self.rx.used().idx().load();
            if used <= slot {
                return None;
            }
            let elem = self.rx.used().ring().ref_at(slot as usize).unwrap().load();
            let mut data = vec![0u8; elem.len() as usize];
            let addr = RX_BUF + u64::from(slot) * u64::from(BUF);
            self.memory
                .read_slice(&mut data, GuestAddress(addr))
                .unwrap();
            Some(data)
        }

        /// The guest sends one frame (header + payload) from its TX buffer, as one descriptor.
        fn send(&mut self, frame: &[u8]) {
            let addr = TX_BUF + u64::from(self.posted.1 % 16) * u64::from(BUF);
            self.memory.write_slice(frame, GuestAddress(addr)).unwrap();
            self.send_chain(&[(addr, frame.len() as u32, 0)]);
        }

        /// The guest queues `descs` as one TX chain and kicks.
        fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
            self.offer(true, descs);
            self.posted.1 += 1;
            self.backend.process_tx();
        }

        /// The next frame on the tap's side, if one comes within a moment.
        fn on_the_wire(&self) -> Option<Vec<u8>> {
            self.wire
                .set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .unwrap();
            let mut got = vec![0u8; MAX_FRAME];
            let n = self.wire.recv(&mut got).ok()?;
            got.truncate(n);
            Some(got)
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap()
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    /// A frame whose header has `flags` and `gso_type`, and junk in the other fields.
    fn frame_with_header(flags: u8, gso_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = frame(payload);
        f[..VNET_HDR_LEN]
            .copy_from_slice(&[flags, gso_type, 0x36, 0, 0xb4, 0x05, 0x22, 0, 0x10, 0, 7, 0]);
        f
    }

    #[test]
    fn test_guest_frame_reaches_the_tap_behind_a_zero_header() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send(&frame(b"ethernet frame"));
        let got = rig.on_the_wire();
        assert_eq!(got, Some(frame(b"ethernet frame")));
        assert_eq!(rig.backend.counters.tx_frames, 1);
        assert_eq!(rig.tx.used().idx().load(), 1);
        assert!(rig.interrupt.status() & INTERRUPT_USED_RING != 0);
    }

    #[test]
    fn test_the_tap_never_sees_the_guests_header_fields() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        // flags and gso_type zero, but hdr_len, gso_size, csum_start/offset, num_buffers set.
        rig.send(&frame_with_header(0, 0, b"payload"));
        assert_eq!(rig.on_the_wire(), Some(frame(b"payload")));
    }

    #[test]
    fn test_a_guest_frame_asking_for_checksum_offload_is_dropped_and_counted() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send(&frame_with_header(
            hdr::F_NEEDS_CSUM,
            0,
            b"partial checksum",
        ));
        assert_eq!(rig.on_the_wire(), None);
        assert_eq!(rig.backend.counters.tx_bad_header, 1);
        assert_eq!(rig.tx.used().idx().load(), 1, "the chain is still returned");
        assert!(!rig.interrupt.needs_reset());
    }

    #[test]
    fn test_a_guest_frame_asking_for_segmentation_is_dropped_and_counted() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send(&frame_with_header(0, GSO_TCPV4, &[0u8; 3000]));
        rig.send(&frame(b"next"));
        assert_eq!(rig.on_the_wire(), Some(frame(b"next")));
        assert_eq!(rig.backend.counters.tx_bad_header, 1);
    }

    #[test]
    fn test_tap_frame_lands_in_an_rx_buffer_behind_the_devices_header() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.post_rx(BUF);
        // DATA_VALID (2) set by the tap, and junk: the guest negotiated no GUEST_CSUM.
        rig.wire
            .send(&frame_with_header(2, 0, b"from the host"))
            .unwrap();
        rig.backend.process_rx();
        let got = rig.received(0).expect("a frame in buffer 0");
        let mut header = [0u8; VNET_HDR_LEN];
        header[hdr::NUM_BUFFERS] = 1;
        assert_eq!(got[..VNET_HDR_LEN], header);
        assert_eq!(&got[VNET_HDR_LEN..], b"from the host");
        assert_eq!(rig.backend.counters.rx_frames, 1);
    }

    #[test]
    fn test_tap_frame_asking_for_offloads_is_dropped_and_counted() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.post_rx(BUF);
        rig.wire
            .send(&frame_with_header(0, GSO_TCPV4, b"a super frame"))
            .unwrap();
        rig.wire.send(&frame(b"plain")).unwrap();
        rig.backend.process_rx();
        assert_eq!(&rig.received(0).unwrap()[VNET_HDR_LEN..], b"plain");
        assert_eq!(rig.backend.counters.rx_dropped, 1);
    }

    #[test]
    fn test_without_rx_buffers_frames_wait_in_order_until_the_guest_posts_some() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        for p in [b"one", b"two"] {
            rig.wire.send(&frame(p)).unwrap();
        }
        rig.backend.process_rx();
        assert!(
            !rig.backend.polling_tap,
            "stops polling the tap without buffers"
        );
        assert!(rig.backend.rx_pending.is_some());
        rig.post_rx(BUF);
        rig.post_rx(BUF);
        rig.backend.process_rx();
        assert_eq!(&rig.received(0).unwrap()[VNET_HDR_LEN..], b"one");
        assert_eq!(&rig.received(1).unwrap()[VNET_HDR_LEN..], b"two");
        assert!(rig.backend.polling_tap, "polls the tap again");
    }

    #[test]
    fn test_a_tx_chain_shorter_than_the_header_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send(b"short");
        assert!(rig.interrupt.needs_reset());
        assert_eq!(rig.backend.counters.tx_frames, 0);
        // Nothing more is processed until a reset.
        rig.send(&frame(b"after"));
        assert_eq!(rig.backend.counters.tx_frames, 0);
    }

    #[test]
    fn test_an_rx_buffer_too_small_for_the_frame_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.post_rx(8);
        rig.wire.send(&frame(b"does not fit")).unwrap();
        rig.backend.process_rx();
        assert!(rig.interrupt.needs_reset());
    }

    #[test]
    fn test_a_tx_descriptor_outside_guest_memory_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send_chain(&[(1 << 40, 64, 0)]);
        assert!(rig.interrupt.needs_reset());
    }

    #[test]
    fn test_a_gone_peer_drops_tx_frames_but_keeps_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        // The tap's interface went away: writes fail (here: the datagram peer is closed).
        drop(std::mem::replace(
            &mut rig.wire,
            UnixDatagram::unbound().unwrap(),
        ));
        rig.send(&frame(b"lost"));
        assert!(!rig.interrupt.needs_reset());
        assert_eq!(rig.backend.counters.tx_dropped, 1);
        assert_eq!(rig.tx.used().idx().load(), 1, "the chain is still returned");
    }

    // --- A hostile guest. ---

    #[test]
    fn test_aliased_descriptors_claiming_4_gib_stop_the_device_with_bounded_allocation() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        // 255 descriptors, each covering all of guest RAM: 4080 MiB claimed for one frame.
        let mut chain: Vec<_> = (0..254).map(|_| (0, MEMORY as u32, F_NEXT)).collect();
        chain.push((0, MEMORY as u32, 0));
        let ((), largest) = largest_allocation(|| rig.send_chain(&chain));
        assert!(rig.interrupt.needs_reset());
        assert_eq!(rig.on_the_wire(), None);
        assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
    }

    #[test]
    fn test_a_frame_one_byte_over_the_maximum_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send_chain(&[
            (TX_BUF, MAX_FRAME as u32 / 2, F_NEXT),
            (TX_BUF, MAX_FRAME as u32 / 2 + 2, 0),
        ]);
        assert!(rig.interrupt.needs_reset());
    }

    #[test]
    fn test_a_zero_length_tx_chain_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send_chain(&[(TX_BUF, 0, 0)]);
        assert!(rig.interrupt.needs_reset());
    }

    #[test]
    fn test_a_looping_tx_chain_stops_the_device_with_bounded_allocation() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.tx
            .desc_table()
            .store(
                1,
                RawDescriptor::from(SplitDescriptor::new(TX_BUF, 64, F_NEXT, 0)),
            )
            .unwrap();
        let ((), largest) = largest_allocation(|| rig.send_chain(&[(TX_BUF, 64, F_NEXT)]));
        assert!(rig.interrupt.needs_reset());
        assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
    }

    #[test]
    fn test_an_indirect_tx_chain_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        let desc = SplitDescriptor::new(TX_BUF, 64, 0, 0);
        memory
            .write_obj(RawDescriptor::from(desc), GuestAddress(0x40_0000))
            .unwrap();
        rig.send_chain(&[(0x40_0000, 16, F_INDIRECT)]);
        assert!(rig.interrupt.needs_reset());
        assert_eq!(rig.on_the_wire(), None);
    }

    #[test]
    fn test_an_rx_chain_looping_stops_the_device() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.rx
            .desc_table()
            .store(
                1,
                RawDescriptor::from(SplitDescriptor::new(RX_BUF, BUF, F_WRITE | F_NEXT, 0)),
            )
            .unwrap();
        rig.offer(false, &[(RX_BUF, BUF, F_WRITE | F_NEXT)]);
        rig.wire.send(&frame(b"x")).unwrap();
        rig.backend.process_rx();
        assert!(rig.interrupt.needs_reset());
    }
}
