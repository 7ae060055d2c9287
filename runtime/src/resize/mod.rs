//! Resizing a sandbox's vCPUs: the one code path behind `accordion resize` (and, with the resize
//! controller, containerd's task Update); its memory in [`memory`], serialized with it.
//!
//! A resize is acknowledged, never assumed: it plugs or unplugs through the VMM's ACPI hotplug and
//! returns only when the guest agent's CPU watch reports exactly CPUs `0..target` online and the
//! VMM has every other vCPU unplugged (ejected by the guest). Resizes of one sandbox are
//! serialized; a newer request supersedes one still waiting or in flight (the latest target
//! wins); asking for what the sandbox already has is a no-op.

pub mod memory;
pub mod policy;
pub mod stats;

use crate::vmm_process::channel::SetVcpusRefusal;
use crate::vmm_process::SetVcpusError;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use accordion_vmm::VcpuState;

use crate::agent_client::{format_cpulist, AgentClientError, CpuEventKind};
use crate::sandbox::Sandbox;

/// How many finished resizes `accordion status` shows.
const HISTORY: usize = 8;
/// How often the VMM's state is re-read while waiting, once it can no longer say when it changes
/// (its channel closed: the resize ends at the next check).
const VMM_POLL: Duration = Duration::from_millis(5);

/// Waits until the VMM reports a change (a vCPU's state, the memory; `changes`), or, without a
/// way to know (stopped, channel closed), for [`VMM_POLL`].
pub(crate) async fn vmm_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = changes {
        if rx.changed().await.is_ok() {
            return;
        }
        *changes = None;
    }
    tokio::time::sleep(VMM_POLL).await;
}

/// Why a resize failed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// 0 or more than the possible vCPUs: nothing was changed.
    #[error("Invalid vCPU count {target}: must be 1 to {max} (the sandbox's max vCPUs)")]
    InvalidTarget { target: u32, max: u32 },
    /// A newer resize took over.
    #[error("Superseded by a newer resize (the latest target wins)")]
    Superseded,
    /// The sandbox's VM is not running.
    #[error("The sandbox is not running ({0})")]
    NotRunning(String),
    /// The VMM refused the change.
    #[error("The VMM refused the change")]
    Vmm(#[source] crate::vmm_process::SetVcpusError),
    /// The agent could not be asked, or went away while we waited.
    #[error("Lost the guest agent while resizing to {target} ({state})")]
    Agent {
        target: u32,
        state: String,
        #[source]
        source: AgentClientError,
    },
    /// The guest reported a CPU it could not bring online.
    #[error("The guest could not online CPU {cpu} while resizing to {target}: {error} ({state})")]
    OnlineFailed {
        target: u32,
        cpu: u32,
        error: String,
        state: String,
    },
    /// The guest did not get there in time.
    #[error("Timed out after {after:?} resizing to {target}: {state}")]
    Timeout {
        target: u32,
        after: Duration,
        state: String,
    },
}

/// A successful resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeOutcome {
    /// The guest's online CPUs, as a cpulist.
    pub guest_online: String,
    /// False for a no-op.
    pub changed: bool,
    /// Request → acknowledgement.
    pub latency: Duration,
}

/// A finished resize, for `accordion status`: its target (vCPUs, or memory bytes) and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<T, O> {
    pub target: T,
    pub result: Result<O, String>,
    pub latency: Duration,
    pub finished: SystemTime,
}

/// A finished vCPU resize.
pub type ResizeRecord = Record<u32, ResizeOutcome>;

/// The last [`HISTORY`] finished resizes of one kind, oldest first.
#[derive(Debug)]
struct History<T, O>(Mutex<VecDeque<Record<T, O>>>);

impl<T, O> Default for History<T, O> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T: Clone, O: Clone> History<T, O> {
    fn all(&self) -> Vec<Record<T, O>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    fn push<E: std::error::Error>(&self, target: T, result: &Result<O, E>, started: Instant) {
        let mut history = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(Record {
            target,
            result: match result {
                Ok(outcome) => Ok(outcome.clone()),
                Err(e) => Err(crate::error_chain(e)),
            },
            latency: started.elapsed(),
            finished: SystemTime::now(),
        });
    }
}

