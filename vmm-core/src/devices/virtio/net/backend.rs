//! The virtio-net back end thread: frames between the queues and the tap.
//!
//! - Guest → host (TX): each chain is one frame led by its virtio-net header; it is written to
//!   the tap as is, in one write.
//! - Host → guest (RX): each tap read is one frame with its header; it goes into one RX chain
//!   (no VIRTIO_NET_F_MRG_RXBUF: the driver posts buffers big enough for a whole frame), with
//!   num_buffers set to 1.
//!
//! One thread owns the queues and the tap; vCPU threads only wake it. Chains are guest-controlled:
//! a malformed one stops the device (DEVICE_NEEDS_RESET), never a panic. When the guest posts no RX
//! buffers, the thread stops polling the tap until the guest kicks RX; frames wait in the tap's
//! queue (and the kernel drops beyond it, as a full NIC ring would).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;
use crate::devices::virtio::VirtioInterrupt;

/// Queue indices.
pub const RX: usize = 0;
/// Guest → host frames.
pub const TX: usize = 1;

/// Largest frame with its header: a 64 KiB IP packet, its Ethernet and VLAN headers, the header.
pub const MAX_FRAME: usize = 65_535 + 14 + 4 + VNET_HDR_LEN;

const TOKEN_STOP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_TAP: u64 = 2;

/// Counters, for `status` and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames the tap refused (its interface down, gone), dropped like a NIC drops them.
    pub tx_dropped: u64,
}

