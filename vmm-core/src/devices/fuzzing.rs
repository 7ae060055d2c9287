//! The fuzz targets' way in (`vmm-core/fuzz`), compiled only with the `fuzzing` feature: the
//! device back ends and the vsock handshake parser, which normal builds keep crate-private. Every
//! other device the targets drive (the virtio-mmio transport, the CPU hotplug controller, the GED,
//! the vsock packet header) is public API already, and virtio-mem's server comes from
//! `Mem::backend_for_fuzzing`.

pub use super::virtio::net::backend::{Backend as NetBackend, MAX_FRAME as NET_MAX_FRAME};
pub use super::virtio::vsock::backend::{
    Backend as VsockBackend, HostSocket as VsockHostSocket,
    MAX_CONNECTIONS as VSOCK_MAX_CONNECTIONS,
};
pub use super::virtio::vsock::connect::{parse_connect_line, LineReader, Progress};