/// Per-sandbox resize state: serialization, supersession and history.
#[derive(Debug, Default)]
pub struct Resizer {
    /// Held by the resize that is applying its target.
    running: tokio::sync::Mutex<()>,
    /// Bumped by every request; a request whose number is no longer the latest gives up.
    latest: AtomicU64,
    history: History<u32, ResizeOutcome>,
    /// The same for memory resizes (a CPU resize does not supersede a memory one).
    memory_latest: AtomicU64,
    memory_history: History<u64, memory::MemoryOutcome>,
    /// Every finished resize (CPU and memory), for `accordion metrics`.
    stats: stats::ResizeStats,
}

impl Resizer {
    /// The last finished resizes, oldest first.
    pub fn history(&self) -> Vec<ResizeRecord> {
        self.history.all()
    }

    /// Every finished resize since the sandbox started, as histograms.
    pub fn stats(&self) -> Vec<(stats::Key, stats::Histogram)> {
        self.stats.snapshot()
    }

    /// Counts a finished resize (superseded ones are not: another request took over).
    fn observe<O, E>(
        &self,
        kind: stats::Kind,
        direction: stats::Direction,
        result: &Result<O, E>,
        started: Instant,
    ) {
        let outcome = match result {
            Ok(_) => stats::Outcome::Ok,
            Err(_) => stats::Outcome::Error,
        };
        self.stats
            .observe((kind, direction, outcome), started.elapsed());
    }

    /// Resizes `sandbox` to `target` vCPUs, waiting up to `timeout` for the guest's
    /// acknowledgement.
    pub async fn resize(
        &self,
        sandbox: &Sandbox,
        target: u32,
        timeout: Duration,
    ) -> Result<ResizeOutcome, ResizeError> {
        let max = sandbox.max_vcpus();
        if target == 0 || target > max {
            return Err(ResizeError::InvalidTarget { target, max });
        }
        let ticket = self.latest.fetch_add(1, Ordering::SeqCst) + 1;
        let started = Instant::now();
        let _running = self.running.lock().await;
        let plugged = sandbox
            .vcpu_states()
            .iter()
            .filter(|s| **s != VcpuState::Unplugged)
            .count();
        let direction =
            stats::Direction::of(plugged, usize::try_from(target).unwrap_or(usize::MAX));
        let result = self
            .apply(sandbox, target, ticket, started + timeout, timeout)
            .await;
        if !matches!(result, Err(ResizeError::Superseded)) {
            self.history.push(target, &result, started);
            self.observe(stats::Kind::Vcpus, direction, &result, started);
        }
        result.map(|mut outcome| {
            outcome.latency = started.elapsed();
            outcome
        })
    }

    fn superseded(&self, ticket: u64) -> bool {
        self.latest.load(Ordering::SeqCst) != ticket
    }

