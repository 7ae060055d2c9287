//! accordion-agent: PID 1 of the guest microVM and its gRPC agent (`accordion.agent.v1`) on vsock
//! port 1024. The binary is a thin `main`; everything here is testable on a host over a Unix
//! socket (`--listen-unix`), without PID-1 behaviour.

pub mod args;
pub mod boot_timer;
pub mod containers;
pub mod cpu;
pub mod exec;
pub mod init;
pub mod log;
pub mod memory;
pub mod modules;
pub mod network;
pub mod pty;
pub mod reaper;
pub mod server;
pub mod sysinfo;

/// The agent's version, reported by Health and GetGuestInfo.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
