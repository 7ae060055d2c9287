//! What a caller asks for, checked before anything touches KVM.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::arch::aarch64::layout;

/// Default number of possible vCPUs (docs/configuration.md).
pub const DEFAULT_MAX_VCPUS: u32 = 64;
/// Default guest RAM.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Less RAM than this cannot hold a kernel, an initramfs and the boot block.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Guest RAM must end below the 48-bit physical address limit of common hosts.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Linux's arm64 COMMAND_LINE_SIZE.
pub const MAX_CMDLINE_LEN: usize = 2048 - RESERVED_CMDLINE_LEN;
/// Room kept for what the VMM appends (` accordion.boot_timer=0x...`, and with memory resize
/// ` memhp_default_state=online_movable`).
pub const RESERVED_CMDLINE_LEN: usize = 128;
/// Memory above boot RAM comes in whole arm64 memory blocks (devices::virtio::mem::REGION_ALIGN).
pub const MEMORY_RESIZE_GRANULE_MIB: u64 = 128;
/// Default kernel command line: quiet (every console byte is a trap), reboot at once on panic so
/// the VM exits instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A file the VMM reads: by path (opened by `Vm::start`), or already open (a jailed VMM gets its
/// files from its parent and cannot open any).
pub enum InputFile {
    /// Opened by `Vm::start` each time it reads the file.
    Path(PathBuf),
    /// Already open for reading; read with positioned reads or from its start, never reopened.
    Open {
        /// The open file.
        file: File,
        /// Only for error messages (e.g. the path the parent opened).
        name: String,
    },
}

impl InputFile {
    /// What error messages call the file: its path, or the name it was given.
    pub fn name(&self) -> String {
        match self {
            Self::Path(path) => path.display().to_string(),
            Self::Open { name, .. } => name.clone(),
        }
    }

    /// The file to read: a `Path` opened now, an `Open` file borrowed. Its offset is not
    /// reset: read it with positioned reads, or seek first.
    pub(crate) fn open(&self) -> std::io::Result<OpenedFile<'_>> {
        match self {
            Self::Path(path) => File::open(path).map(OpenedFile::Owned),
            Self::Open { file, .. } => Ok(OpenedFile::Borrowed(file)),
        }
    }
}

/// An `InputFile` ready to read (`InputFile::open`).
pub(crate) enum OpenedFile<'a> {
    /// Opened from a path; closed when dropped.
    Owned(File),
    /// The caller's open file.
    Borrowed(&'a File),
}

impl std::ops::Deref for OpenedFile<'_> {
    type Target = File;

    fn deref(&self) -> &File {
        match self {
            Self::Owned(file) => file,
            Self::Borrowed(file) => file,
        }
    }
}

impl std::fmt::Debug for InputFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => f.debug_tuple("Path").field(path).finish(),
            Self::Open { file, name } => f
                .debug_struct("Open")
                .field("fd", &file.as_raw_fd())
                .field("name", name)
                .finish(),
        }
    }
}

impl From<PathBuf> for InputFile {
    fn from(path: PathBuf) -> Self {
        Self::Path(path)
    }
}

impl From<&PathBuf> for InputFile {
    fn from(path: &PathBuf) -> Self {
        Self::Path(path.clone())
    }
}

impl From<&Path> for InputFile {
    fn from(path: &Path) -> Self {
        Self::Path(path.to_path_buf())
    }
}

impl From<&str> for InputFile {
    fn from(path: &str) -> Self {
        Self::Path(path.into())
    }
}

impl From<String> for InputFile {
    fn from(path: String) -> Self {
        Self::Path(path.into())
    }
}

/// A hybrid vsock device: the host side is a Unix socket (Firecracker's convention).
#[derive(Debug)]
pub struct VsockConfig {
    /// Guest CID (3 or more; 0-2 are reserved).
    pub cid: u64,
    /// Host Unix socket path. Guest-initiated connections to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// An already bound and listening socket for `uds_path` (a jailed VMM cannot bind it). When
    /// set, `Vm::start` uses it instead of binding, and the device neither replaces a stale file
    /// nor removes `uds_path` when dropped: the parent owns the path. Guest-initiated connections
    /// still go to `<uds_path>_P`, which a jailed VMM cannot reach, so they are refused.
    pub listener: Option<UnixListener>,
}

