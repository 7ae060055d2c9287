//! Resizing a sandbox's memory through virtio-mem: `accordion resize --memory` (and, next, the
//! shim's task Update).
//!
//! Acknowledged, never assumed: the VMM's device must report the requested size plugged, and the
//! guest agent's memory watch must show MemTotal at its boot value plus exactly what is plugged
//! (the kernel onlines plugged blocks itself, movable). The host cgroup's memory.max follows the
//! guest: raised before a grow, lowered after a shrink. A shrink that would leave the guest less
//! than [`SHRINK_HEADROOM`] above what it uses now (MemTotal − MemAvailable) is refused before
//! anything changes: unplugging would otherwise migrate the guest's pages into what remains and
//! squeeze it into reclaim or its OOM killer, as a cgroup limit below usage would (kubelet refuses
//! such a memory limit decrease for the same reason). A shrink the guest cannot complete in time
//! (memory in use, pages it cannot move) stops where it got: the VMM is asked for what is plugged
//! then, so the VM stays at a consistent size, and the error says how far it got.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use accordion_vmm::VmMemory;

use super::Resizer;
use crate::agent_client::AgentClientError;
use crate::sandbox::Sandbox;
use crate::vmm_process::SetMemoryError;

const MIB: u64 = 1 << 20;
/// What a shrink must leave free in the guest beyond what it uses (its kernel's working room).
pub const SHRINK_HEADROOM: u64 = 64 * MIB;

/// Why a memory resize failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryResizeError {
    /// The sandbox was started without room to grow.
    #[error("The sandbox's memory is fixed at {boot_mib} MiB (it was started without a larger max memory)")]
    Fixed { boot_mib: u64 },
    /// Outside [boot, max]: nothing was changed.
    #[error("Invalid memory size {target_mib} MiB: must be {boot_mib} to {max_mib} MiB (the sandbox's boot and max memory)")]
    InvalidTarget {
        target_mib: u64,
        boot_mib: u64,
        max_mib: u64,
    },
    /// The guest uses too much to give that much back: nothing was changed.
    #[error("Cannot shrink memory to {target_mib} MiB: the guest uses {used_mib} MiB of its {total_mib} MiB and needs {headroom_mib} MiB free beyond that; free memory in the guest first")]
    InUse {
        target_mib: u64,
        used_mib: u64,
        total_mib: u64,
        headroom_mib: u64,
    },
    /// A newer memory resize took over.
    #[error("Superseded by a newer memory resize (the latest target wins)")]
    Superseded,
    /// The sandbox's VM is not running.
    #[error("The sandbox is not running ({0})")]
    NotRunning(String),
    /// The VMM refused or could not be asked.
    #[error("The VMM refused the memory change")]
    Vmm(#[source] SetMemoryError),
    /// The host cgroup could not follow.
    #[error("Cannot set the sandbox's host memory limit")]
    HostCgroup(#[source] crate::host_cgroup::HostCgroupError),
    /// The agent could not be asked, or went away.
    #[error("Lost the guest agent while resizing memory to {target_mib} MiB ({state})")]
    Agent {
        target_mib: u64,
        state: String,
        #[source]
        source: AgentClientError,
    },
    /// The guest did not get there in time; the VM stays at what it reached.
    #[error("Timed out after {after:?} resizing memory to {target_mib} MiB; the VM stays at {reached_mib} MiB: {state}")]
    Timeout {
        target_mib: u64,
        reached_mib: u64,
        after: Duration,
        state: String,
    },
}

/// A successful memory resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOutcome {
    /// The guest's MemTotal once settled, bytes.
    pub guest_total: u64,
    /// The VMM's sizes once settled.
    pub memory: VmMemory,
    /// False for a no-op.
    pub changed: bool,
    /// Request → acknowledgement.
    pub latency: Duration,
}

/// A finished memory resize (target in bytes), for `accordion status`.
pub type MemoryRecord = super::Record<u64, MemoryOutcome>;

/// What the guest and the VMM show, for messages.
fn describe(memory: Option<VmMemory>, guest_total: Option<u64>, base: u64) -> String {
    let guest = match guest_total {
        Some(total) => format!(
            "the guest shows {} MiB above its boot MemTotal",
            total.saturating_sub(base) / MIB
        ),
        None => "the guest's MemTotal is unknown".into(),
    };
    match memory {
        Some(m) => format!(
            "{guest}; the VMM has {} of {} MiB plugged",
            m.plugged / MIB,
            m.requested / MIB
        ),
        None => format!("{guest}; the VMM does not answer"),
    }
}

