//! vCPUs: every possible one is created at boot; a thread exists only while the guest runs it.

pub mod events;
pub mod state;

#[cfg(target_arch = "aarch64")]
mod kick;
#[cfg(target_arch = "aarch64")]
mod runner;

pub use events::{EventHub, VcpuEvent};
#[cfg(target_arch = "aarch64")]
pub use kick::KickError;
#[cfg(target_arch = "aarch64")]
pub(crate) use runner::{create_all, Vcpus};
pub use state::VcpuState;

/// Errors from creating or starting vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM step failed for one vCPU.
    #[error("Cannot {step} vCPU {index}")]
    Kvm {
        /// What was being done.
        step: &'static str,
        /// vCPU index.
        index: usize,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The thread could not be spawned.
    #[error("Cannot spawn the thread of vCPU {0}")]
    Spawn(usize, #[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[cfg(target_arch = "aarch64")]
    #[error("Cannot set up vCPU kicks")]
    Kick(#[from] KickError),
}
