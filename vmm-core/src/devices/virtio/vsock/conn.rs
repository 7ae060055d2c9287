//! One vsock connection: its state, its credit in both directions, and the guest → host bytes its
//! socket has not taken yet.
//!
//! Credit (virtio 1.2 §5.10.6.3): we advertise `BUF_ALLOC` bytes of receive buffer and count what
//! we forwarded to the socket (`fwd_cnt`). The guest may have at most `BUF_ALLOC` bytes sent and
//! not yet forwarded; a guest that goes past that ignored the credit it was given and is reset.
//! Since everything not forwarded waits in `tx_buf`, that buffer never holds more than
//! `BUF_ALLOC`. Bytes go from guest memory straight to the socket; only what the socket refuses
//! is copied, into `tx_buf`.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;

use vm_memory::{VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::connect::LineReader;
use super::txbuf::TxBuf;

/// Receive buffer the VMM advertises per connection: guest bytes it may have in flight.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host connected; waiting for its `CONNECT <port>\n`.
    HostConnecting,
    /// REQUEST sent to the guest; waiting for RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than its credit allowed.
    #[error("guest sent {sent} bytes with {unforwarded} of {BUF_ALLOC} already in flight")]
    CreditExceeded {
        /// Bytes in this packet.
        sent: usize,
        /// Bytes received and not yet forwarded before it.
        unforwarded: u32,
    },
    /// Data in a state that takes none, or after the guest said it would send no more.
    #[error("guest data on a connection that takes none")]
    Unexpected,
    /// The host socket failed.
    #[error("host socket")]
    Socket(#[source] std::io::Error),
}

/// A connection.
#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub state: State,
    /// Our (host-side) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// The host's `CONNECT` line while `HostConnecting` (at most `connect::MAX_LINE` bytes).
    pub line: LineReader,
    /// `OK <port>\n`, not yet written (at most `connect::MAX_REPLY` bytes); goes before any data.
    reply: Vec<u8>,
    /// Guest bytes the socket has not taken (at most `BUF_ALLOC`).
    tx_buf: TxBuf,
    /// The socket may have data (edge-triggered epoll: read until WouldBlock).
    pub readable: bool,
    /// The host closed its side and the guest was told.
    pub host_eof: bool,
    /// The guest will send no more (SHUTDOWN SEND): shut the socket's write side once drained.
    guest_send_done: bool,
    /// The guest closed the connection (SHUTDOWN both ways): reset it once drained.
    guest_closed: bool,
    write_shut: bool,
    /// Guest's receive buffer and how much of it it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
    /// Guest bytes received, and forwarded to the socket.
    rx_cnt: u32,
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
}

