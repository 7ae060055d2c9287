//! virtio-vsock as a userspace device with a hybrid-vsock Unix socket back end.

pub(crate) mod backend;
#[cfg(test)]
mod backend_tests;
mod conn;
pub(crate) mod connect;
pub mod packet;
mod txbuf;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{read_config_space, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::event_loop::{self, Filter};
use crate::seccomp::ThreadKind;

/// virtio device ID of vsock.
pub const DEVICE_ID: u32 = 19;
/// RX, TX and event queues.
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// Errors from creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket could not be created.
    #[error("Cannot listen on vsock socket {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("Cannot create a vsock eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    /// Whether the device bound `uds_path` and so removes it when dropped.
    owns_path: bool,
    listener: Option<UnixListener>,
    kick: Arc<EventFd>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Vsock {
    /// A device for guest CID `cid`, listening on `uds_path` (a stale socket file is replaced).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path)
            .map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        let mut device = Self::from_listener(cid, uds_path, listener)?;
        device.owns_path = true;
        Ok(device)
    }

    /// A device for guest CID `cid` on `listener`, already bound to `uds_path` and listening (a
    /// jailed VMM gets it from its parent). The device leaves `uds_path` alone: its owner removes
    /// it. Guest-initiated connections still go to `<uds_path>_<port>`.
    pub fn from_listener(
        cid: u64,
        uds_path: &Path,
        listener: UnixListener,
    ) -> Result<Self, VsockError> {
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(VsockError::EventFd)
        };
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            owns_path: false,
            listener: Some(listener),
            kick: eventfd()?,
            stop: eventfd()?,
            thread: None,
        })
    }

    fn stop_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            if thread.join().is_err() {
                log::error!("vsock back end thread panicked");
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.cid.to_le_bytes();
        read_config_space(&config, offset, data);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| ActivateError::BadConfig("vsock activated twice".into()))?;
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadConfig(format!("{} queues", queues.len())));
        }
        let (kick, stop) = (self.kick.clone(), self.stop.clone());
        let socket = backend::HostSocket {
            guest_cid: self.cid,
            uds_path: self.uds_path.clone(),
            listener,
        };
        let flag = interrupt.clone();
        let backend = backend::Backend::new(socket, memory, queues, interrupt, &stop, &kick)
            .map_err(ActivateError::Backend)?;
        let thread = event_loop::spawn(
            Filter::Seccomp(ThreadKind::Vsock),
            move || backend.run(&kick),
            move |_| flag.device_error(),
        )
        .map_err(ActivateError::Backend)?;
        self.thread = Some(thread);
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        // The back end looks at every queue when woken.
        if let Err(e) = self.kick.write(1) {
            crate::log_limited!(log::Level::Warn, "Cannot wake the vsock back end: {e}");
        }
    }

    fn reset(&mut self) -> bool {
        // The listener moved into the stopped thread; a second activation would need a new one.
        self.stop_thread();
        false
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_thread();
        if self.owns_path {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "accordion-vsock-unit-{}-{name}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn test_config_space_holds_the_guest_cid() {
        let path = socket_path("config");
        let device = Vsock::new(42, &path).unwrap();
        let mut cid = [0u8; 8];
        device.read_config(0, &mut cid);
        let mut high = [0xffu8; 4];
        device.read_config(4, &mut high);
        assert_eq!(u64::from_le_bytes(cid), 42);
        assert_eq!(high, [0; 4]);
    }

    #[test]
    fn test_socket_exists_while_the_device_lives_and_stale_ones_are_replaced() {
        let path = socket_path("lifetime");
        std::fs::write(&path, b"stale").unwrap();
        let device = Vsock::new(3, &path).unwrap();
        let connectable = std::os::unix::net::UnixStream::connect(&path).is_ok();
        drop(device);
        assert!(connectable);
        assert!(!path.exists());
    }

    #[test]
    fn test_a_listener_from_the_caller_is_used_and_its_path_left_alone() {
        let path = socket_path("given");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let device = Vsock::from_listener(3, &path, listener).unwrap();
        let connectable = std::os::unix::net::UnixStream::connect(&path).is_ok();
        drop(device);
        let left = path.exists();
        let _ = std::fs::remove_file(&path);
        assert!(connectable);
        assert!(left);
    }

    #[test]
    fn test_offers_virtio_1_and_three_queues() {
        let path = socket_path("features");
        let device = Vsock::new(3, &path).unwrap();
        assert_eq!(device.features(), VIRTIO_F_VERSION_1);
        assert_eq!(device.queue_max_sizes().len(), 3);
        assert_eq!(device.device_type(), 19);
    }
}