/// A virtio-fs device served by a virtiofsd (vhost-user) the caller has started.
#[derive(Debug)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs <tag> <dir>` (1 to 36 bytes, unique per VM).
    pub tag: String,
    /// virtiofsd's vhost-user socket (`virtiofsd --socket-path`); it must be listening when
    /// `Vm::start` runs. With `stream` set it only names the socket in messages.
    pub socket_path: PathBuf,
    /// An already connected vhost-user socket to virtiofsd (a jailed VMM cannot connect by
    /// path); when set, `Vm::start` uses it instead of connecting to `socket_path`.
    pub stream: Option<UnixStream>,
}

/// A virtio-net device whose host side is a tap the caller opened (devices::virtio::net::tap::Tap,
/// with a virtio-net header), e.g. in the pod's network namespace.
#[derive(Debug)]
pub struct NetConfig {
    /// The tap's file descriptor; the device owns it from `Vm::start` on.
    pub tap: std::os::fd::OwnedFd,
    /// The guest interface's MAC (unicast).
    pub mac: [u8; 6],
    /// The guest interface's MTU (68 or more).
    pub mtu: u16,
}

/// virtio-mmio slot of the first virtio-fs device; the next ones follow.
pub const FIRST_FS_SLOT: u32 = 1;
/// virtio-mmio slot of the first virtio-net device; the next ones follow.
pub const FIRST_NET_SLOT: u32 = 16;
/// At most this many virtio-fs devices (the virtio-mmio slots between vsock and the NICs).
pub const MAX_FS_DEVICES: usize = (FIRST_NET_SLOT - FIRST_FS_SLOT) as usize;
/// virtio-mmio slot of the virtio-mem device (the last one).
pub const MEM_SLOT: u32 = layout::VIRTIO_MMIO_SLOTS - 1;
/// At most this many virtio-net devices (the slots between the virtio-fs devices and virtio-mem).
pub const MAX_NET_DEVICES: usize = (MEM_SLOT - FIRST_NET_SLOT) as usize;

/// A microVM to start.
pub struct VmConfig {
    /// Raw arm64 `Image`.
    pub kernel: InputFile,
    /// Initramfs (newc cpio, optionally compressed).
    pub initrd: Option<InputFile>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM at boot in MiB.
    pub memory_mib: u64,
    /// The most guest RAM in MiB: above `memory_mib`, a virtio-mem device can plug up to the
    /// difference (a multiple of 128 MiB) while the VM runs. None or `memory_mib`: fixed RAM.
    pub max_memory_mib: Option<u64>,
    /// vCPUs plugged at boot.
    pub boot_vcpus: u32,
    /// Possible vCPUs: all are created at boot, only `boot_vcpus` are plugged.
    pub max_vcpus: u32,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// Optional vsock device.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices, in virtio-mmio slots `FIRST_FS_SLOT..` in this order.
    pub fs: Vec<FsConfig>,
    /// virtio-net devices, in virtio-mmio slots `FIRST_NET_SLOT..` in this order.
    pub net: Vec<NetConfig>,
    /// `/dev/kvm`, already open read-write with O_CLOEXEC (a jailed VMM cannot open it); when
    /// set, `Vm::start` uses it instead of opening `/dev/kvm`.
    pub kvm: Option<File>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("memory_mib", &self.memory_mib)
            .field("max_memory_mib", &self.max_memory_mib)
            .field("boot_vcpus", &self.boot_vcpus)
            .field("max_vcpus", &self.max_vcpus)
            .field("vsock", &self.vsock)
            .field("fs", &self.fs)
            .field("net", &self.net)
            .field("kvm_fd", &self.kvm.as_ref().map(AsRawFd::as_raw_fd))
            .finish_non_exhaustive()
    }
}

