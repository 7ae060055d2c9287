//! The vsock back end thread: hybrid vsock over Unix sockets (Firecracker's convention).
//!
//! - Host → guest: a host process connects to the device's socket and writes `CONNECT <port>\n`;
//!   the VMM sends the guest a REQUEST for that port and, once the guest accepts, answers
//!   `OK <host port>\n` on the socket. The socket then carries the stream.
//! - Guest → host: a REQUEST to CID 2 port P connects to `<socket path>_P`.
//!
//! One thread owns the queues, the sockets and every connection; vCPU threads only wake it. All
//! packet contents are guest-controlled: a malformed chain is dropped (and logged once per kind),
//! an unexpected packet answered with RST, never a panic.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{self, op, Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::devices::virtio::VirtioInterrupt;

/// Receive buffer the VMM advertises per connection (bytes the guest may send unacknowledged).
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload the VMM puts in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Control packets queued for a guest that posts no RX buffers; beyond this they are dropped.
const MAX_PENDING_CONTROL: usize = 1024;
/// Host-side ports for host-initiated connections start here (clear of well-known ports).
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

/// Queue indices.
pub const RX: usize = 0;
/// Guest → device packets.
pub const TX: usize = 1;

/// Epoll tokens below this are fixed sources; connection ids start here.
const TOKEN_STOP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
const FIRST_CONN_TOKEN: u64 = 16;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host connected; waiting for its `CONNECT <port>\n`.
    HostConnecting,
    /// REQUEST sent to the guest; waiting for RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Our (host-side) port.
    local_port: u32,
    /// The guest's port.
    peer_port: u32,
    line: Vec<u8>,
    /// Bytes from the guest not yet written to the socket (socket full).
    to_host: Vec<u8>,
    /// The socket may have data (edge-triggered epoll: read until WouldBlock).
    readable: bool,
    /// The host closed its side and the guest was told.
    host_eof: bool,
    /// Guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes of guest data written to the socket, and the value last told to the guest.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            to_host: Vec::new(),
            readable: true,
            host_eof: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
        }
    }

    /// Bytes the guest can take right now.
    fn peer_credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }
}

/// The device's host side: its CID and the Unix socket host processes connect to.
pub struct HostSocket {
    /// Guest CID.
    pub guest_cid: u64,
    /// Socket path (guest-initiated connections go to `<path>_<port>`).
    pub uds_path: PathBuf,
    /// The bound listener.
    pub listener: UnixListener,
}

/// Everything the thread owns.
pub struct Backend {
    guest_cid: u64,
    uds_path: PathBuf,
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u64, Conn>,
    /// (local port, peer port) → connection token.
    by_ports: HashMap<(u32, u32), u64>,
    /// Control packets (no payload) waiting for RX buffers.
    control: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
    /// The guest handed over a malformed chain: the device stops until the driver resets it.
    broken: bool,
}

