//! The back end driven by hand through its queues: the protocol as a well-behaved guest uses it,
//! then a hostile guest's rings (aliased descriptors claiming 4 GiB, lengths past the credit,
//! zero-length, looping and indirect chains, garbage headers), each asserting what the guest and
//! the host see and that the host's allocations stayed bounded.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, HostSocket, FIRST_CONN_TOKEN, MAX_CONNECTIONS};
use super::conn::BUF_ALLOC;
use super::packet::{op, shutdown, Header, HEADER_SIZE, HOST_CID, MAX_PKT_LEN, TYPE_STREAM};
use crate::devices::irq::IrqLine;
use crate::devices::virtio::alloc_probe::largest_allocation;
use crate::devices::virtio::{test_ring, VirtioInterrupt};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;
/// Guest RAM of the rig: large enough for one descriptor to alias all of it 255 times over 4 GiB.
const MEMORY: u64 = 16 << 20;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;
/// A TX buffer slot holds a header and the largest payload.
const TX_SLOT: u64 = 0x1_1000;
/// The largest single allocation the back end may make while a hostile chain is processed: one
/// connection buffer (allocated when a socket first refuses data) and change.
const ALLOCATION_BOUND: usize = BUF_ALLOC as usize + 64 * 1024;

/// A back end driven by hand, with split queues of 256 in 16 MiB of guest memory.
struct Rig<'a> {
    backend: Backend,
    memory: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    /// Next free descriptor index per queue (RX, TX).
    next_desc: (u16, u16),
    /// RX buffers posted, TX packets sent.
    posted: (u16, u16),
    interrupt: Arc<VirtioInterrupt>,
    uds: PathBuf,
    /// Ports of the host listeners bound beside `uds` (their sockets go with the rig).
    listened: std::cell::RefCell<Vec<u32>>,
    _eventfds: (EventFd, EventFd),
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap()
}

fn guest_header(local_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: local_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

impl<'a> Rig<'a> {
    fn new(memory: &'a GuestMemoryMmap, name: &str) -> Self {
        let rx = MockSplitQueue::create(memory, GuestAddress(0), QUEUE_SIZE);
        let tx = MockSplitQueue::create(memory, GuestAddress(0x1_0000), QUEUE_SIZE);
        let ev = MockSplitQueue::create(memory, GuestAddress(0x2_0000), QUEUE_SIZE);
        let queues = vec![
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            ev.create_queue().unwrap(),
        ];
        let uds = std::env::temp_dir().join(format!(
            "accordion-vsock-rig-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&uds);
        let listener = UnixListener::bind(&uds).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).unwrap()));
        let (stop, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let socket = HostSocket {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
            listener,
        };
        let backend = Backend::new(
            socket,
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
            uds,
            listened: Default::default(),
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

    /// The guest posts one 4 KiB RX buffer; returns the packet the device put there, if any.
    fn receive(&mut self) -> Option<(Header, Vec<u8>)> {
        let addr = RX_BUF + u64::from(self.posted.0 % QUEUE_SIZE) * 0x1000;
        self.offer(false, &[(addr, 0x1000, F_WRITE)]);
        self.posted.0 += 1;
        self.backend.fill_rx();
        let used: u16 = self.rx.used().idx().load();
        if used < self.posted.0 {
            return None;
        }
        let mut raw = [0u8; HEADER_SIZE];
        self.memory
            .read_slice(&mut raw, GuestAddress(addr))
            .unwrap();
        let header = Header::parse(&raw);
        let mut payload = vec![0u8; header.len as usize];
        self.memory
            .read_slice(&mut payload, GuestAddress(addr + HEADER_SIZE as u64))
            .unwrap();
        Some((header, payload))
    }

    /// Every packet the device has for the guest now.
    fn receive_all(&mut self) -> Vec<Header> {
        std::iter::from_fn(|| self.receive().map(|(h, _)| h)).collect()
    }

    /// The guest sends one packet, header and payload in one descriptor of its TX buffer.
    fn send(&mut self, header: Header, payload: &[u8]) {
        let addr = TX_BUF + u64::from(self.posted.1 % 16) * TX_SLOT;
        self.memory
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.memory
            .write_slice(payload, GuestAddress(addr + HEADER_SIZE as u64))
            .unwrap();
        let len = (HEADER_SIZE + payload.len()) as u32;
        self.send_chain(&[(addr, len, 0)]);
    }

    /// The guest queues `descs` as one TX chain and kicks.
    fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        self.offer(true, descs);
        self.posted.1 += 1;
        self.backend.process_tx();
    }

    /// Chains the device has returned on TX.
    fn tx_used(&self) -> u16 {
        self.tx.used().idx().load()
    }

    /// A host connection through CONNECT 1234, accepted by the guest; returns it and its port.
    fn established(&mut self) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        self.backend.accept();
        let token = *self.backend.conns.keys().max().unwrap();
        self.backend.host_event(token);
        let (request, _) = self.receive().unwrap();
        self.send(guest_header(request.src_port, op::RESPONSE, 0), &[]);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut ok = vec![0u8; format!("OK {}\n", request.src_port).len()];
        host.read_exact(&mut ok).unwrap();
        (host, request.src_port)
    }

    /// A host process listening on guest-reachable port `port` (`<uds>_<port>`).
    fn host_listener(&self, port: u32) -> UnixListener {
        let path = self.listener_path(port);
        let _ = std::fs::remove_file(&path);
        self.listened.borrow_mut().push(port);
        UnixListener::bind(path).unwrap()
    }

    fn listener_path(&self, port: u32) -> String {
        format!("{}_{port}", self.uds.display())
    }
}

impl Drop for Rig<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
        for port in self.listened.take() {
            let _ = std::fs::remove_file(self.listener_path(port));
        }
    }
}

