//! The vsock back end thread: the epoll loop over the host sockets and the guest's queues.
//! Hybrid vsock over Unix sockets (Firecracker's convention):
//!
//! - Host → guest: a host process connects to the device's socket and writes `CONNECT <port>\n`
//!   (`connect.rs`); the VMM sends the guest a REQUEST for that port and, once the guest accepts,
//!   answers `OK <host port>\n` on the socket. The socket then carries the stream.
//! - Guest → host: a REQUEST to CID 2 port P connects to `<socket path>_P`.
//!
//! One thread owns the queues, the sockets and every connection (`conn.rs`); vCPU threads only
//! wake it. Everything in the rings is guest-controlled:
//! - a malformed chain (`chain.rs`: loops, indirect tables, buffers outside guest memory, a TX
//!   chain shorter than a header, an RX buffer that cannot hold one) stops the device with
//!   DEVICE_NEEDS_RESET;
//! - a packet longer than `MAX_PKT_LEN`, or longer than its chain, or data beyond the credit the
//!   guest was given resets its connection (RST to the guest, host socket closed);
//! - anything else unexpected is answered with RST. Never a panic; log lines are rate-limited.
//!
//! Bounds, per device: `MAX_CONNECTIONS` connections (host- and guest-initiated together), each
//! holding at most `BUF_ALLOC` bytes of guest data the host has not read, a `CONNECT` line and an
//! `OK` reply of a few bytes; `MAX_PENDING_CONTROL` control packets waiting for RX buffers. Data
//! moves between sockets and guest memory without an intermediate buffer.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use log::Level;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice};
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Conn, ConnError, State, BUF_ALLOC};
use super::connect::{self, Progress};
use super::packet::{self, op, Header, HEADER_SIZE, HOST_CID, MAX_PKT_LEN, TYPE_STREAM};
use crate::devices::event_loop::{EventLoop, Woken};
use crate::devices::virtio::chain::{self, Chain};
use crate::devices::virtio::VirtioInterrupt;
use crate::log_limited;

/// Connections a device carries at once, host- and guest-initiated together. The agent needs
/// one; a guest REQUEST beyond this gets RST, a host connection beyond it is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Control packets queued for a guest that posts no RX buffers; beyond this they are dropped.
const MAX_PENDING_CONTROL: usize = 1024;
/// Host-side ports for host-initiated connections start here (clear of well-known ports).
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

/// Queue indices.
pub const RX: usize = 0;
/// Guest → device packets.
pub const TX: usize = 1;

