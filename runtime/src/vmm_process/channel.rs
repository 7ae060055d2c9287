//! The typed channel between the shim and its jailed VMM process: one JSON message per
//! SOCK_SEQPACKET datagram, file descriptors only with the first (`Start`).
//!
//! The VMM end is the one a guest could take over, so the shim reads it as untrusted input: a
//! datagram is at most [`MAX_MESSAGE`] bytes (a longer one is an error, not a bigger buffer), every
//! message must parse, and what it carries is bounded again by the caller (docs/security.md).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use accordion_vmm::{ExitReason, HotplugRequest, MemoryResizeError, VcpuState, VmMemory};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// The largest message either side sends (a vCPU table of 128 entries is about 2 KiB).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// At most this many descriptors travel with `Start` (kvm, kernel, initrd, console ×2, vsock,
/// and the virtio-fs and virtio-net devices).
pub const MAX_FDS: usize = 64;
/// Log lines and error texts from the VMM are cut to this many bytes.
pub const MAX_TEXT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot send to the vmm process")]
    Send(#[source] nix::Error),
    #[error("cannot receive from the vmm process")]
    Receive(#[source] nix::Error),
    #[error("the vmm process sent a message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("the vmm process sent more than {MAX_FDS} descriptors")]
    TooManyFds,
    #[error("malformed message from the vmm process")]
    Malformed(#[source] serde_json::Error),
    #[error("cannot encode a message")]
    Encode(#[source] serde_json::Error),
}

/// What the VMM is started with; the descriptors travel beside it, in the order of the indexes
/// named here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartSpec {
    /// The sandbox's name (log lines, messages).
    pub name: String,
    /// The kernel's and initrd's paths, for messages (the files are passed).
    pub kernel_name: String,
    pub initrd_name: String,
    pub cmdline: String,
    pub memory_mib: u64,
    /// The most guest memory (a virtio-mem region above `memory_mib`), None: fixed memory.
    pub max_memory_mib: Option<u64>,
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    /// Guest CID and the path the host connects to (named in messages; the socket is passed).
    pub vsock_cid: u64,
    pub vsock_path: String,
    /// virtio-fs tags, one connected vhost-user socket each.
    pub fs_tags: Vec<String>,
    /// virtio-net devices: (mac, mtu), one tap each.
    pub net: Vec<([u8; 6], u16)>,
    /// The console log's cap in bytes (its two files are passed).
    pub console_max_bytes: u64,
    /// Whether there is an initrd descriptor.
    pub initrd: bool,
    /// The jail to enter, None: run unconfined (a development switch).
    pub jail: Option<JailSpec>,
    /// The most verbose level the shim logs (a log::LevelFilter as usize).
    pub log_level: usize,
}

/// The confinement the VMM puts itself in before it starts the VM (jail.rs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailSpec {
    /// The directory to mount the empty root over, in the VMM's own mount namespace.
    pub root: String,
    /// Host uid/gid its user namespace's root maps to.
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_NOFILE, RLIMIT_NPROC (threads count), RLIMIT_FSIZE.
    pub nofile: u64,
    pub nproc: u64,
    pub fsize: u64,
}

/// Shim → VMM: a request and the id its reply carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Start(Box<StartSpec>),
    /// The shim wrote the VMM's uid and gid maps.
    IdsMapped,
    SetVcpus(u32),
    VcpuStates,
    /// Ask for this many bytes of guest memory (Vm::set_memory).
    SetMemory(u64),
    /// The VM's memory sizes (Vm::memory).
    Memory,
    BootTime,
    /// Stop the VM (the process reports `Exit` and ends).
    Shutdown,
}

/// VMM → shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Message {
    /// The answer to request `id`.
    Reply { id: u64, reply: Reply },
    /// The VM stopped (the process exits after this).
    Exit(ExitReason),
    /// A log line (level as log::Level as usize).
    Log(usize, String),
    /// A vCPU's state or the plugged/requested memory changed: what a resize waits on, instead
    /// of asking again and again (at most one per [`CHANGE_COALESCE`], however fast the guest
    /// makes them).
    Changed,
}

/// Changes within this long of the first are reported together.
pub const CHANGE_COALESCE: std::time::Duration = std::time::Duration::from_millis(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// It entered its user namespace: the shim writes the id maps now (to Start).
    UserNamespaceReady,
    /// The VM runs (to Start or IdsMapped); with the time the process spent jailing itself
    /// (from entering its namespaces' root to its last rlimit), if it did.
    Started(Option<Duration>),
    /// The request failed; after Start or IdsMapped the process exits.
    Failed(String),
    SetVcpus(Result<HotplugRequest, SetVcpusRefusal>),
    VcpuStates(Vec<VcpuState>),
    /// The sizes right after the request (the guest has not moved yet), or why nothing changed.
    SetMemory(Result<VmMemory, MemoryResizeError>),
    Memory(VmMemory),
    BootTime(Option<Duration>),
}

