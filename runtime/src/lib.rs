//! accordion-runtime: the containerd shim (`containerd-shim-accordion-v2`, with the shim issue) and
//! the `accordion` operator CLI, both built on the embedded VMM in `accordion-vmm`.

pub mod agent_client;
pub mod cli;
pub mod sandbox;