/// Epoll tokens below this are fixed sources; connection ids start here.
const TOKEN_KICK: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
pub(super) const FIRST_CONN_TOKEN: u64 = 16;

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
    events: EventLoop,
    pub(super) conns: HashMap<u64, Conn>,
    /// (local port, peer port) → connection token.
    by_ports: HashMap<(u32, u32), u64>,
    /// Control packets (no payload) waiting for RX buffers.
    control: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
    /// The guest handed over a malformed chain: the device stops until the driver resets it.
    pub(super) broken: bool,
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
        let events = EventLoop::new(stop)?;
        events.add(kick, EventSet::IN, TOKEN_KICK)?;
        events.add(&listener, EventSet::IN, TOKEN_LISTENER)?;
        Ok(Self {
            guest_cid,
            uds_path,
            memory,
            queues,
            interrupt,
            listener,
            events,
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
        while self.poll(kick, &mut events, -1) {}
    }

    /// One round of the loop: waits up to `timeout_ms` (-1: forever) for events, handles them,
    /// then the queues. False once `stop` is signalled or epoll failed.
    pub fn poll(&mut self, kick: &EventFd, events: &mut [EpollEvent], timeout_ms: i32) -> bool {
        let ready = match self.events.wait(timeout_ms, events) {
            Ok(Woken::Events(ready)) => ready,
            Ok(Woken::Stop) => return false,
            Err(e) => {
                log::error!("vsock: epoll failed, device stops: {e}");
                return false;
            }
        };
        for event in ready {
            match event.data() {
                TOKEN_KICK => {
                    let _ = kick.read();
                }
                TOKEN_LISTENER => self.accept(),
                token => self.host_event(token),
            }
        }
        self.process_tx();
        self.fill_rx();
        true
    }

    /// Connections open (at most `MAX_CONNECTIONS`).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A host connection's socket became readable or writable (or hung up).
    pub fn host_event(&mut self, token: u64) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.readable = true;
        }
        self.flush_to_host(token);
        self.read_connect_line(token);
    }

    /// Takes new host connections, up to `MAX_CONNECTIONS`.
    pub fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        log_limited!(
                            Level::Warn,
                            "vsock: {MAX_CONNECTIONS} connections open; closing a new host connection"
                        );
                        continue;
                    }
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
        self.events.add(stream, events, token)
    }

    /// Reads `CONNECT <port>\n` from a new host connection and asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.state != State::HostConnecting {
            return;
        }
        let port = match conn.line.read_from(&mut conn.stream) {
            Progress::Pending => return,
            Progress::Port(port) => port,
            Progress::Refused => {
                log::warn!("vsock: bad host request {:?}", conn.line.text());
                self.close(token);
                return;
            }
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
            log_limited!(
                Level::Warn,
                "vsock: guest posts no RX buffers; dropping a {} packet for port {}",
                header.op,
                header.dst_port
            );
        }
    }

    /// RST for a guest packet that has no connection (or no longer has one).
    fn refuse(&mut self, h: &Header) {
        if h.op != op::RST {
            let rst = header(self.guest_cid, h.dst_port, h.src_port, op::RST, 0, 0);
            self.queue_control(rst);
        }
    }

    fn allocate_port(&mut self, peer_port: u32) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends within as many steps.
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

    fn close(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            let _ = self.events.remove(&conn.stream);
            self.by_ports.remove(&(conn.local_port, conn.peer_port));
        }
    }

    /// Tears a connection down (its host socket closed) and tells the guest.
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

    /// Writes what waits for the host socket; ends a connection the guest closed once its data
    /// is out; tells the guest about freed buffer space before it runs out of credit.
    fn flush_to_host(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if let Err(e) = conn.flush() {
            log::debug!("vsock: port {}: {e}", conn.local_port);
            self.reset(token);
            return;
        }
        if conn.drained_and_closed() {
            self.reset(token);
            return;
        }
        if let Some(fwd_cnt) = conn.credit_update_due() {
            let update = header(
                self.guest_cid,
                conn.local_port,
                conn.peer_port,
                op::CREDIT_UPDATE,
                0,
                fwd_cnt,
            );
            self.queue_control(update);
        }
    }

    /// Stops the device after a malformed chain (guest-controlled; never a panic).
    fn malformed(&mut self, queue: &str, what: &dyn std::fmt::Display) {
        if !self.broken {
            log_limited!(
                Level::Error,
                "vsock: {queue} queue: {what}; device stopped until the guest resets it"
            );
            self.broken = true;
            self.interrupt.device_error();
        }
    }

    /// Handles every packet the guest queued.
    pub fn process_tx(&mut self) {
        // A second handle on guest RAM, so payload slices can borrow it while `self` changes.
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
            let mut raw = [0u8; HEADER_SIZE];
            if !chain.read_at(&memory, 0, &mut raw) {
                self.malformed("TX", &"chain shorter than a packet header");
                break;
            }
            self.guest_packet(&Header::parse(&raw), &chain, &memory);
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

    /// One guest packet; its payload (`h.len` bytes after the header) stays in `chain`.
    fn guest_packet(&mut self, h: &Header, chain: &Chain, memory: &GuestMemoryMmap) {
        if h.kind != TYPE_STREAM || h.dst_cid != HOST_CID || h.src_cid != self.guest_cid {
            log_limited!(Level::Debug, "vsock: ignoring packet {h:?}");
            return;
        }
        let token = self.by_ports.get(&(h.dst_port, h.src_port)).copied();
        // The length is checked before anything acts on the packet.
        let in_chain = chain.readable_len() - HEADER_SIZE as u64;
        if h.len > MAX_PKT_LEN || u64::from(h.len) > in_chain {
            log_limited!(
                Level::Warn,
                "vsock: guest packet for port {} claims {} bytes ({in_chain} in its chain, at most \
                 {MAX_PKT_LEN}); connection reset",
                h.dst_port,
                h.len
            );
            match token {
                Some(token) => self.reset(token),
                None => self.refuse(h),
            }
            return;
        }
        let Some(token) = token else {
            match h.op {
                op::REQUEST => self.guest_connect(h),
                _ => self.refuse(h),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        conn.readable = true; // new credit may unblock reads
        match (h.op, conn.state) {
            (op::RESPONSE, State::AwaitingResponse) => {
                conn.accept(connect::reply(conn.local_port));
                self.flush_to_host(token);
            }
            (op::RW, _) => {
                let len = h.len as usize;
                let sent = chain
                    .readable_slices(memory, HEADER_SIZE as u64, len)
                    .ok_or(ConnError::Unexpected)
                    .and_then(|payload| conn.send(&payload, len));
                match sent {
                    Ok(()) => self.flush_to_host(token),
                    Err(e) => {
                        log_limited!(Level::Warn, "vsock: port {}: {e}; reset", conn.local_port);
                        self.reset(token);
                    }
                }
            }
            (op::CREDIT_REQUEST, _) => {
                let update = header(
                    self.guest_cid,
                    conn.local_port,
                    conn.peer_port,
                    op::CREDIT_UPDATE,
                    0,
                    conn.credit_told(),
                );
                self.queue_control(update);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::SHUTDOWN, State::Established) if h.flags & packet::shutdown::SEND != 0 => {
                if h.flags & packet::shutdown::RCV != 0 {
                    conn.guest_close();
                } else {
                    conn.guest_shutdown_send();
                }
                self.flush_to_host(token);
            }
            (op::RST, _) => self.close(token),
            _ => self.reset(token),
        }
    }

    /// The guest connects to host port P: `<uds_path>_P`.
    fn guest_connect(&mut self, h: &Header) {
        let answer = if self.conns.len() >= MAX_CONNECTIONS {
            log_limited!(
                Level::Warn,
                "vsock: {MAX_CONNECTIONS} connections open; refusing the guest's connection to \
                 port {}",
                h.dst_port
            );
            op::RST
        } else {
            let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
            match UnixStream::connect(&path) {
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
                    log_limited!(
                        Level::Debug,
                        "vsock: guest connection to {path} refused: {e}"
                    );
                    op::RST
                }
            }
        };
        let reply = header(self.guest_cid, h.dst_port, h.src_port, answer, 0, 0);
        self.queue_control(reply);
    }

    /// Fills RX buffers: control packets first, then data from readable sockets.
    pub fn fill_rx(&mut self) {
        let memory = self.memory.clone();
        let mut used = false;
        while !self.broken {
            let chain = match chain::pop(&mut self.queues[RX], &memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.malformed("RX", &e);
                    break;
                }
            };
            if chain.writable_len() < HEADER_SIZE as u64 {
                self.malformed("RX", &"buffer shorter than a packet header");
                break;
            }
            let Some(header) = self.next_rx_packet(&chain, &memory) else {
                self.queues[RX].go_to_previous_position();
                break;
            };
            // The chain's writable bytes were checked to hold the header.
            if !chain.write_at(&memory, 0, &header.to_bytes()) {
                self.malformed("RX", &"buffer outside guest memory");
                break;
            }
            let len = HEADER_SIZE as u32 + header.len;
            if self.queues[RX]
                .add_used(&memory, chain.head(), len)
                .is_err()
            {
                self.malformed("RX", &"used ring outside guest memory");
                break;
            }
            used = true;
        }
        if used {
            self.notify(RX);
        }
    }

    /// The next packet for the guest: a control packet, or data read from a socket straight into
    /// `chain` after the header's place. Returns the header to write.
    fn next_rx_packet(&mut self, chain: &Chain, memory: &GuestMemoryMmap) -> Option<Header> {
        if let Some(h) = self.control.pop_front() {
            return Some(h);
        }
        let room = (chain.writable_len() - HEADER_SIZE as u64).min(u64::from(MAX_PKT_LEN));
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
            let want = (room as usize).min(conn.peer_credit());
            if want == 0 {
                continue;
            }
            let Some(mut payload) = chain.writable_slices(memory, HEADER_SIZE as u64, want) else {
                continue;
            };
            match read_into(&mut conn.stream, &mut payload) {
                Ok(0) => {
                    // Host closed its side: tell the guest nothing more will come, once.
                    conn.readable = false;
                    if conn.host_eof {
                        continue;
                    }
                    conn.host_eof = true;
                    let flags = packet::shutdown::RCV | packet::shutdown::SEND;
                    let fwd_cnt = conn.credit_told();
                    let (local, peer) = (conn.local_port, conn.peer_port);
                    return Some(header(
                        self.guest_cid,
                        local,
                        peer,
                        op::SHUTDOWN,
                        flags,
                        fwd_cnt,
                    ));
                }
                Ok(n) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    let fwd_cnt = conn.credit_told();
                    let (local, peer) = (conn.local_port, conn.peer_port);
                    let mut h = header(self.guest_cid, local, peer, op::RW, 0, fwd_cnt);
                    h.len = n as u32;
                    return Some(h);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(_) => {
                    self.reset(token);
                    return self.control.pop_front();
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

/// Reads from `stream` into `buffers` in order until one is not filled; `WouldBlock` only if
/// nothing was read.
fn read_into(stream: &mut UnixStream, buffers: &mut [VolatileSlice<'_>]) -> std::io::Result<usize> {
    let mut total = 0;
    for buffer in buffers {
        match stream.read_volatile(buffer) {
            Ok(n) => {
                total += n;
                if n < buffer.len() {
                    break;
                }
            }
            Err(VolatileMemoryError::IOError(e)) if total == 0 => return Err(e),
            Err(VolatileMemoryError::IOError(_)) => break,
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    Ok(total)
}