/// Refuses a shrink to a MemTotal of `new_total` when the guest, which uses `total - available`
/// now, would have less than the headroom left.
fn check_room(
    target_mib: u64,
    total: u64,
    available: u64,
    new_total: u64,
) -> Result<(), MemoryResizeError> {
    let used = total.saturating_sub(available);
    if used.saturating_add(SHRINK_HEADROOM) > new_total {
        return Err(MemoryResizeError::InUse {
            target_mib,
            used_mib: used / MIB,
            total_mib: total / MIB,
            headroom_mib: SHRINK_HEADROOM / MIB,
        });
    }
    Ok(())
}

/// Whether the VMM has plugged exactly `requested` and the guest shows it.
fn settled(memory: &VmMemory, requested: u64, guest_total: u64, base: u64) -> bool {
    memory.requested == requested
        && memory.plugged == requested
        && guest_total == base.saturating_add(requested)
}

impl Resizer {
    /// The last finished memory resizes, oldest first.
    pub fn memory_history(&self) -> Vec<MemoryRecord> {
        self.memory_history.all()
    }

    /// Resizes `sandbox`'s guest memory to `target` bytes, waiting up to `timeout` for the
    /// guest's acknowledgement. Serialized with every other resize of the sandbox.
    pub async fn resize_memory(
        &self,
        sandbox: &Sandbox,
        target: u64,
        timeout: Duration,
    ) -> Result<MemoryOutcome, MemoryResizeError> {
        let (boot_mib, max_mib) = (sandbox.memory_mib(), sandbox.max_memory_mib());
        let Some(base) = sandbox.guest_base_total().filter(|_| max_mib > boot_mib) else {
            return Err(MemoryResizeError::Fixed { boot_mib });
        };
        if target < boot_mib * MIB || target > max_mib * MIB {
            return Err(MemoryResizeError::InvalidTarget {
                target_mib: target / MIB,
                boot_mib,
                max_mib,
            });
        }
        let ticket = self.memory_latest.fetch_add(1, Ordering::SeqCst) + 1;
        let started = Instant::now();
        let _running = self.running.lock().await;
        let current = sandbox.vm_memory().map_or(boot_mib * MIB, |m| m.target());
        let direction = super::stats::Direction::of(current, target);
        let result = self
            .apply_memory(sandbox, target, base, ticket, started + timeout, timeout)
            .await;
        if !matches!(result, Err(MemoryResizeError::Superseded)) {
            self.memory_history.push(target, &result, started);
            self.observe(super::stats::Kind::Memory, direction, &result, started);
        }
        result.map(|mut outcome| {
            outcome.latency = started.elapsed();
            outcome
        })
    }