/// Whether the host side of a connection was closed by the VMM (EOF; data before it is skipped).
fn closed_by_vmm(mut host: UnixStream) -> bool {
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    host.read_to_end(&mut sink).is_ok()
}

fn ops(headers: &[Header]) -> Vec<u16> {
    headers.iter().map(|h| h.op).collect()
}

// --- The protocol, as a well-behaved guest uses it. ---

#[test]
fn test_host_connect_sends_the_guest_a_request_for_that_port() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "request");
    let mut host = UnixStream::connect(&rig.uds).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    rig.backend.accept();
    rig.backend.host_event(FIRST_CONN_TOKEN);
    let (h, payload) = rig.receive().unwrap();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.dst_port),
        (op::REQUEST, HOST_CID, GUEST_CID, 1234)
    );
    assert_eq!(h.src_port, 1 << 30);
    assert!(payload.is_empty());
}

#[test]
fn test_guest_response_gets_the_host_an_ok_line_then_data_flows_both_ways() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "flow");
    let (mut host, port) = rig.established();

    rig.send(guest_header(port, op::RW, 6), b"hello\n");
    let mut got = [0u8; 6];
    host.read_exact(&mut got).unwrap();
    host.write_all(b"world").unwrap();
    let (h, payload) = rig.receive().unwrap();

    assert_eq!(&got, b"hello\n");
    assert_eq!((h.op, h.len, h.dst_port), (op::RW, 5, 1234));
    assert_eq!(payload, b"world");
}

#[test]
fn test_host_data_beyond_the_guest_credit_waits() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "credit");
    let (mut host, port) = rig.established();
    // The guest advertises 8 bytes of buffer.
    let mut small = guest_header(port, op::CREDIT_UPDATE, 0);
    small.buf_alloc = 8;
    rig.send(small, &[]);
    host.write_all(b"0123456789").unwrap();
    let (first, payload) = rig.receive().unwrap();
    let second = rig.receive();
    assert_eq!((first.op, payload.as_slice()), (op::RW, &b"01234567"[..]));
    assert_eq!(second, None);
}

#[test]
fn test_guest_data_for_an_unknown_connection_is_answered_with_rst() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "unknown");
    rig.send(guest_header(77, op::RW, 2), b"hi");
    let (h, _) = rig.receive().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 77, 1234));
}

#[test]
fn test_guest_connect_to_a_host_port_nobody_serves_is_refused() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "refused");
    rig.send(guest_header(6000, op::REQUEST, 0), &[]);
    let (h, _) = rig.receive().unwrap();
    assert_eq!((h.op, h.src_port), (op::RST, 6000));
}

#[test]
fn test_guest_close_delivers_buffered_data_then_resets() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "close");
    let (mut host, port) = rig.established();
    rig.send(guest_header(port, op::RW, 4), b"last");
    let mut close = guest_header(port, op::SHUTDOWN, 0);
    close.flags = shutdown::RCV | shutdown::SEND;
    rig.send(close, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    let (h, _) = rig.receive().unwrap();
    assert_eq!(rest, b"last");
    assert_eq!(h.op, op::RST);
}