impl VmConfig {
    /// A 1-vCPU, 64-possible, 256 MiB VM booting `kernel`, console discarded.
    pub fn new(kernel: impl Into<InputFile>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_mib: DEFAULT_MEMORY_MIB,
            max_memory_mib: None,
            boot_vcpus: 1,
            max_vcpus: DEFAULT_MAX_VCPUS,
            console: Box::new(std::io::sink()),
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            kvm: None,
        }
    }

    /// Checks everything that does not need the files or KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.boot_vcpus == 0 {
            return Err(ConfigError::NoBootVcpus);
        }
        if self.boot_vcpus > self.max_vcpus {
            return Err(ConfigError::BootAboveMax {
                boot: self.boot_vcpus,
                max: self.max_vcpus,
            });
        }
        if self.max_vcpus > layout::MAX_VCPUS {
            return Err(ConfigError::MaxAboveLimit {
                max: self.max_vcpus,
                limit: layout::MAX_VCPUS,
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall {
                mib: self.memory_mib,
                min: MIN_MEMORY_MIB,
            });
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryTooLarge {
                mib: self.memory_mib,
                max: MAX_MEMORY_MIB,
            });
        }
        self.validate_max_memory()?;
        if self.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max: MAX_CMDLINE_LEN - 1,
            });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 {
                return Err(ConfigError::VsockCid(vsock.cid));
            }
        }
        self.validate_fs()?;
        self.validate_net()
    }

    fn validate_max_memory(&self) -> Result<(), ConfigError> {
        let Some(max) = self.max_memory_mib else {
            return Ok(());
        };
        if max < self.memory_mib {
            return Err(ConfigError::MaxMemoryBelowBoot {
                max,
                boot: self.memory_mib,
            });
        }
        if max > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryTooLarge {
                mib: max,
                max: MAX_MEMORY_MIB,
            });
        }
        if (max - self.memory_mib) % MEMORY_RESIZE_GRANULE_MIB != 0 {
            return Err(ConfigError::MaxMemoryGranule {
                max,
                boot: self.memory_mib,
            });
        }
        Ok(())
    }

    /// The virtio-mem region (guest address, bytes) if memory can grow: from the first 1 GiB
    /// boundary above boot RAM, `max_memory_mib - memory_mib` long.
    pub fn hotplug_region(&self) -> Option<(u64, u64)> {
        let size = self.max_memory_mib?.checked_sub(self.memory_mib)? << 20;
        (size > 0).then(|| {
            let ram_end = layout::RAM_BASE + self.memory_bytes();
            (ram_end.next_multiple_of(layout::HOTPLUG_ALIGN), size)
        })
    }

    fn validate_net(&self) -> Result<(), ConfigError> {
        if self.net.len() > MAX_NET_DEVICES {
            return Err(ConfigError::TooManyNet {
                count: self.net.len(),
                max: MAX_NET_DEVICES,
            });
        }
        for net in &self.net {
            if net.mtu < crate::devices::virtio::net::MIN_MTU {
                return Err(ConfigError::NetMtu(net.mtu));
            }
            if net.mac[0] & 1 != 0 {
                return Err(ConfigError::NetMac(
                    crate::devices::virtio::net::format_mac(&net.mac),
                ));
            }
        }
        Ok(())
    }

    fn validate_fs(&self) -> Result<(), ConfigError> {
        if self.fs.len() > MAX_FS_DEVICES {
            return Err(ConfigError::TooManyFs {
                count: self.fs.len(),
                max: MAX_FS_DEVICES,
            });
        }
        for (i, fs) in self.fs.iter().enumerate() {
            if fs.tag.is_empty()
                || fs.tag.len() > crate::devices::virtio::fs::TAG_LEN
                || fs.tag.contains('\0')
            {
                return Err(ConfigError::FsTag(fs.tag.clone()));
            }
            if self.fs[..i].iter().any(|other| other.tag == fs.tag) {
                return Err(ConfigError::FsTagDuplicate(fs.tag.clone()));
            }
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// A configuration that cannot be started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// boot_vcpus is 0.
    #[error("At least one vCPU must be plugged at boot")]
    NoBootVcpus,
    /// boot_vcpus exceeds max_vcpus.
    #[error("{boot} boot vCPUs exceed max_vcpus {max}")]
    BootAboveMax {
        /// Requested boot vCPUs.
        boot: u32,
        /// Requested possible vCPUs.
        max: u32,
    },
    /// max_vcpus exceeds what the address map (redistributor window) holds.
    #[error("max_vcpus {max} exceeds Accordion's limit of {limit}")]
    MaxAboveLimit {
        /// Requested possible vCPUs.
        max: u32,
        /// The limit.
        limit: u32,
    },
    /// max_vcpus exceeds KVM_CAP_MAX_VCPUS.
    #[error("max_vcpus {max} exceeds this host's KVM limit of {kvm}")]
    MaxAboveKvm {
        /// Requested possible vCPUs.
        max: u32,
        /// KVM's limit.
        kvm: usize,
    },
    /// Not enough RAM to boot anything.
    #[error("{mib} MiB of memory is too small (minimum {min} MiB)")]
    MemoryTooSmall {
        /// Requested MiB.
        mib: u64,
        /// Minimum MiB.
        min: u64,
    },
    /// More RAM than the address map allows.
    #[error("{mib} MiB of memory is too large (maximum {max} MiB)")]
    MemoryTooLarge {
        /// Requested MiB.
        mib: u64,
        /// Maximum MiB.
        max: u64,
    },
    /// max_memory below the boot size.
    #[error("max_memory {max} MiB is below the boot memory of {boot} MiB")]
    MaxMemoryBelowBoot {
        /// Requested maximum MiB.
        max: u64,
        /// Boot MiB.
        boot: u64,
    },
    /// Memory that can be plugged must come in whole arm64 memory blocks.
    #[error(
        "max_memory {max} MiB must exceed the boot memory of {boot} MiB by a multiple of \
         {MEMORY_RESIZE_GRANULE_MIB} MiB (the guest adds memory in blocks of that size)"
    )]
    MaxMemoryGranule {
        /// Requested maximum MiB.
        max: u64,
        /// Boot MiB.
        boot: u64,
    },
    /// Kernel command line too long for Linux.
    #[error("Kernel command line is {len} bytes (maximum {max})")]
    CmdlineTooLong {
        /// Length.
        len: usize,
        /// Maximum.
        max: usize,
    },
    /// Kernel command line contains NUL.
    #[error("Kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Reserved vsock CID.
    #[error("vsock CID {0} is reserved (use 3 or more)")]
    VsockCid(u64),
    /// A virtio-fs tag the guest could not be given.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes without NUL")]
    FsTag(String),
    /// Two virtio-fs devices with one tag.
    #[error("virtio-fs tag {0:?} is used twice")]
    FsTagDuplicate(String),
    /// More virtio-fs devices than virtio-mmio slots.
    #[error("{count} virtio-fs devices exceed the limit of {max}")]
    TooManyFs {
        /// Requested devices.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More virtio-net devices than virtio-mmio slots.
    #[error("{count} network interfaces exceed the limit of {max}")]
    TooManyNet {
        /// Requested devices.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An MTU the guest interface cannot have.
    #[error("Network interface MTU {0} is below 68")]
    NetMtu(u16),
    /// A multicast MAC for a guest interface.
    #[error("Network interface MAC {0} is multicast")]
    NetMac(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::new("/opt/accordion/share/guest/Image")
    }

    #[test]
    fn test_defaults_are_valid_with_64_possible_vcpus() {
        let c = config();
        assert_eq!((c.boot_vcpus, c.max_vcpus, c.memory_mib), (1, 64, 256));
        assert_eq!(c.validate(), Ok(()));
    }

    fn fs(tag: &str) -> FsConfig {
        FsConfig {
            tag: tag.into(),
            socket_path: "/run/virtiofsd.sock".into(),
            stream: None,
        }
    }

    #[test]
    fn test_max_memory_in_128_mib_steps_above_boot_gives_a_1_gib_aligned_region() {
        let c = VmConfig {
            memory_mib: 256,
            max_memory_mib: Some(2048),
            ..config()
        };
        assert_eq!(c.validate(), Ok(()));
        // RAM ends at 1.25 GiB; the region starts at 2 GiB and holds 1792 MiB.
        assert_eq!(c.hotplug_region(), Some((0x8000_0000, 1792 << 20)));
        let fixed = VmConfig {
            max_memory_mib: Some(256),
            ..c
        };
        assert_eq!(fixed.validate(), Ok(()));
        assert_eq!(fixed.hotplug_region(), None);
        assert_eq!(config().hotplug_region(), None);
    }

    #[test]
    fn test_max_memory_below_boot_off_granule_or_too_large_is_rejected() {
        let with = |max| VmConfig {
            memory_mib: 256,
            max_memory_mib: Some(max),
            ..config()
        };
        assert_eq!(
            with(128).validate(),
            Err(ConfigError::MaxMemoryBelowBoot {
                max: 128,
                boot: 256
            })
        );
        assert_eq!(
            with(1000).validate(),
            Err(ConfigError::MaxMemoryGranule {
                max: 1000,
                boot: 256
            })
        );
        assert_eq!(
            with(MAX_MEMORY_MIB + 128).validate(),
            Err(ConfigError::MemoryTooLarge {
                mib: MAX_MEMORY_MIB + 128,
                max: MAX_MEMORY_MIB
            })
        );
    }

    #[test]
    fn test_fs_devices_with_distinct_tags_are_valid() {
        let c = VmConfig {
            fs: vec![fs("rootfs"), fs(&"v".repeat(36))],
            ..config()
        };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn test_fs_tag_empty_or_too_long_is_rejected() {
        let empty = VmConfig {
            fs: vec![fs("")],
            ..config()
        };
        let long = VmConfig {
            fs: vec![fs(&"v".repeat(37))],
            ..config()
        };
        assert_eq!(empty.validate(), Err(ConfigError::FsTag(String::new())));
        assert_eq!(long.validate(), Err(ConfigError::FsTag("v".repeat(37))));
    }

    #[test]
    fn test_fs_tag_used_twice_is_rejected() {
        let c = VmConfig {
            fs: vec![fs("a"), fs("b"), fs("a")],
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::FsTagDuplicate("a".into())));
    }

    #[test]
    fn test_more_fs_devices_than_slots_is_rejected() {
        let c = VmConfig {
            fs: (0..16).map(|i| fs(&format!("t{i}"))).collect(),
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyFs { count: 16, max: 15 })
        );
    }

    #[test]
    fn test_bad_nics_are_rejected() {
        let nic = |mac: [u8; 6], mtu: u16| NetConfig {
            tap: std::os::fd::OwnedFd::from(std::os::unix::net::UnixDatagram::pair().unwrap().0),
            mac,
            mtu,
        };
        let c = VmConfig {
            net: vec![nic([2, 0, 0, 0, 0, 1], 67)],
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::NetMtu(67)));
        let c = VmConfig {
            net: vec![nic([3, 0, 0, 0, 0, 1], 1500)],
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::NetMac("03:00:00:00:00:01".into()))
        );
        let c = VmConfig {
            net: (0..17).map(|i| nic([2, 0, 0, 0, 0, i], 1500)).collect(),
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyNet { count: 17, max: 15 })
        );
    }

    #[test]
    fn test_input_file_names_its_path_or_the_name_it_was_given() {
        let by_path = InputFile::from("/k/Image");
        let open = InputFile::Open {
            file: File::open("/dev/null").unwrap(),
            name: "kernel (fd 3)".into(),
        };
        assert!(matches!(&by_path, InputFile::Path(p) if p == Path::new("/k/Image")));
        assert_eq!(by_path.name(), "/k/Image");
        assert_eq!(open.name(), "kernel (fd 3)");
    }

    #[test]
    fn test_debug_shows_open_files_as_fds() {
        let c = VmConfig {
            kvm: Some(File::open("/dev/null").unwrap()),
            initrd: Some(InputFile::Open {
                file: File::open("/dev/null").unwrap(),
                name: "initrd".into(),
            }),
            ..config()
        };
        let text = format!("{c:?}");
        assert!(
            text.contains("Path(\"/opt/accordion/share/guest/Image\")"),
            "{text}"
        );
        assert!(text.contains("Open { fd: "), "{text}");
        assert!(text.contains("kvm_fd: Some("), "{text}");
    }

    #[test]
    fn test_zero_boot_vcpus_is_rejected() {
        let c = VmConfig {
            boot_vcpus: 0,
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::NoBootVcpus));
    }

    #[test]
    fn test_boot_vcpus_above_max_is_rejected() {
        let c = VmConfig {
            boot_vcpus: 9,
            max_vcpus: 8,
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::BootAboveMax { boot: 9, max: 8 })
        );
    }

    #[test]
    fn test_max_vcpus_above_layout_limit_is_rejected() {
        let c = VmConfig {
            max_vcpus: 513,
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::MaxAboveLimit {
                max: 513,
                limit: 512
            })
        );
    }

    #[test]
    fn test_memory_below_minimum_is_rejected() {
        let c = VmConfig {
            memory_mib: 16,
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall { mib: 16, min: 32 })
        );
    }

    #[test]
    fn test_reserved_vsock_cid_is_rejected() {
        let c = VmConfig {
            vsock: Some(VsockConfig {
                cid: 2,
                uds_path: "/tmp/v.sock".into(),
                listener: None,
            }),
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::VsockCid(2)));
    }

    #[test]
    fn test_overlong_cmdline_is_rejected() {
        let c = VmConfig {
            cmdline: "x".repeat(4096),
            ..config()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong { len: 4096, .. })
        ));
    }
}