impl Backend {
    /// Sets up epoll over the stop and kick eventfds and the listener.
    pub fn new(
        socket: HostSocket,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        stop: &EventFd,
        kick: &EventFd,
    ) -> std::io::Result<Self> {
        let HostSocket {
            guest_cid,
            uds_path,
            listener,
        } = socket;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (stop.as_raw_fd(), TOKEN_STOP),
            (kick.as_raw_fd(), TOKEN_KICK),
            (listener.as_raw_fd(), TOKEN_LISTENER),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self {
            guest_cid,
            uds_path,
            memory,
            queues,
            interrupt,
            listener,
            epoll,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            control: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_port: FIRST_EPHEMERAL_PORT,
            broken: false,
        })
    }

    /// Serves until `stop` is signalled.
    pub fn run(mut self, kick: &EventFd) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vsock: epoll failed, device stops: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_KICK => {
                        let _ = kick.read();
                    }
                    TOKEN_LISTENER => self.accept(),
                    token => {
                        if let Some(conn) = self.conns.get_mut(&token) {
                            conn.readable = true;
                        }
                        self.flush_to_host(token);
                        self.read_connect_line(token);
                    }
                }
            }
            self.process_tx();
            self.fill_rx();
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let token = self.next_token;
                    self.next_token += 1;
                    if let Err(e) = self.register(&stream, token) {
                        log::warn!("vsock: cannot watch a host connection: {e}");
                        continue;
                    }
                    self.conns
                        .insert(token, Conn::new(stream, State::HostConnecting, 0, 0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn register(&self, stream: &UnixStream, token: u64) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events, token),
        )
    }

    /// Reads `CONNECT <port>\n` from a new host connection and asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.state != State::HostConnecting {
            return;
        }
        let mut byte = [0u8];
        // Byte by byte: nothing after the newline may be consumed, it belongs to the stream.
        loop {
            match conn.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if conn.line.len() < MAX_CONNECT_LINE => conn.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                _ => {
                    self.close(token);
                    return;
                }
            }
        }
        let line = String::from_utf8_lossy(&conn.line).into_owned();
        let Some(port) = parse_connect_line(&line) else {
            log::warn!("vsock: bad host request {line:?}");
            self.close(token);
            return;
        };
        let local_port = self.allocate_port(port);
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.local_port = local_port;
        conn.peer_port = port;
        conn.state = State::AwaitingResponse;
        self.by_ports.insert((local_port, port), token);
        let request = header(self.guest_cid, local_port, port, op::REQUEST, 0, 0);
        self.queue_control(request);
    }

    /// Queues a control packet for the guest, dropping it if the guest stopped taking them.
    fn queue_control(&mut self, header: Header) {
        if self.control.len() < MAX_PENDING_CONTROL {
            self.control.push_back(header);
        } else {
            log::debug!("vsock: guest posts no RX buffers; dropping {header:?}");
        }
    }

    fn allocate_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self
                .next_port
                .checked_add(1)
                .unwrap_or(FIRST_EPHEMERAL_PORT);
            if !self.by_ports.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }
}

/// The port in a host's `CONNECT <port>` line (without the newline).
fn parse_connect_line(line: &str) -> Option<u32> {
    line.strip_prefix("CONNECT ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

/// A header from the host side of connection (local, peer) to the guest.
fn header(
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
    fwd_cnt: u32,
) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: local_port,
        dst_port: peer_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt,
    }
}

