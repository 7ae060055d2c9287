//! The guest's CPUs (`accordion.agent.v1.Cpu`): the agent onlines every CPU the kernel hot-adds
//! and reports each change, which the host takes as the acknowledgement of a vCPU resize.
//!
//! What the kernel does (Linux 6.12, arm64 ACPI hotplug, Documentation/arch/arm64/cpu-hotplug.rst):
//! - plug: the ACPI processor driver calls `arch_register_cpu` → `register_cpu`, whose
//!   `device_add` sends `add@/devices/system/cpu/cpuN` (SUBSYSTEM=cpu); the CPU stays offline
//!   until someone writes 1 to `cpuN/online`. That someone is us ([`watcher`]). `enabled` gains the
//!   CPU right after the uevent (`set_cpu_enabled` follows `device_register`), `present` does not
//!   change on arm64 (every possible CPU is present).
//! - online/offline: `device_online`/`device_offline` (a write to `online`, or the ACPI eject path
//!   offlining the CPU first) send `online@…`/`offline@…` once the state changed.
//! - unplug: after offlining, `unregister_cpu` clears `enabled` and `device_unregister` sends
//!   `remove@…`.
//!
//! Modules: [`uevent`] parses the kernel's messages, [`netlink`] receives them, [`sysfs`] reads the
//! masks and writes `online`, [`watcher`] turns uevents into actions and events, [`service`] is the
//! gRPC service.

pub mod netlink;
pub mod service;
pub mod sysfs;
pub mod uevent;
pub mod watcher;

use accordion_proto::agent::v1 as pb;

pub use service::CpuService;
pub use sysfs::{CpuSets, CpuSysfs};
pub use watcher::CpuHub;

/// What a [`CpuEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuEventKind {
    /// The current sets, no change implied.
    Snapshot,
    /// The kernel registered a CPU (hot-add).
    Added,
    /// The kernel unregistered a CPU (hot-remove).
    Removed,
    /// A CPU came online.
    Online,
    /// A CPU went offline.
    Offline,
    /// The agent could not online a hot-added CPU.
    OnlineFailed,
}

/// One CPU change (or a snapshot), with the sets as they were right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuEvent {
    /// What happened.
    pub kind: CpuEventKind,
    /// The CPU concerned; `None` for a snapshot.
    pub cpu: Option<u32>,
    /// The sets after the change.
    pub sets: CpuSets,
    /// Why onlining failed (OnlineFailed only).
    pub error: Option<String>,
    /// The guest's CLOCK_MONOTONIC when the agent observed it, nanoseconds.
    pub monotonic_ns: u64,
}

/// The guest's CLOCK_MONOTONIC in nanoseconds (0 if the clock cannot be read, which Linux never
/// does for this clock).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .ok()
        .and_then(|t| {
            let secs = u64::try_from(t.tv_sec()).ok()?;
            let nanos = u64::try_from(t.tv_nsec()).ok()?;
            secs.checked_mul(1_000_000_000)?.checked_add(nanos)
        })
        .unwrap_or(0)
}

impl From<CpuEventKind> for pb::CpuEventKind {
    fn from(kind: CpuEventKind) -> Self {
        match kind {
            CpuEventKind::Snapshot => pb::CpuEventKind::Snapshot,
            CpuEventKind::Added => pb::CpuEventKind::Added,
            CpuEventKind::Removed => pb::CpuEventKind::Removed,
            CpuEventKind::Online => pb::CpuEventKind::Online,
            CpuEventKind::Offline => pb::CpuEventKind::Offline,
            CpuEventKind::OnlineFailed => pb::CpuEventKind::OnlineFailed,
        }
    }
}

impl From<CpuEvent> for pb::CpuEvent {
    fn from(event: CpuEvent) -> Self {
        let has_enabled = event.sets.enabled.is_some();
        Self {
            kind: pb::CpuEventKind::from(event.kind).into(),
            cpu: event.cpu,
            online: event.sets.online,
            present: event.sets.present,
            possible: event.sets.possible,
            enabled: event.sets.enabled.unwrap_or_default(),
            has_enabled,
            error: event.error.unwrap_or_default(),
            monotonic_ns: event.monotonic_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_event_to_wire_keeps_absent_enabled_apart_from_empty() {
        let event = CpuEvent {
            kind: CpuEventKind::OnlineFailed,
            cpu: Some(3),
            sets: CpuSets {
                online: vec![0],
                present: vec![0, 1, 2, 3],
                possible: vec![0, 1, 2, 3],
                enabled: None,
            },
            error: Some("EIO".into()),
            monotonic_ns: 42,
        };
        let wire = pb::CpuEvent::from(event);
        assert_eq!(
            (wire.kind(), wire.cpu, wire.has_enabled, wire.error.as_str()),
            (pb::CpuEventKind::OnlineFailed, Some(3), false, "EIO")
        );
    }

    #[test]
    fn test_monotonic_ns_advances() {
        let (a, b) = (monotonic_ns(), monotonic_ns());
        assert!(a > 0 && b >= a);
    }
}