#[test]
fn test_tx_data_goes_from_guest_memory_to_the_socket_without_a_copy() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "zerocopy");
    let (mut host, port) = rig.established();
    let payload = vec![0x5a; MAX_PKT_LEN as usize];

    let ((), largest) = largest_allocation(|| {
        rig.send(guest_header(port, op::RW, MAX_PKT_LEN), &payload);
    });
    let mut got = vec![0u8; payload.len()];
    host.read_exact(&mut got).unwrap();

    assert_eq!(got, payload);
    assert!(largest < 16 * 1024, "largest allocation {largest}");
}

// --- A hostile guest. ---

#[test]
fn test_aliased_descriptors_claiming_4_gib_reset_the_connection_with_bounded_allocation() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "alias");
    let (host, port) = rig.established();
    memory
        .write_slice(
            &guest_header(port, op::RW, u32::MAX).to_bytes(),
            GuestAddress(TX_BUF),
        )
        .unwrap();
    // A header, then 255 descriptors each covering all of guest RAM: 4080 MiB claimed.
    let mut chain = vec![(TX_BUF, HEADER_SIZE as u32, F_NEXT)];
    chain.extend((0..254).map(|_| (0, MEMORY as u32, F_NEXT)));
    chain.push((0, MEMORY as u32, 0));

    let ((), largest) = largest_allocation(|| rig.send_chain(&chain));
    let guest_sees = rig.receive_all();

    assert_eq!(ops(&guest_sees), [op::RST]);
    assert!(closed_by_vmm(host));
    assert!(!rig.interrupt.needs_reset());
    assert_eq!(
        rig.tx_used(),
        rig.posted.1,
        "the chain went back to the guest"
    );
    assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
}

#[test]
fn test_a_packet_longer_than_64_kib_resets_its_connection() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "oversized");
    let (host, port) = rig.established();
    let payload = vec![1u8; MAX_PKT_LEN as usize + 1];
    rig.send(guest_header(port, op::RW, MAX_PKT_LEN + 1), &payload);
    assert_eq!(ops(&rig.receive_all()), [op::RST]);
    assert!(closed_by_vmm(host));
    assert_eq!(rig.backend.connections(), 0);
}

#[test]
fn test_a_packet_longer_than_its_chain_resets_its_connection() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "truncated");
    let (host, port) = rig.established();
    rig.send(guest_header(port, op::RW, 100), b"only ten b");
    assert_eq!(ops(&rig.receive_all()), [op::RST]);
    assert!(closed_by_vmm(host));
}

#[test]
fn test_an_oversized_packet_for_no_connection_gets_rst() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "oversized-unknown");
    rig.send(guest_header(99, op::RW, u32::MAX), &[]);
    let (h, _) = rig.receive().unwrap();
    assert_eq!((h.op, h.src_port), (op::RST, 99));
}

#[test]
fn test_data_past_the_credit_resets_the_connection_and_buffers_stay_bounded() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "overrun");
    // The host never reads: its socket fills, then the connection's buffer.
    let (host, port) = rig.established();
    let payload = vec![7u8; MAX_PKT_LEN as usize];

    let ((), largest) = largest_allocation(|| {
        // 1 MiB at most, more than any socket and BUF_ALLOC hold; stop once reset.
        for _ in 0..16 {
            rig.send(guest_header(port, op::RW, MAX_PKT_LEN), &payload);
            if rig.backend.connections() == 0 {
                break;
            }
        }
    });

    let guest_sees = ops(&rig.receive_all());
    // Credit updates for what the socket took, then the reset.
    assert_eq!(guest_sees.last(), Some(&op::RST));
    assert!(guest_sees[..guest_sees.len() - 1]
        .iter()
        .all(|&o| o == op::CREDIT_UPDATE));
    assert!(closed_by_vmm(host));
    assert_eq!(rig.backend.connections(), 0);
    assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
}

#[test]
fn test_a_zero_length_tx_chain_stops_the_device_with_needs_reset() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "zero");
    rig.send_chain(&[(TX_BUF, 0, 0)]);
    assert!(rig.interrupt.needs_reset());
    assert!(rig.backend.broken);
}