impl Conn {
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            line: LineReader::default(),
            reply: Vec::new(),
            tx_buf: TxBuf::new(BUF_ALLOC as usize),
            readable: true,
            host_eof: false,
            guest_send_done: false,
            guest_closed: false,
            write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
        }
    }

    /// Bytes the guest can take right now.
    pub fn peer_credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }

    /// Guest bytes received and not yet forwarded: the credit the guest has used.
    fn unforwarded(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Bytes waiting for the socket (the reply and guest data).
    pub fn buffered(&self) -> usize {
        self.reply.len() + self.tx_buf.len()
    }

    /// The guest accepted a host connection: `OK <port>\n` goes out before any guest data.
    pub fn accept(&mut self, reply: Vec<u8>) {
        self.state = State::Established;
        self.reply = reply;
    }

    /// Guest data (`payload`, in guest memory, `len` bytes): written to the socket as far as it
    /// takes it, the rest buffered. Refused whole if it exceeds the guest's credit.
    pub fn send(&mut self, payload: &[VolatileSlice<'_>], len: usize) -> Result<(), ConnError> {
        if self.state != State::Established || self.guest_send_done {
            return Err(ConnError::Unexpected);
        }
        let unforwarded = self.unforwarded();
        if len > (BUF_ALLOC - unforwarded.min(BUF_ALLOC)) as usize {
            return Err(ConnError::CreditExceeded {
                sent: len,
                unforwarded,
            });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len as u32);
        let mut direct = self.buffered() == 0;
        for slice in payload {
            let mut rest = *slice;
            if direct {
                let n = match self.stream.write_volatile(&rest) {
                    Ok(n) => n,
                    Err(VolatileMemoryError::IOError(e))
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) =>
                    {
                        0
                    }
                    Err(VolatileMemoryError::IOError(e)) => return Err(ConnError::Socket(e)),
                    Err(e) => return Err(ConnError::Socket(std::io::Error::other(e))),
                };
                self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                if n < rest.len() {
                    direct = false;
                    rest = rest
                        .offset(n)
                        .map_err(|e| ConnError::Socket(std::io::Error::other(e)))?;
                } else {
                    continue;
                }
            }
            // Within the credit checked above, so within the buffer's capacity.
            self.tx_buf
                .push(&rest)
                .map_err(|_| ConnError::CreditExceeded {
                    sent: len,
                    unforwarded,
                })?;
        }
        Ok(())
    }

    /// Writes buffered bytes to the socket as far as it takes them.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Socket(e)),
            }
        }
        let n = self
            .tx_buf
            .flush_to(&mut self.stream)
            .map_err(ConnError::Socket)?;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        Ok(())
    }

    /// The guest will send no more: the socket's write side is shut once the buffer drains.
    pub fn guest_shutdown_send(&mut self) {
        self.guest_send_done = true;
    }

    /// The guest closed the connection: it ends once the buffer drains.
    pub fn guest_close(&mut self) {
        self.guest_send_done = true;
        self.guest_closed = true;
    }

    /// After a flush: whether the connection is done (the guest closed it and all its data went
    /// out). Shuts the socket's write side when the guest will send no more.
    pub fn drained_and_closed(&mut self) -> bool {
        if self.buffered() > 0 {
            return false;
        }
        if self.guest_send_done && !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        self.guest_closed
    }

    /// `Some(fwd_cnt)` when the guest should hear about freed buffer space before it runs out of
    /// credit (half the buffer forwarded since it was last told).
    pub fn credit_update_due(&mut self) -> Option<u32> {
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) < BUF_ALLOC / 2 {
            return None;
        }
        Some(self.credit_told())
    }

    /// The guest is told `fwd_cnt` now (a header carries it).
    pub fn credit_told(&mut self) -> u32 {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.fwd_cnt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn conn() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Conn::new(a, State::Established, 1 << 30, 1024), b)
    }

    fn send(c: &mut Conn, bytes: &[u8]) -> Result<(), ConnError> {
        let mut copy = bytes.to_vec();
        let slice = VolatileSlice::from(copy.as_mut_slice());
        c.send(&[slice], bytes.len())
    }

    #[test]
    fn test_peer_credit_is_its_buffer_minus_bytes_in_flight() {
        let (mut c, _peer) = conn();
        c.peer_buf_alloc = 4096;
        c.tx_cnt = 3000;
        c.peer_fwd_cnt = 1000;
        assert_eq!(c.peer_credit(), 2096);
    }

    #[test]
    fn test_peer_credit_survives_counter_wraparound() {
        let (mut c, _peer) = conn();
        c.peer_buf_alloc = 4096;
        c.tx_cnt = 100; // wrapped past u32::MAX
        c.peer_fwd_cnt = u32::MAX - 99;
        assert_eq!(c.peer_credit(), 4096 - 200);
    }

    #[test]
    fn test_peer_credit_never_goes_negative() {
        let (mut c, _peer) = conn();
        c.peer_buf_alloc = 100;
        c.tx_cnt = 500;
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn test_data_goes_straight_to_a_socket_with_room() {
        let (mut c, mut peer) = conn();
        send(&mut c, b"hello").unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!((c.buffered(), c.fwd_cnt), (0, 5));
    }

    #[test]
    fn test_reply_goes_out_before_guest_data() {
        let (mut c, mut peer) = conn();
        c.accept(b"OK 9\n".to_vec());
        send(&mut c, b"data").unwrap();
        c.flush().unwrap();
        let mut got = [0u8; 9];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"OK 9\ndata");
        assert_eq!(c.fwd_cnt, 4, "the reply is not guest data");
    }

    #[test]
    fn test_data_beyond_the_credit_is_refused_while_the_socket_is_full() {
        let (mut c, _peer) = conn();
        let chunk = vec![7u8; 64 * 1024];
        // Fill the socket, then the buffer, up to exactly BUF_ALLOC unforwarded bytes.
        while c.buffered() == 0 {
            send(&mut c, &chunk).unwrap();
        }
        let room = BUF_ALLOC - c.rx_cnt.wrapping_sub(c.fwd_cnt);
        send(&mut c, &vec![1u8; room as usize]).unwrap();
        let over = send(&mut c, b"x");
        assert!(matches!(
            over,
            Err(ConnError::CreditExceeded { sent: 1, .. })
        ));
        assert_eq!(c.buffered(), BUF_ALLOC as usize);
    }

    #[test]
    fn test_guest_close_ends_the_connection_only_once_drained() {
        let (mut c, mut peer) = conn();
        c.accept(b"OK 9\n".to_vec());
        c.guest_close();
        let before = c.drained_and_closed();
        c.flush().unwrap();
        let after = c.drained_and_closed();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(!before);
        assert!(after);
        assert_eq!(rest, b"OK 9\n", "write side shut after the reply");
    }
}
