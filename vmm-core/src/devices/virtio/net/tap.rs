//! A TAP interface as virtio-net's host side: one frame per read or write, each led by the
//! 12-byte virtio-net header (IFF_VNET_HDR, TUNSETVNETHDRSZ), so the guest's headers pass through
//! as they are.
//!
//! The caller may open it in another network namespace (the pod's): a tap's file descriptor keeps
//! working from any namespace once opened.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_iow_nr;

/// struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): what leads every frame on the queues and the tap.
pub const VNET_HDR_LEN: usize = 12;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// Longest interface name, with its NUL (IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// struct ifreq as TUNSETIFF reads it: the name, then the flags (the rest of the union unused).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("Invalid tap name {0:?} (1 to 15 bytes, no '/' or whitespace)")]
    Name(String),
    #[error("Cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    #[error("Cannot create tap {0} (TUNSETIFF)")]
    SetIff(String, #[source] std::io::Error),
    #[error("Cannot set the virtio-net header size of tap {0}")]
    HdrSize(String, #[source] std::io::Error),
}

/// A tap interface's file, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) tap `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write back the name into) a struct ifreq, which `req`
        // is laid out as and outlives the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            return Err(TapError::SetIff(
                name.to_string(),
                std::io::Error::last_os_error(),
            ));
        }
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, valid for the call.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &size) };
        if ret < 0 {
            return Err(TapError::HdrSize(
                name.to_string(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file, for the device's back end (frames with a virtio-net header).
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bad_names_are_refused_before_any_syscall() {
        for bad in ["", "a/b", "has space", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
    }

    #[test]
    fn test_ifreq_is_the_kernels_40_bytes() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
