//! The kernel's uevent broadcast: a NETLINK_KOBJECT_UEVENT socket bound to multicast group 1,
//! read through tokio's `AsyncFd` (the task sleeps until the kernel sends, no polling).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recvmsg, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The kernel's uevent multicast group (lib/kobject_uevent.c broadcasts to group 1; udev's own
/// re-broadcast is group 2).
const KERNEL_GROUP: u32 = 1;

/// Receive buffer asked for: a 128-vCPU plug is a few hundred uevents of ~300 bytes each (plus
/// the kernel's per-skb overhead), which must not overflow while the agent is busy onlining.
const RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// Largest datagram read: the kernel's uevent is at most UEVENT_BUFFER_SIZE (2048) bytes of
/// variables plus the `action@devpath` header; anything bigger is reported as truncated.
pub const MAX_MESSAGE: usize = 8192;

/// Errors of the uevent socket.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be created or bound (no netlink in this kernel/namespace, or not
    /// allowed).
    #[error("Cannot {step} the uevent netlink socket")]
    Setup {
        /// What failed.
        step: &'static str,
        /// Why.
        #[source]
        source: Errno,
    },
    /// Registering the socket with the tokio reactor failed.
    #[error("Cannot watch the uevent socket")]
    Reactor(#[source] std::io::Error),
    /// The kernel dropped messages because the receive buffer was full (ENOBUFS): events were lost.
    #[error("Uevents were lost (receive buffer overrun)")]
    Overrun,
    /// Receiving failed.
    #[error("Cannot receive from the uevent socket")]
    Receive(#[source] Errno),
}

/// What one receive produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A whole datagram from the kernel of this many bytes, at the start of the buffer.
    Message(usize),
    /// A datagram longer than the buffer: cut, so not used.
    Truncated,
    /// A datagram from a process, not the kernel (sender port id ≠ 0): not trusted.
    NotFromKernel(u32),
}

/// A bound uevent socket.
#[derive(Debug)]
pub struct UeventSocket {
    fd: AsyncFd<OwnedFd>,
}

impl UeventSocket {
    /// Opens and binds the socket. Must run inside a tokio runtime.
    pub fn bind() -> Result<Self, NetlinkError> {
        let setup = |step| move |source| NetlinkError::Setup { step, source };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(setup("create"))?;
        // SO_RCVBUFFORCE passes rmem_max but needs CAP_NET_ADMIN (PID 1 has it); the plain
        // option is capped by rmem_max. A small buffer is not fatal: an overrun is detected
        // (ENOBUFS) and answered with a rescan.
        if setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER);
        }
        // Port id 0: the kernel assigns a unique one, so several agents (tests) can coexist.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP)).map_err(setup("bind"))?;
        // SAFETY: `fd` is an open socket owned by the OwnedFd moved into the AsyncFd, so it stays
        // open, and the same description, until the AsyncFd drops it; OwnedFd::as_raw_fd always
        // returns that one descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| NetlinkError::Reactor(e.into()))?;
        Ok(Self { fd })
    }

    /// Waits for the next datagram and reads it into `buf` (which should be [`MAX_MESSAGE`]
    /// bytes).
    pub async fn recv(&self, buf: &mut [u8]) -> Result<Received, NetlinkError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|e| {
                NetlinkError::Receive(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            })?;
            let received = guard.try_io(|fd| {
                let mut iov = [IoSliceMut::new(buf)];
                let message = recvmsg::<NetlinkAddr>(
                    fd.get_ref().as_raw_fd(),
                    &mut iov,
                    None,
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(std::io::Error::from)?;
                let sender = message.address.map(|a| a.pid()).unwrap_or(0);
                Ok(if message.flags.contains(MsgFlags::MSG_TRUNC) {
                    Received::Truncated
                } else if sender != 0 {
                    Received::NotFromKernel(sender)
                } else {
                    Received::Message(message.bytes)
                })
            });
            match received {
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
                Ok(Ok(received)) => return Ok(received),
                Ok(Err(e)) => {
                    let errno = Errno::from_raw(e.raw_os_error().unwrap_or(0));
                    return Err(match errno {
                        Errno::ENOBUFS => NetlinkError::Overrun,
                        errno => NetlinkError::Receive(errno),
                    });
                }
            }
        }
    }
}