#[test]
fn test_a_looping_tx_chain_stops_the_device_with_needs_reset() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "loop");
    // Descriptor 1 points back at 0.
    rig.tx
        .desc_table()
        .store(
            1,
            RawDescriptor::from(SplitDescriptor::new(TX_BUF, 8, F_NEXT, 0)),
        )
        .unwrap();
    let ((), largest) = largest_allocation(|| rig.send_chain(&[(TX_BUF, 8, F_NEXT)]));
    assert!(rig.interrupt.needs_reset());
    assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
}

#[test]
fn test_an_indirect_table_of_65535_descriptors_stops_the_device() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "indirect");
    // The device offers no VIRTIO_F_INDIRECT_DESC; a 1 MiB table of descriptors aliasing RAM.
    for i in 0..u64::from(u16::MAX) {
        let desc = SplitDescriptor::new(0, MEMORY as u32, F_NEXT, (i + 1) as u16);
        memory
            .write_obj(RawDescriptor::from(desc), GuestAddress(0x40_0000 + i * 16))
            .unwrap();
    }
    let table = (0x40_0000, u32::from(u16::MAX) * 16, F_INDIRECT);
    let ((), largest) = largest_allocation(|| rig.send_chain(&[table]));
    assert!(rig.interrupt.needs_reset());
    assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
}

#[test]
fn test_a_tx_chain_outside_guest_memory_stops_the_device() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "outside");
    rig.send_chain(&[(MEMORY - 8, HEADER_SIZE as u32, 0)]);
    assert!(rig.interrupt.needs_reset());
}

#[test]
fn test_an_rx_buffer_shorter_than_a_header_stops_the_device() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "rx-short");
    rig.send(guest_header(6000, op::REQUEST, 0), &[]);
    rig.offer(false, &[(RX_BUF, HEADER_SIZE as u32 - 1, F_WRITE)]);
    rig.backend.fill_rx();
    assert!(rig.interrupt.needs_reset());
}

#[test]
fn test_garbage_headers_are_answered_or_ignored_never_a_panic() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "garbage");
    let (_host, _port) = rig.established();
    // xorshift: the same garbage every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut garbage = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let headers: Vec<[u8; HEADER_SIZE]> = (0..200)
        .map(|_| {
            let mut raw = [0u8; HEADER_SIZE];
            raw.iter_mut().for_each(|b| *b = garbage() as u8);
            // Half of them look like ours, so they reach the connection logic.
            if garbage() % 2 == 0 {
                raw[..30].copy_from_slice(&guest_header(1 << 30, 0, 0).to_bytes()[..30]);
            }
            raw
        })
        .collect();

    let ((), largest) = largest_allocation(|| {
        for raw in &headers {
            rig.memory.write_slice(raw, GuestAddress(TX_BUF)).unwrap();
            rig.send_chain(&[(TX_BUF, 0x1000, 0)]);
        }
    });
    rig.receive_all();

    assert!(!rig.interrupt.needs_reset());
    assert_eq!(rig.tx_used(), rig.posted.1);
    assert!(largest < ALLOCATION_BOUND, "largest allocation {largest}");
}

#[test]
fn test_guest_requests_beyond_max_connections_get_rst() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "many-guest");
    let _listener = rig.host_listener(5000);
    let answers: Vec<u16> = (0..=MAX_CONNECTIONS as u32)
        .map(|i| {
            let mut request = guest_header(5000, op::REQUEST, 0);
            request.src_port = 10_000 + i;
            rig.send(request, &[]);
            rig.receive().unwrap().0.op
        })
        .collect();
    assert!(answers[..MAX_CONNECTIONS]
        .iter()
        .all(|&a| a == op::RESPONSE));
    assert_eq!(answers[MAX_CONNECTIONS], op::RST);
    assert_eq!(rig.backend.connections(), MAX_CONNECTIONS);
}

#[test]
fn test_host_connections_beyond_max_connections_are_closed() {
    let memory = memory();
    let mut rig = Rig::new(&memory, "many-host");
    let hosts: Vec<UnixStream> = (0..=MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&rig.uds).unwrap())
        .collect();
    rig.backend.accept();
    let last = hosts.into_iter().last().unwrap();
    assert_eq!(rig.backend.connections(), MAX_CONNECTIONS);
    assert!(closed_by_vmm(last));
}