pub struct Backend {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    tap: File,
    epoll: Epoll,
    /// Whether the tap is in the epoll set (it leaves it while the guest has no RX buffers).
    polling_tap: bool,
    /// A frame read from the tap that found no RX buffer yet.
    pending: Option<Vec<u8>>,
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
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (stop.as_raw_fd(), TOKEN_STOP),
            (kick.as_raw_fd(), TOKEN_KICK),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let tap = File::from(tap);
        epoll.ctl(
            ControlOperation::Add,
            tap.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TAP),
        )?;
        Ok(Self {
            memory,
            queues,
            interrupt,
            tap,
            epoll,
            polling_tap: true,
            pending: None,
            broken: false,
            counters: Counters::default(),
        })
    }

    /// Serves the queues until `stop` is signalled.
    pub fn run(mut self, kick: &EventFd) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: epoll failed, device stops: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return,
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

    /// Stops the device after a malformed chain (guest-controlled; logged once, never a panic).
    fn malformed(&mut self, what: &str) {
        if !self.broken {
            log::error!("virtio-net: {what}; device stopped until the guest resets it");
            self.broken = true;
            self.interrupt.device_error();
        }
    }

    /// Sends every frame the guest queued.
    pub fn process_tx(&mut self) {
        let memory = self.memory.clone();
        let mut used = false;
        let mut frame = Vec::with_capacity(MAX_FRAME);
        while !self.broken {
            let Some(chain) = self.queues[TX].pop_descriptor_chain(&memory) else {
                break;
            };
            let head = chain.head_index();
            let read = Reader::new(&memory, chain).ok().and_then(|mut reader| {
                let len = reader.available_bytes();
                if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                    return None;
                }
                frame.clear();
                frame.resize(len, 0);
                reader.read_exact(&mut frame).ok()
            });
            if read.is_none() {
                self.malformed("malformed TX descriptor chain");
                break;
            }
            match self.tap.write(&frame) {
                Ok(_) => self.counters.tx_frames += 1,
                // The interface is down or gone, or its queue is full: a NIC drops the frame too.
                Err(e) => {
                    self.counters.tx_dropped += 1;
                    log::debug!("virtio-net: tap write: {e}");
                }
            }
            if self.queues[TX].add_used(&memory, head, 0).is_err() {
                self.malformed("TX used ring outside guest memory");
                break;
            }
            used = true;
        }
        if used {
            self.notify(TX);
        }
    }

    /// Moves frames from the tap into the guest's RX buffers while both have some.
    pub fn process_rx(&mut self) {
        let memory = self.memory.clone();
        let mut used = false;
        let mut buf = vec![0u8; MAX_FRAME];
        while !self.broken {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read(&mut buf) {
                    Ok(n) if n >= VNET_HDR_LEN => buf[..n].to_vec(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EBADFD and friends: the interface went away. Keep the guest's side alive.
                        log::warn!("virtio-net: tap read: {e}");
                        self.poll_tap(false);
                        break;
                    }
                },
            };
            let Some(chain) = self.queues[RX].pop_descriptor_chain(&memory) else {
                // No buffer: keep the frame, stop polling the tap until the guest posts some.
                self.pending = Some(frame);
                self.poll_tap(false);
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = Writer::new(&memory, chain) else {
                self.malformed("malformed RX descriptor chain");
                break;
            };
            if writer.available_bytes() < frame.len() {
                // The driver posts whole-frame buffers without MRG_RXBUF; a shorter one is a
                // driver bug or a hostile guest.
                self.malformed("RX buffer shorter than a frame");
                break;
            }
            let mut frame = frame;
            // num_buffers (le16 at offset 10): the whole frame is in this one buffer.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            if writer.write_all(&frame).is_err() {
                self.malformed("RX descriptor chain outside guest memory");
                break;
            }
            if self.queues[RX]
                .add_used(&memory, head, frame.len() as u32)
                .is_err()
            {
                self.malformed("RX used ring outside guest memory");
                break;
            }
            self.counters.rx_frames += 1;
            used = true;
        }
        if self.pending.is_none() && !self.polling_tap && !self.broken {
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
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.tap.as_raw_fd(),
            EpollEvent::new(events, TOKEN_TAP),
        ) {
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
    use crate::devices::virtio::INTERRUPT_USED_RING;
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const VRING_DESC_F_WRITE: u16 = 2;
    const RX_BUF: u64 = 0x4_0000;
    const TX_BUF: u64 = 0x8_0000;
    const BUF: u32 = 0x1_0000 + VNET_HDR_LEN as u32;

    /// A back end driven by hand, with a datagram socket pair standing in for the tap (a tap is
    /// a frame per read or write, as a datagram socket is).
    struct Rig<'a> {
        backend: Backend,
        memory: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        posted: (u16, u16),
        interrupt: Arc<VirtioInterrupt>,
        wire: UnixDatagram,
        _eventfds: (EventFd, EventFd),
    }

    impl<'a> Rig<'a> {
        fn new(memory: &'a GuestMemoryMmap) -> Self {
            let rx = MockSplitQueue::create(memory, GuestAddress(0), 16);
            let tx = MockSplitQueue::create(memory, GuestAddress(0x1_0000), 16);
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
                posted: (0, 0),
                interrupt,
                wire,
                _eventfds: (stop, kick),
            }
        }

        /// The guest posts one RX buffer of `len` bytes.
        fn post_rx(&mut self, len: u32) {
            let slot = self.posted.0;
            let addr = RX_BUF + u64::from(slot) * u64::from(BUF);
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, VRING_DESC_F_WRITE, 0));
            self.rx.add_desc_chains(&[desc], slot).unwrap();
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
            let slot = self.posted.1;
            let addr = TX_BUF + u64::from(slot) * u64::from(BUF);
            self.memory.write_slice(frame, GuestAddress(addr)).unwrap();
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, frame.len() as u32, 0, 0));
            self.tx.add_desc_chains(&[desc], slot).unwrap();
            self.posted.1 += 1;
            self.backend.process_tx();
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21)]).unwrap()
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn test_guest_frame_reaches_the_tap_with_its_header() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.send(&frame(b"ethernet frame"));
        let mut got = [0u8; 64];
        let n = rig.wire.recv(&mut got).unwrap();
        assert_eq!(&got[..n], frame(b"ethernet frame").as_slice());
        assert_eq!(rig.backend.counters.tx_frames, 1);
        assert_eq!(rig.tx.used().idx().load(), 1);
        assert!(rig.interrupt.status() & INTERRUPT_USED_RING != 0);
    }

    #[test]
    fn test_tap_frame_lands_in_an_rx_buffer_with_num_buffers_1() {
        let memory = memory();
        let mut rig = Rig::new(&memory);
        rig.post_rx(BUF);
        rig.wire.send(&frame(b"from the host")).unwrap();
        rig.backend.process_rx();
        let got = rig.received(0).expect("a frame in buffer 0");
        assert_eq!(&got[VNET_HDR_LEN..], b"from the host");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(rig.backend.counters.rx_frames, 1);
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
        assert!(rig.backend.pending.is_some());
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
        let desc = RawDescriptor::from(SplitDescriptor::new(1 << 40, 64, 0, 0));
        rig.tx.add_desc_chains(&[desc], 0).unwrap();
        rig.backend.process_tx();
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
}