    async fn apply_memory(
        &self,
        sandbox: &Sandbox,
        target: u64,
        base: u64,
        ticket: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<MemoryOutcome, MemoryResizeError> {
        let superseded = || self.memory_latest.load(Ordering::SeqCst) != ticket;
        if superseded() {
            return Err(MemoryResizeError::Superseded);
        }
        if let Some(reason) = sandbox.exit_reason() {
            return Err(MemoryResizeError::NotRunning(format!("{reason:?}")));
        }
        let target_mib = target / MIB;
        let agent_lost = |source, total: Option<u64>| MemoryResizeError::Agent {
            target_mib,
            state: describe(sandbox.vm_memory(), total, base),
            source,
        };
        // Watch first, so no change the guest makes after our request can be missed.
        let mut watch = sandbox
            .agent()
            .watch_memory()
            .await
            .map_err(|e| agent_lost(e, None))?;
        let (mut total, available) = match watch.next().await {
            Ok(Some(figures)) => (figures.total, figures.available),
            Ok(None) => {
                let message = "memory watch ended before its snapshot".into();
                return Err(agent_lost(AgentClientError::AgentGone { message }, None));
            }
            Err(e) => return Err(agent_lost(e, None)),
        };
        let before = sandbox
            .vm_memory()
            .ok_or_else(|| MemoryResizeError::NotRunning("the VMM does not answer".into()))?;
        let boot = before.boot;
        // The device rounds up to whole blocks; compare with what it will report.
        let requested = target - boot;
        if settled(&before, requested, total, base) {
            return Ok(MemoryOutcome {
                guest_total: total,
                memory: before,
                changed: false,
                latency: Duration::ZERO,
            });
        }
        let growing = target > before.target();
        if !growing {
            check_room(target_mib, total, available, base.saturating_add(requested))?;
        }
        if growing {
            // The host must have room before the guest touches the new memory.
            sandbox
                .set_host_memory(target)
                .map_err(MemoryResizeError::HostCgroup)?;
        }
        // Subscribed before the request, so no plug it causes can be missed.
        let mut changes = sandbox.vm_changes();
        let asked = sandbox.set_memory(target).map_err(MemoryResizeError::Vmm)?;
        let requested = asked.requested;
        let mut memory = asked;
        loop {
            if settled(&memory, requested, total, base) {
                if !growing {
                    sandbox
                        .set_host_memory(memory.current())
                        .map_err(MemoryResizeError::HostCgroup)?;
                }
                return Ok(MemoryOutcome {
                    guest_total: total,
                    memory,
                    changed: true,
                    latency: Duration::ZERO,
                });
            }
            tokio::select! {
                next = watch.next() => match next {
                    Ok(Some(figures)) => total = figures.total,
                    Ok(None) => {
                        let message = "the memory watch ended".into();
                        return Err(agent_lost(AgentClientError::AgentGone { message }, Some(total)));
                    }
                    Err(e) => return Err(agent_lost(e, Some(total))),
                },
                () = super::vmm_changed(&mut changes) => {}
                () = tokio::time::sleep_until(deadline.into()) => {
                    return Err(self.stop_where_it_got(sandbox, target_mib, base, total, timeout));
                }
            }
            if superseded() {
                return Err(MemoryResizeError::Superseded);
            }
            if let Some(reason) = sandbox.exit_reason() {
                return Err(MemoryResizeError::NotRunning(format!("{reason:?}")));
            }
            memory = sandbox
                .vm_memory()
                .ok_or_else(|| MemoryResizeError::NotRunning("the VMM does not answer".into()))?;
        }
    }

    /// After a timeout: asks the VMM for what is plugged now, so the guest stops plugging or
    /// unplugging and the VM stays at a size it really has; the host limit keeps covering it.
    fn stop_where_it_got(
        &self,
        sandbox: &Sandbox,
        target_mib: u64,
        base: u64,
        total: u64,
        after: Duration,
    ) -> MemoryResizeError {
        let now = sandbox.vm_memory();
        let reached = now.map_or(sandbox.memory_mib() * MIB, |m| m.current());
        if let Err(e) = sandbox.set_memory(reached) {
            log::warn!(
                "sandbox {}: cannot hold the memory at {} MiB: {}",
                sandbox.name(),
                reached / MIB,
                crate::error_chain(&e)
            );
        }
        MemoryResizeError::Timeout {
            target_mib,
            reached_mib: reached / MIB,
            after,
            state: describe(now, Some(total), base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(plugged: u64, requested: u64) -> VmMemory {
        VmMemory {
            boot: 256 * MIB,
            max: 2048 * MIB,
            plugged,
            requested,
        }
    }

    #[test]
    fn test_settled_needs_the_vmm_and_the_guest_to_agree() {
        let base = 200 * MIB;
        let m = memory(768 * MIB, 768 * MIB);
        assert!(settled(&m, 768 * MIB, base + 768 * MIB, base));
        assert!(
            !settled(&m, 768 * MIB, base + 640 * MIB, base),
            "guest behind"
        );
        assert!(!settled(
            &memory(640 * MIB, 768 * MIB),
            768 * MIB,
            base + 640 * MIB,
            base
        ));
        assert!(
            !settled(&m, 512 * MIB, base + 768 * MIB, base),
            "an older request"
        );
    }

    #[test]
    fn test_a_shrink_must_leave_the_headroom_above_what_the_guest_uses() {
        let (total, available) = (1000 * MIB, 300 * MIB);
        // Uses 700 MiB: 764 MiB is the least it may shrink to.
        assert!(check_room(764, total, available, 764 * MIB).is_ok());
        let err = check_room(763, total, available, 763 * MIB).unwrap_err();
        assert!(matches!(
            err,
            MemoryResizeError::InUse {
                used_mib: 700,
                total_mib: 1000,
                headroom_mib: 64,
                ..
            }
        ));
        assert!(err.to_string().contains("uses 700 MiB"), "{err}");
        // Figures that make no sense never underflow.
        assert!(check_room(10, 0, u64::MAX, 100 * MIB).is_ok());
    }

    #[test]
    fn test_describe_names_both_views() {
        let text = describe(
            Some(memory(512 * MIB, 768 * MIB)),
            Some(712 * MIB),
            200 * MIB,
        );
        assert_eq!(
            text,
            "the guest shows 512 MiB above its boot MemTotal; the VMM has 512 of 768 MiB plugged"
        );
        assert!(describe(None, None, 0).contains("does not answer"));
    }
}