/// Why the VMM did not change the vCPU target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SetVcpusRefusal {
    #[error("invalid vCPU target {target}: must be 1 to {max}")]
    InvalidTarget { target: u32, max: u32 },
    #[error("{0}")]
    Failed(String),
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel(OwnedFd);

impl Channel {
    /// A connected pair (close-on-exec; the child's end is moved to fd 3 before exec).
    pub fn pair() -> nix::Result<(Channel, Channel)> {
        let (a, b) = socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel(a), Channel(b)))
    }

    /// The end a VMM process finds at `fd`.
    ///
    /// # Safety
    /// `fd` must be an open descriptor this process owns and uses for nothing else.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Channel {
        // SAFETY: the caller hands over ownership of an open fd.
        Channel(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn send<T: Serialize>(&self, message: &T, fds: &[RawFd]) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(message).map_err(ChannelError::Encode)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLong);
        }
        let iov = [IoSlice::new(&bytes)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        loop {
            match socket::sendmsg::<()>(
                self.0.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ChannelError::Send(e)),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Sends `message` with write(2): what the VMM's device threads may call under their seccomp
    /// allow-lists (sendmsg is not among them), for their log lines. On a SOCK_SEQPACKET socket
    /// one write is one message.
    pub fn write<T: Serialize>(&self, message: &T) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(message).map_err(ChannelError::Encode)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLong);
        }
        loop {
            match nix::unistd::write(&self.0, &bytes) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ChannelError::Send(e)),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// The next message and the descriptors that came with it; None when the other end closed.
    pub fn receive<T: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, truncated, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ChannelError::Receive(e)),
                Ok(msg) => msg,
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(ChannelError::Receive)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: SCM_RIGHTS just installed these descriptors in this process; each
                    // is owned once, here.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            break (msg.bytes, truncated, fds);
        };
        if truncated && fds.len() >= MAX_FDS {
            return Err(ChannelError::TooManyFds);
        }
        if truncated || len > MAX_MESSAGE {
            return Err(ChannelError::TooLong);
        }
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len]).map_err(ChannelError::Malformed)?;
        Ok(Some((message, fds)))
    }
}

/// `text` cut to [`MAX_TEXT`] bytes at a character boundary.
pub fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_messages_and_descriptors_cross_in_order() {
        let (a, b) = Channel::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let envelope = |id, request| Envelope { id, request };
        a.send(&envelope(1, Request::SetVcpus(4)), &[file.as_raw_fd()])
            .unwrap();
        a.send(&envelope(2, Request::VcpuStates), &[]).unwrap();
        let (first, fds) = b.receive::<Envelope>().unwrap().unwrap();
        assert!(matches!(first.request, Request::SetVcpus(4)));
        assert_eq!((first.id, fds.len()), (1, 1));
        let (second, fds) = b.receive::<Envelope>().unwrap().unwrap();
        assert!(matches!(second.request, Request::VcpuStates));
        assert!(fds.is_empty());
        drop(a);
        assert!(b.receive::<Envelope>().unwrap().is_none());
    }

    #[test]
    fn test_an_oversized_or_garbled_message_is_an_error_not_a_bigger_buffer() {
        let (a, b) = Channel::pair().unwrap();
        let huge = vec![b'x'; MAX_MESSAGE + 100];
        socket::send(a.as_raw_fd(), &huge, MsgFlags::empty()).unwrap();
        assert!(matches!(b.receive::<Message>(), Err(ChannelError::TooLong)));
        socket::send(a.as_raw_fd(), b"{\"Exit\": 7", MsgFlags::empty()).unwrap();
        assert!(matches!(
            b.receive::<Message>(),
            Err(ChannelError::Malformed(_))
        ));
        // The channel still works after both.
        a.send(&Message::Exit(ExitReason::PowerOff), &[]).unwrap();
        assert!(matches!(
            b.receive::<Message>().unwrap().unwrap().0,
            Message::Exit(ExitReason::PowerOff)
        ));
        // A log line goes with write(2), one message per write.
        a.write(&Message::Log(2, "one".into())).unwrap();
        a.write(&Message::Log(3, "two".into())).unwrap();
        for want in ["one", "two"] {
            match b.receive::<Message>().unwrap().unwrap().0 {
                Message::Log(_, line) => assert_eq!(line, want),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn test_text_is_bounded_at_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
    }
}
