//! virtio-net as a userspace device over a tap (virtio 1.2 §5.1), Firecracker's model: the VMM
//! moves frames between the queues and the tap; no offloads are offered yet, so every frame is a
//! plain Ethernet frame with a zero header.
//!
//! Features offered: VERSION_1, MAC (the pod's, so neighbour tables stay right), MTU (the pod's)
//! and STATUS (link up).

pub(crate) mod backend;
pub mod tap;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{read_config_space, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::event_loop::{self, Filter};
use crate::seccomp::ThreadKind;

/// virtio device ID of a network card.
pub const DEVICE_ID: u32 = 1;
/// RX and TX queues (no control queue, no multiqueue).
const QUEUE_SIZES: [u16; 2] = [256, 256];

/// Feature bits (virtio 1.2 §5.1.3).
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// config.status: the link is up.
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Smallest MTU the device accepts (IPv4's minimum datagram).
pub const MIN_MTU: u16 = 68;

/// Errors from creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Invalid MTU {0}: {MIN_MTU} to 65535")]
    Mtu(u16),
    #[error("Invalid MAC {0}: it must be unicast (the first byte even)")]
    Mac(String),
    #[error("Cannot create a virtio-net eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A virtio-net device whose host side is `tap`.
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    tap: Option<OwnedFd>,
    kick: Arc<EventFd>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Net {
    /// A device for the guest interface with `mac` and `mtu`, its frames on `tap` (a tap opened
    /// with a virtio-net header, tap::Tap).
    pub fn new(tap: OwnedFd, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        if mtu < MIN_MTU {
            return Err(NetError::Mtu(mtu));
        }
        if mac[0] & 1 != 0 {
            return Err(NetError::Mac(format_mac(&mac)));
        }
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(NetError::EventFd)
        };
        Ok(Self {
            mac,
            mtu,
            tap: Some(tap),
            kick: eventfd()?,
            stop: eventfd()?,
            thread: None,
        })
    }

    fn stop_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            if thread.join().is_err() {
                log::error!("virtio-net back end thread panicked");
            }
        }
    }

    /// struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (all little endian).
    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        read_config_space(&config, offset, data);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadConfig(format!("{} queues", queues.len())));
        }
        let tap = self
            .tap
            .take()
            .ok_or_else(|| ActivateError::BadConfig("virtio-net activated twice".into()))?;
        let (kick, stop) = (self.kick.clone(), self.stop.clone());
        let flag = interrupt.clone();
        let backend = backend::Backend::new(tap, memory, queues, interrupt, &stop, &kick)
            .map_err(ActivateError::Backend)?;
        let thread = event_loop::spawn(
            Filter::Seccomp(ThreadKind::Net),
            move || backend.run(&kick),
            move |_| flag.device_error(),
        )
        .map_err(ActivateError::Backend)?;
        self.thread = Some(thread);
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        if let Err(e) = self.kick.write(1) {
            crate::log_limited!(log::Level::Warn, "Cannot wake the virtio-net back end: {e}");
        }
    }

    fn reset(&mut self) -> bool {
        // The tap moved into the stopped thread; a second activation would need it back.
        self.stop_thread();
        false
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn fd() -> OwnedFd {
        OwnedFd::from(UnixDatagram::pair().unwrap().0)
    }

    const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05];

    #[test]
    fn test_config_space_holds_mac_link_up_one_pair_and_mtu() {
        let device = Net::new(fd(), MAC, 1450).unwrap();
        let mut c = [0u8; 12];
        device.read_config(0, &mut c);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1450);
        // Reads past the end are zeros, not a panic.
        let mut beyond = [0xffu8; 4];
        device.read_config(10, &mut beyond);
        assert_eq!(beyond, [0xaa, 0x05, 0, 0]);
    }

    #[test]
    fn test_offers_version_1_mac_mtu_status_and_two_queues() {
        let device = Net::new(fd(), MAC, 1500).unwrap();
        assert_eq!(
            device.features(),
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | VIRTIO_NET_F_STATUS
        );
        assert_eq!(device.queue_max_sizes().len(), 2);
        assert_eq!(device.device_type(), 1);
    }

    #[test]
    fn test_bad_mtu_or_multicast_mac_is_refused() {
        assert!(matches!(Net::new(fd(), MAC, 60), Err(NetError::Mtu(60))));
        let mut multicast = MAC;
        multicast[0] = 0x01;
        let err = Net::new(fd(), multicast, 1500).err().unwrap().to_string();
        assert!(err.contains("01:42:0a:58:00:05"), "{err}");
    }
}
