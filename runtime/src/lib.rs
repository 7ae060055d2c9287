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

/// An error and its sources on one line: "outer: inner: innermost".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
