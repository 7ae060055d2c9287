//! accordion-runtime: the containerd shim (`containerd-shim-accordion-v2`, with the shim issue) and
//! the `accordion` operator CLI, both built on the embedded VMM in `accordion-vmm`.

pub mod agent_client;
pub mod cli;
pub mod config;
pub mod confinement;
pub mod control;
pub mod host_cgroup;
pub mod install;
pub mod network;
pub mod pidfd;
pub mod resize;
pub mod sandbox;
pub mod shim;
pub mod vmm_process;

/// An error and its sources on one line: "outer: inner: innermost" (vmm-core's, one for both).
pub use accordion_vmm::error_chain;
