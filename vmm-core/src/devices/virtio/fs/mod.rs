//! virtio-fs (device ID 26) as a vhost-user frontend: an external virtiofsd maps guest RAM (the
//! memfd) and works the rings itself; the VMM only negotiates, hands over the rings and eventfds,
//! and turns the back end's "used" notifications into the virtio-mmio interrupt.
//!
//! Data path, per queue:
//! - kick: the guest's QueueNotify write matches a KVM ioeventfd (registered by `Vm::start` on
//!   this transport's notify address with the queue index as datamatch), so it wakes virtiofsd
//!   without leaving the kernel. `queue_notify` is only a fallback that writes the same eventfd.
//! - call: virtiofsd signals a per-queue eventfd; [`interrupt::Forwarder`] sets InterruptStatus
//!   and raises the transport's irqfd (see there for why not an irqfd directly).
//!
//! Everything virtiofsd sends is untrusted: a failed or hung request (5 s socket timeout), or the
//! daemon going away, marks the device failed (DEVICE_NEEDS_RESET for the driver); the VM runs on.

mod interrupt;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{read_config_space, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// virtio device ID of a file system device.
pub const DEVICE_ID: u32 = 26;
/// Size of the tag field of the configuration space (virtio 1.2 §5.11.4).
pub const TAG_LEN: usize = 36;
/// Request queues offered; queue 0 is the high-priority queue, so the device has one more.
const NUM_REQUEST_QUEUES: u32 = 1;
/// Maximum size of each queue (virtiofsd accepts up to 1024).
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1 + NUM_REQUEST_QUEUES as usize] = [QUEUE_SIZE; 2];
/// How long one vhost-user request may take before the back end counts as hung.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// VIRTIO_F_RING_INDIRECT_DESC.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_F_RING_EVENT_IDX.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// vhost-user's own feature bit in GET/SET_FEATURES: protocol features are negotiated.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Virtio features passed through to the guest when virtiofsd offers them. Ring layout features
/// only: the rings are virtiofsd's business, and nothing here needs the transport's help.
const PASSED_THROUGH: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Errors from connecting to virtiofsd or driving it.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag does not fit the configuration space.
    #[error("Invalid virtio-fs tag {0:?}: 1 to 36 bytes, no NUL")]
    Tag(String),
    /// Nothing listens on the socket (or it is not a socket).
    #[error("Cannot connect to the virtiofsd socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// A vhost-user request failed or timed out.
    #[error("vhost-user {0} failed")]
    Request(&'static str, #[source] vhost::Error),
    /// The back end cannot do virtio 1.
    #[error("virtiofsd offers no VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    /// Guest RAM is not shareable with another process.
    #[error("Guest RAM is not backed by a file")]
    RamNotShareable,
    /// A vring address is outside guest RAM.
    #[error("Queue {0} is not in guest RAM")]
    QueueAddress(usize),
    /// The connection broke earlier; there is no reconnection.
    #[error("The virtiofsd connection is broken")]
    Broken,
    /// An eventfd or thread could not be created.
    #[error("Cannot create a virtio-fs eventfd or thread")]
    Resource(#[source] std::io::Error),
}

/// `Request` with the request's name.
fn request(what: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |e| FsError::Request(what, e)
}

/// The tag as the configuration space holds it: UTF-8, NUL-padded, not necessarily terminated.
pub fn encode_tag(tag: &str) -> Result<[u8; TAG_LEN], FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(FsError::Tag(tag.to_string()));
    }
    let mut out = [0u8; TAG_LEN];
    out[..tag.len()].copy_from_slice(tag.as_bytes());
    Ok(out)
}

/// A virtio-fs device connected to one virtiofsd.
pub struct Fs {
    tag: [u8; TAG_LEN],
    socket_path: PathBuf,
    frontend: Frontend,
    /// Virtio features virtiofsd offered (GET_FEATURES).
    backend_features: u64,
    /// Whether SET_PROTOCOL_FEATURES happened (then rings start disabled and need SET_VRING_ENABLE).
    protocol_features: bool,
    /// Per queue, written by the guest through KVM; they live as long as the device so the
    /// ioeventfds registered at VM start stay valid across resets.
    kicks: Vec<EventFd>,
    /// Per queue, written by virtiofsd.
    calls: Vec<EventFd>,
    /// Queues handed to virtiofsd since the last activation.
    started: Vec<usize>,
    forwarder: Option<interrupt::Forwarder>,
    failed: Arc<AtomicBool>,
}

impl Fs {
    /// Connects to the virtiofsd listening on `socket_path` and negotiates what can be negotiated
    /// before the guest shows up (ownership, protocol features). `tag` is what the guest mounts.
    pub fn connect(tag: &str, socket_path: &Path) -> Result<Self, FsError> {
        encode_tag(tag)?;
        let stream = UnixStream::connect(socket_path)
            .map_err(|e| FsError::Connect(socket_path.to_path_buf(), e))?;
        Self::from_stream(tag, stream, socket_path)
    }