impl Backend {
    fn close(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.by_ports.remove(&(conn.local_port, conn.peer_port));
        }
    }

    /// Tears a connection down and tells the guest.
    fn reset(&mut self, token: u64) {
        if let Some(conn) = self.conns.get(&token) {
            if conn.state != State::HostConnecting {
                let rst = header(
                    self.guest_cid,
                    conn.local_port,
                    conn.peer_port,
                    op::RST,
                    0,
                    conn.fwd_cnt,
                );
                self.queue_control(rst);
            }
        }
        self.close(token);
    }

    fn flush_to_host(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut failed = false;
        while !conn.to_host.is_empty() {
            match conn.stream.write(&conn.to_host) {
                Ok(0) => break,
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.reset(token);
            return;
        }
        // Tell the guest about freed buffer space before it runs out of credit.
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 2 {
            conn.fwd_cnt_sent = conn.fwd_cnt;
            let update = header(
                self.guest_cid,
                conn.local_port,
                conn.peer_port,
                op::CREDIT_UPDATE,
                0,
                conn.fwd_cnt,
            );
            self.queue_control(update);
        }
    }

    /// Stops the device after a malformed chain (guest-controlled; logged once, never a panic).
    fn malformed(&mut self, what: &str) {
        if !self.broken {
            log::error!("vsock: {what}; device stopped until the guest resets it");
            self.broken = true;
            self.interrupt.device_error();
        }
    }

    /// Handles every packet the guest queued.
    fn process_tx(&mut self) {
        let mut used = false;
        while !self.broken {
            let Some(chain) = self.queues[TX].pop_descriptor_chain(&self.memory) else {
                break;
            };
            let head = chain.head_index();
            let packet = Reader::new(&self.memory, chain)
                .ok()
                .and_then(|mut reader| {
                    let mut raw = [0u8; HEADER_SIZE];
                    reader.read_exact(&mut raw).ok()?;
                    let header = Header::parse(&raw);
                    let len = (header.len as usize).min(reader.available_bytes());
                    let mut payload = vec![0u8; len];
                    reader.read_exact(&mut payload).ok()?;
                    Some((header, payload))
                });
            let Some((header, payload)) = packet else {
                self.malformed("malformed TX descriptor chain");
                break;
            };
            self.guest_packet(header, payload);
            if self.queues[TX].add_used(&self.memory, head, 0).is_err() {
                self.malformed("TX used ring outside guest memory");
                break;
            }
            used = true;
        }
        if used {
            self.notify(TX);
        }
    }

    fn guest_packet(&mut self, h: Header, payload: Vec<u8>) {
        if h.kind != TYPE_STREAM || h.dst_cid != HOST_CID || h.src_cid != self.guest_cid {
            log::debug!("vsock: ignoring packet {h:?}");
            return;
        }
        let key = (h.dst_port, h.src_port);
        let Some(&token) = self.by_ports.get(&key) else {
            match h.op {
                op::REQUEST => self.guest_connect(h),
                op::RST => {}
                _ => {
                    let rst = header(self.guest_cid, h.dst_port, h.src_port, op::RST, 0, 0);
                    self.queue_control(rst);
                }
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        conn.readable = true; // new credit may unblock reads
        match (h.op, &conn.state) {
            (op::RESPONSE, State::AwaitingResponse) => {
                conn.state = State::Established;
                conn.to_host
                    .extend_from_slice(format!("OK {}\n", conn.local_port).as_bytes());
                // The OK line is ours, not guest data: keep it out of the credit count.
                conn.fwd_cnt = conn.fwd_cnt.wrapping_sub(conn.to_host.len() as u32);
                conn.fwd_cnt_sent = conn.fwd_cnt;
                self.flush_to_host(token);
            }
            (op::RW, State::Established) => {
                conn.to_host.extend_from_slice(&payload);
                self.flush_to_host(token);
            }
            (op::CREDIT_REQUEST, _) => {
                let update = header(
                    self.guest_cid,
                    conn.local_port,
                    conn.peer_port,
                    op::CREDIT_UPDATE,
                    0,
                    conn.fwd_cnt,
                );
                self.queue_control(update);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::SHUTDOWN, _)
                if h.flags & packet::shutdown::SEND != 0
                    && h.flags & packet::shutdown::RCV == 0 =>
            {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            }
            (op::SHUTDOWN, _) | (op::RST, _) => self.reset_quietly_or_rst(token, h.op),
            _ => self.reset(token),
        }
    }

    fn reset_quietly_or_rst(&mut self, token: u64, op_received: u16) {
        if op_received == op::RST {
            self.close(token);
        } else {
            self.reset(token);
        }
    }

    /// The guest connects to host port P: `<uds_path>_P`.
    fn guest_connect(&mut self, h: Header) {
        let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
        let answer = match UnixStream::connect(&path) {
            Ok(stream) => {
                let token = self.next_token;
                self.next_token += 1;
                match self.register(&stream, token) {
                    Ok(()) => {
                        let mut conn =
                            Conn::new(stream, State::Established, h.dst_port, h.src_port);
                        conn.peer_buf_alloc = h.buf_alloc;
                        conn.peer_fwd_cnt = h.fwd_cnt;
                        self.conns.insert(token, conn);
                        self.by_ports.insert((h.dst_port, h.src_port), token);
                        op::RESPONSE
                    }
                    Err(_) => op::RST,
                }
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {path} refused: {e}");
                op::RST
            }
        };
        let reply = header(self.guest_cid, h.dst_port, h.src_port, answer, 0, 0);
        self.queue_control(reply);
    }

    /// Fills RX buffers: control packets first, then data from readable sockets.
    fn fill_rx(&mut self) {
        // A second handle on guest RAM, so writers can borrow it while `self` changes.
        let memory = self.memory.clone();
        let mut used = false;
        while !self.broken {
            let Some(chain) = self.queues[RX].pop_descriptor_chain(&memory) else {
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = Writer::new(&memory, chain) else {
                self.malformed("malformed RX descriptor chain");
                break;
            };
            let capacity = writer.available_bytes();
            let Some((header, payload)) = self.next_rx_packet(capacity) else {
                self.queues[RX].go_to_previous_position();
                break;
            };
            let written = writer
                .write_all(&header.to_bytes())
                .and_then(|()| writer.write_all(&payload));
            // The packet was sized to the chain, so a failed write means the chain lied.
            if written.is_err() {
                self.malformed("RX descriptor chain outside guest memory");
                break;
            }
            let len = writer.bytes_written() as u32;
            if self.queues[RX].add_used(&memory, head, len).is_err() {
                self.malformed("RX used ring outside guest memory");
                break;
            }
            used = true;
        }
        if used {
            self.notify(RX);
        }
    }

    fn next_rx_packet(&mut self, capacity: usize) -> Option<(Header, Vec<u8>)> {
        if capacity < HEADER_SIZE {
            return None;
        }
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let room = (capacity - HEADER_SIZE).min(MAX_PAYLOAD);
        let tokens: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.readable && c.state == State::Established)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            let want = room.min(conn.peer_credit());
            if want == 0 {
                continue;
            }
            let mut buf = vec![0u8; want];
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    // Host closed its side: tell the guest nothing more will come, once.
                    conn.readable = false;
                    if conn.host_eof {
                        continue;
                    }
                    conn.host_eof = true;
                    let flags = packet::shutdown::RCV | packet::shutdown::SEND;
                    let h = header(
                        self.guest_cid,
                        conn.local_port,
                        conn.peer_port,
                        op::SHUTDOWN,
                        flags,
                        conn.fwd_cnt,
                    );
                    return Some((h, Vec::new()));
                }
                Ok(n) => {
                    buf.truncate(n);
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    let mut h = header(
                        self.guest_cid,
                        conn.local_port,
                        conn.peer_port,
                        op::RW,
                        0,
                        conn.fwd_cnt,
                    );
                    h.len = n as u32;
                    return Some((h, buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(_) => {
                    self.reset(token);
                    return self.control.pop_front().map(|h| (h, Vec::new()));
                }
            }
        }
        None
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
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const VRING_DESC_F_WRITE: u16 = 2;
    const GUEST_CID: u64 = 3;
    const RX_BUF: u64 = 0x8_0000;
    const TX_BUF: u64 = 0x9_0000;

    /// A back end driven by hand, with split queues laid out in 1 MiB of guest memory.
    struct Rig<'a> {
        backend: Backend,
        memory: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        posted: (u16, u16),
        interrupt: Arc<VirtioInterrupt>,
        uds: PathBuf,
        _eventfds: (EventFd, EventFd),
    }

    impl<'a> Rig<'a> {
        fn new(memory: &'a GuestMemoryMmap, name: &str) -> Self {
            let rx = MockSplitQueue::create(memory, GuestAddress(0), 16);
            let tx = MockSplitQueue::create(memory, GuestAddress(0x1_0000), 16);
            let ev = MockSplitQueue::create(memory, GuestAddress(0x2_0000), 16);
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
                posted: (0, 0),
                interrupt,
                uds,
                _eventfds: (stop, kick),
            }
        }

        /// The guest posts one 4 KiB RX buffer; returns the packet the device put there, if any.
        fn receive(&mut self) -> Option<(Header, Vec<u8>)> {
            let slot = self.posted.0;
            let addr = RX_BUF + u64::from(slot) * 0x1000;
            let desc =
                RawDescriptor::from(SplitDescriptor::new(addr, 0x1000, VRING_DESC_F_WRITE, 0));
            self.rx.add_desc_chains(&[desc], slot).unwrap();
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

        /// The guest sends one packet from the given address (normally its TX buffer).
        fn send_at(&mut self, addr: u64, header: Header, payload: &[u8]) {
            let slot = self.posted.1;
            let len = (HEADER_SIZE + payload.len()) as u32;
            if self
                .memory
                .write_slice(&header.to_bytes(), GuestAddress(addr))
                .is_ok()
            {
                self.memory
                    .write_slice(payload, GuestAddress(addr + HEADER_SIZE as u64))
                    .unwrap();
            }
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0));
            self.tx.add_desc_chains(&[desc], slot).unwrap();
            self.posted.1 += 1;
            self.backend.process_tx();
        }

        fn send(&mut self, header: Header, payload: &[u8]) {
            let addr = TX_BUF + u64::from(self.posted.1) * 0x1000;
            self.send_at(addr, header, payload);
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

        /// A host connection through CONNECT 1234, accepted by the guest; returns it and its port.
        fn established(&mut self) -> (UnixStream, u32) {
            let mut host = UnixStream::connect(&self.uds).unwrap();
            host.write_all(b"CONNECT 1234\n").unwrap();
            self.backend.accept();
            self.backend.read_connect_line(FIRST_CONN_TOKEN);
            let (request, _) = self.receive().unwrap();
            self.send(Self::guest_header(request.src_port, op::RESPONSE, 0), &[]);
            host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            (host, request.src_port)
        }
    }

    impl Drop for Rig<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.uds);
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn read_line(stream: &UnixStream) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).unwrap();
        line
    }

    #[test]
    fn test_host_connect_sends_the_guest_a_request_for_that_port() {
        let memory = memory();
        let mut rig = Rig::new(&memory, "request");
        let mut host = UnixStream::connect(&rig.uds).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        rig.backend.accept();
        rig.backend.read_connect_line(FIRST_CONN_TOKEN);
        let (h, payload) = rig.receive().unwrap();
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.dst_port),
            (op::REQUEST, HOST_CID, GUEST_CID, 1234)
        );
        assert_eq!(h.src_port, FIRST_EPHEMERAL_PORT);
        assert!(payload.is_empty());
    }

    #[test]
    fn test_guest_response_gets_the_host_an_ok_line_then_data_flows_both_ways() {
        let memory = memory();
        let mut rig = Rig::new(&memory, "flow");
        let (mut host, port) = rig.established();
        assert_eq!(read_line(&host), format!("OK {port}\n"));

        rig.send(Rig::guest_header(port, op::RW, 6), b"hello\n");
        assert_eq!(read_line(&host), "hello\n");

        host.write_all(b"world").unwrap();
        let (h, payload) = rig.receive().unwrap();
        assert_eq!((h.op, h.len, h.dst_port), (op::RW, 5, 1234));
        assert_eq!(payload, b"world");
    }

    #[test]
    fn test_host_data_beyond_the_guest_credit_waits() {
        let memory = memory();
        let mut rig = Rig::new(&memory, "credit");
        let (mut host, port) = rig.established();
        let _ = read_line(&host);
        // The guest advertises 8 bytes of buffer.
        let mut small = Rig::guest_header(port, op::CREDIT_UPDATE, 0);
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
        rig.send(Rig::guest_header(77, op::RW, 2), b"hi");
        let (h, _) = rig.receive().unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 77, 1234));
    }

    #[test]
    fn test_guest_connect_to_a_host_port_nobody_serves_is_refused() {
        let memory = memory();
        let mut rig = Rig::new(&memory, "refused");
        rig.send(Rig::guest_header(6000, op::REQUEST, 0), &[]);
        let (h, _) = rig.receive().unwrap();
        assert_eq!((h.op, h.src_port), (op::RST, 6000));
    }

    #[test]
    fn test_malformed_tx_chain_stops_the_device_with_needs_reset() {
        let memory = memory();
        let mut rig = Rig::new(&memory, "malformed");
        rig.send_at(0x1000_0000, Rig::guest_header(1, op::RW, 0), &[]);
        assert!(rig.interrupt.needs_reset());
        assert!(rig.backend.broken);
    }

    fn conn() -> Conn {
        let (a, _b) = UnixStream::pair().unwrap();
        Conn::new(a, State::Established, FIRST_EPHEMERAL_PORT, 1024)
    }

    #[test]
    fn test_connect_line_yields_its_port() {
        assert_eq!(parse_connect_line("CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line("CONNECT 52\r"), Some(52));
    }

    #[test]
    fn test_malformed_connect_lines_are_refused() {
        assert_eq!(parse_connect_line("connect 1024"), None);
        assert_eq!(parse_connect_line("CONNECT -1"), None);
        assert_eq!(parse_connect_line("CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line("CONNECT"), None);
    }

    #[test]
    fn test_peer_credit_is_its_buffer_minus_bytes_in_flight() {
        let mut c = conn();
        c.peer_buf_alloc = 4096;
        c.tx_cnt = 3000;
        c.peer_fwd_cnt = 1000;
        assert_eq!(c.peer_credit(), 2096);
    }

    #[test]
    fn test_peer_credit_survives_counter_wraparound() {
        let mut c = conn();
        c.peer_buf_alloc = 4096;
        c.tx_cnt = 100; // wrapped past u32::MAX
        c.peer_fwd_cnt = u32::MAX - 99;
        assert_eq!(c.peer_credit(), 4096 - 200);
    }

    #[test]
    fn test_peer_credit_never_goes_negative() {
        let mut c = conn();
        c.peer_buf_alloc = 100;
        c.tx_cnt = 500;
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn test_header_to_guest_comes_from_the_host_cid_with_our_buffer() {
        let h = header(3, FIRST_EPHEMERAL_PORT, 1024, op::REQUEST, 0, 0);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (HOST_CID, 3, FIRST_EPHEMERAL_PORT, 1024)
        );
        assert_eq!((h.kind, h.buf_alloc), (TYPE_STREAM, BUF_ALLOC));
    }
}