    async fn apply(
        &self,
        sandbox: &Sandbox,
        target: u32,
        ticket: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<ResizeOutcome, ResizeError> {
        if self.superseded(ticket) {
            return Err(ResizeError::Superseded);
        }
        if let Some(reason) = sandbox.exit_reason() {
            return Err(ResizeError::NotRunning(format!("{reason:?}")));
        }
        let agent_lost = |source, online: &[u32]| ResizeError::Agent {
            target,
            state: describe(online, &sandbox.vcpu_states()),
            source,
        };
        // Watch first, so no change the guest makes after our request can be missed.
        let mut watch = sandbox
            .agent()
            .watch_cpus()
            .await
            .map_err(|e| agent_lost(e, &[]))?;
        let mut online = match watch.next().await {
            Ok(Some(snapshot)) => snapshot.online,
            Ok(None) => {
                return Err(agent_lost(
                    AgentClientError::AgentGone {
                        message: "CPU watch ended before its snapshot".into(),
                    },
                    &[],
                ))
            }
            Err(e) => return Err(agent_lost(e, &[])),
        };
        if settled(target, &online, &sandbox.vcpu_states()) {
            return Ok(ResizeOutcome {
                guest_online: format_cpulist(&online),
                changed: false,
                latency: Duration::ZERO,
            });
        }
        // Subscribed before the request, so no change it causes can be missed.
        let mut changes = sandbox.vm_changes();
        sandbox.set_vcpus(target).map_err(|e| match e {
            SetVcpusError::Refused(SetVcpusRefusal::InvalidTarget { target, max }) => {
                ResizeError::InvalidTarget { target, max }
            }
            other => ResizeError::Vmm(other),
        })?;
        loop {
            tokio::select! {
                event = watch.next() => match event {
                    Ok(Some(event)) => {
                        online = event.online;
                        if event.kind == CpuEventKind::OnlineFailed {
                            if let Some(cpu) = event.cpu.filter(|&c| c < target) {
                                return Err(ResizeError::OnlineFailed {
                                    target,
                                    cpu,
                                    error: event.error.unwrap_or_default(),
                                    state: describe(&online, &sandbox.vcpu_states()),
                                });
                            }
                        }
                    }
                    Ok(None) => {
                        return Err(agent_lost(
                            AgentClientError::AgentGone {
                                message: "the CPU watch ended".into(),
                            },
                            &online,
                        ))
                    }
                    Err(e) => return Err(agent_lost(e, &online)),
                },
                () = vmm_changed(&mut changes) => {}
                () = tokio::time::sleep_until(deadline.into()) => {
                    return Err(ResizeError::Timeout {
                        target,
                        after: timeout,
                        state: describe(&online, &sandbox.vcpu_states()),
                    });
                }
            }
            if self.superseded(ticket) {
                return Err(ResizeError::Superseded);
            }
            if let Some(reason) = sandbox.exit_reason() {
                return Err(ResizeError::NotRunning(format!("{reason:?}")));
            }
            if settled(target, &online, &sandbox.vcpu_states()) {
                return Ok(ResizeOutcome {
                    guest_online: format_cpulist(&online),
                    changed: true,
                    latency: Duration::ZERO,
                });
            }
        }
    }
}

/// Whether the guest reports exactly CPUs `0..target` online and the VMM agrees: those vCPUs
/// running, every other one unplugged (a removed CPU must be ejected before it can come back).
fn settled(target: u32, online: &[u32], states: &[VcpuState]) -> bool {
    let want: Vec<u32> = (0..target).collect();
    online == want.as_slice()
        && states.iter().zip(0u32..).all(|(state, i)| {
            if i < target {
                *state == VcpuState::Online
            } else {
                *state == VcpuState::Unplugged
            }
        })
}

/// What the guest and the VMM show, for error messages.
fn describe(online: &[u32], states: &[VcpuState]) -> String {
    let indices = |f: fn(&VcpuState) -> bool| -> Vec<u32> {
        states
            .iter()
            .zip(0u32..)
            .filter(|(s, _)| f(s))
            .map(|(_, i)| i)
            .collect()
    };
    let list = |v: &[u32]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            format_cpulist(v)
        }
    };
    format!(
        "guest reports CPUs {} online; VMM has vCPUs {} plugged, {} running",
        list(online),
        list(&indices(|s| *s != VcpuState::Unplugged)),
        list(&indices(|s| *s == VcpuState::Online)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuState::{Online, Plugged, Unplugged};

    #[test]
    fn test_settled_needs_guest_and_vmm_to_agree() {
        let states = [Online, Online, Unplugged, Unplugged];
        assert!(settled(2, &[0, 1], &states));
        assert!(!settled(2, &[0], &states), "guest has not onlined cpu1");
        assert!(!settled(
            2,
            &[0, 1],
            &[Online, Plugged, Unplugged, Unplugged]
        ));
        assert!(
            !settled(1, &[0], &[Online, Plugged, Unplugged, Unplugged]),
            "cpu1 offline but not yet ejected"
        );
        assert!(!settled(
            3,
            &[0, 1, 3],
            &[Online, Online, Unplugged, Online]
        ));
    }

    #[test]
    fn test_describe_names_both_views() {
        let text = describe(&[0, 1], &[Online, Online, Plugged, Unplugged]);
        assert_eq!(
            text,
            "guest reports CPUs 0-1 online; VMM has vCPUs 0-2 plugged, 0-1 running"
        );
        assert!(describe(&[], &[]).contains("CPUs none online"));
    }
}