    /// Like `connect`, on `stream`, already connected to virtiofsd (a jailed VMM gets it from its
    /// parent); `socket_path` only names the socket in messages.
    pub fn from_stream(tag: &str, stream: UnixStream, socket_path: &Path) -> Result<Self, FsError> {
        let tag_bytes = encode_tag(tag)?;
        // A back end that stops answering must not hang the vCPU thread doing the activation.
        for timeout in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
            timeout(&stream, Some(BACKEND_TIMEOUT)).map_err(FsError::Resource)?;
        }
        let mut frontend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(request("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NoVersion1(backend_features));
        }
        let protocol_features = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(request("GET_PROTOCOL_FEATURES"))?;
            // REPLY_ACK turns silent refusals (a bad memory table, a bad ring) into errors here.
            // MQ only states that the back end has several queues; we use two.
            let wanted =
                offered & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ);
            frontend
                .set_protocol_features(wanted)
                .map_err(request("SET_PROTOCOL_FEATURES"))?;
            if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let eventfds = || -> Result<Vec<EventFd>, FsError> {
            QUEUE_SIZES
                .iter()
                .map(|_| EventFd::new(EFD_NONBLOCK).map_err(FsError::Resource))
                .collect()
        };
        log::info!(
            "virtio-fs {tag}: connected to {} (features {backend_features:#x})",
            socket_path.display()
        );
        Ok(Self {
            tag: tag_bytes,
            socket_path: socket_path.to_path_buf(),
            frontend,
            backend_features,
            protocol_features,
            kicks: eventfds()?,
            calls: eventfds()?,
            started: Vec::new(),
            forwarder: None,
            failed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether the connection to virtiofsd broke (the device then stays failed).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn tag(&self) -> String {
        let end = self.tag.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
        String::from_utf8_lossy(&self.tag[..end]).into_owned()
    }

    /// Hands the driver's rings to virtiofsd: features, memory table, then each ready ring.
    fn start_backend(
        &mut self,
        memory: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[Queue],
    ) -> Result<(), FsError> {
        if self.failed() {
            return Err(FsError::Broken);
        }
        let frontend = &mut self.frontend;
        frontend
            .set_features(acked_features | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES))
            .map_err(request("SET_FEATURES"))?;
        let regions = memory
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| FsError::RamNotShareable)
            })
            .collect::<Result<Vec<_>, _>>()?;
        frontend
            .set_mem_table(&regions)
            .map_err(request("SET_MEM_TABLE"))?;
        self.started.clear();
        for (index, queue) in queues.iter().enumerate() {
            if !queue.ready() {
                continue;
            }
            let host = |addr: u64| {
                memory
                    .get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| FsError::QueueAddress(index))
            };
            let ring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            frontend
                .set_vring_num(index, queue.size())
                .map_err(request("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(index, &ring)
                .map_err(request("SET_VRING_ADDR"))?;
            frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(request("SET_VRING_BASE"))?;
            // Indexes come from QUEUE_SIZES, as do the eventfd vectors.
            let (Some(call), Some(kick)) = (self.calls.get(index), self.kicks.get(index)) else {
                continue;
            };
            frontend
                .set_vring_call(index, call)
                .map_err(request("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(index, kick)
                .map_err(request("SET_VRING_KICK"))?;
            self.started.push(index);
            if self.protocol_features {
                frontend
                    .set_vring_enable(index, true)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Takes the rings back from virtiofsd (GET_VRING_BASE stops a ring in the back end).
    fn stop_backend(&mut self) -> Result<(), FsError> {
        for index in std::mem::take(&mut self.started) {
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(request("GET_VRING_BASE"))?;
        }
        Ok(())
    }

    fn fail(&self, what: &str, e: &FsError) {
        self.failed.store(true, Ordering::SeqCst);
        log::error!(
            "virtio-fs {}: {what}: {} ({}); the device is failed",
            self.tag(),
            crate::error_chain(e),
            self.socket_path.display()
        );
    }
}

impl VirtioDevice for Fs {
    /// virtiofsd reads each queue's kick eventfd; KVM writes it on QueueNotify.
    fn kick_eventfds(&self) -> &[EventFd] {
        &self.kicks
    }

    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_THROUGH
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; TAG_LEN + 4];
        config[..TAG_LEN].copy_from_slice(&self.tag);
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadConfig(format!("{} queues", queues.len())));
        }
        // Calls left over from an earlier activation would only cause a spurious interrupt.
        for call in &self.calls {
            let _ = call.read();
        }
        if let Err(e) = self.start_backend(&memory, acked_features, &queues) {
            self.fail("cannot start", &e);
            return Err(ActivateError::Backend(std::io::Error::other(e)));
        }
        let forwarder = interrupt::Forwarder::spawn(
            &self.calls,
            &self.frontend,
            interrupt,
            self.failed.clone(),
            self.tag(),
        )
        .map_err(|e| ActivateError::Backend(std::io::Error::other(e)))?;
        self.forwarder = Some(forwarder);
        // Activation runs on the device manager's thread, after the vCPU's DRIVER_OK write has
        // returned, so the driver may already have kicked: through the ioeventfd, which the
        // transport never sees. virtiofsd drops a kick it reads before SET_VRING_ENABLE (it
        // registers the eventfd at SET_VRING_KICK), and the driver waits forever for a request
        // it queued then. One kick per started ring now makes virtiofsd look at every ring once
        // it is enabled; a spurious kick only costs a look at an empty ring.
        for &index in &self.started {
            if let Some(kick) = self.kicks.get(index) {
                if let Err(e) = kick.write(1) {
                    log::warn!("virtio-fs {}: cannot kick queue {index}: {e}", self.tag());
                }
            }
        }
        log::info!("virtio-fs {}: started {:?}", self.tag(), self.started);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        // Only reached if the ioeventfd did not match (it always should).
        if let Some(kick) = self.kicks.get(usize::from(index)) {
            if let Err(e) = kick.write(1) {
                crate::log_limited!(
                    log::Level::Warn,
                    "virtio-fs {}: cannot kick queue {index}: {e}",
                    self.tag()
                );
            }
        }
    }

    fn reset(&mut self) -> bool {
        self.forwarder = None;
        if self.failed() {
            return false;
        }
        match self.stop_backend() {
            Ok(()) => true,
            Err(e) => {
                self.fail("cannot stop", &e);
                false
            }
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        // Stop forwarding before the socket closes; closing it makes virtiofsd exit.
        self.forwarder = None;
    }
}

#[cfg(test)]
mod tests;
