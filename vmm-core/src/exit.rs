//! Why a VM stopped, and the latch that records it once for every thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Why the VM stopped. Serializable: a jailed VMM reports it to the runtime as JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitReason {
    /// The guest powered off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest asked for a reset (PSCI SYSTEM_RESET; also `panic=-1` after a panic).
    Reset,
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    Crash,
    /// The host asked the VM to stop (`Vm::shutdown` or drop).
    Shutdown,
    /// A vCPU hit something the VMM cannot handle.
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        error: String,
    },
    /// The device manager's thread failed: devices could no longer be started.
    DevicesFailed {
        /// What happened.
        error: String,
    },
    /// The VMM process (a jailed VMM run by the runtime) ended without saying why: it was killed
    /// or crashed; `status` says how (e.g. "killed by SIGKILL").
    ProcessEnded {
        /// How the process ended.
        status: String,
    },
}

/// KVM_SYSTEM_EVENT_* codes.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

impl ExitReason {
    /// Maps a KVM system event of `kind` raised by vCPU `vcpu`.
    pub fn from_system_event(vcpu: usize, kind: u32) -> Self {
        match kind {
            SYSTEM_EVENT_SHUTDOWN => Self::PowerOff,
            SYSTEM_EVENT_RESET => Self::Reset,
            SYSTEM_EVENT_CRASH => Self::Crash,
            other => Self::VcpuFailed {
                vcpu,
                error: format!("unknown system event {other}"),
            },
        }
    }
}

/// Records the first exit reason and wakes whoever waits for it.
#[derive(Debug, Default)]
pub struct ExitLatch {
    set: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
}

impl ExitLatch {
    /// Records `reason` unless one is already recorded; returns whether this call recorded it.
    pub fn trip(&self, reason: ExitReason) -> bool {
        let mut guard = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() {
            return false;
        }
        *guard = Some(reason);
        self.set.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        true
    }

    /// Whether a reason is recorded (cheap; vCPU threads check it before every KVM_RUN).
    pub fn is_tripped(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Blocks until a reason is recorded.
    pub fn wait(&self) -> ExitReason {
        let mut guard = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(reason) = guard.as_ref() {
                return reason.clone();
            }
            guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits up to `timeout` for a reason.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let guard = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .cond
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }
}

/// A read-only handle on a VM's exit: waits for it without holding the VM (a death watch on its
/// own thread), and cannot stop the VM itself.
#[derive(Debug, Clone)]
pub struct ExitWatch(Arc<ExitLatch>);

impl ExitWatch {
    /// A watch on `latch`: `Vm::exit_watch` makes one for its VM, and a caller that learns of the
    /// exit some other way (a jailed VMM's report, its death) for a latch it trips itself.
    pub fn new(latch: Arc<ExitLatch>) -> Self {
        Self(latch)
    }

    /// Blocks until the VM stops; says why.
    pub fn wait(&self) -> ExitReason {
        self.0.wait()
    }

    /// Waits up to `timeout` for the VM to stop.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.0.wait_timeout(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn test_first_reason_wins() {
        let latch = ExitLatch::default();
        assert!(latch.trip(ExitReason::PowerOff));
        assert!(!latch.trip(ExitReason::Shutdown));
        assert_eq!(latch.wait(), ExitReason::PowerOff);
    }

    #[test]
    fn test_wait_wakes_when_another_thread_trips() {
        let latch = Arc::new(ExitLatch::default());
        let tripper = latch.clone();
        let t = std::thread::spawn(move || tripper.trip(ExitReason::Reset));
        assert_eq!(latch.wait(), ExitReason::Reset);
        assert!(t.join().unwrap());
    }

    #[test]
    fn test_wait_timeout_without_reason_is_none() {
        let latch = ExitLatch::default();
        assert_eq!(latch.wait_timeout(Duration::from_millis(10)), None);
        assert!(!latch.is_tripped());
    }

    #[test]
    fn test_system_events_map_to_reasons() {
        assert_eq!(ExitReason::from_system_event(0, 1), ExitReason::PowerOff);
        assert_eq!(ExitReason::from_system_event(0, 2), ExitReason::Reset);
        assert!(matches!(
            ExitReason::from_system_event(3, 9),
            ExitReason::VcpuFailed { vcpu: 3, .. }
        ));
    }

    #[test]
    fn test_exit_reasons_round_trip_through_json() {
        for reason in [
            ExitReason::PowerOff,
            ExitReason::VcpuFailed {
                vcpu: 2,
                error: "unknown exit".into(),
            },
            ExitReason::ProcessEnded {
                status: "killed by SIGKILL".into(),
            },
        ] {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(serde_json::from_str::<ExitReason>(&json).unwrap(), reason);
        }
    }

    #[test]
    fn test_exit_watch_sees_the_reason_recorded_after_it_was_taken() {
        let latch = Arc::new(ExitLatch::default());
        let watch = ExitWatch::new(Arc::clone(&latch));
        let waiter = std::thread::spawn(move || watch.wait());
        latch.trip(ExitReason::Reset);
        assert_eq!(waiter.join().unwrap(), ExitReason::Reset);
    }
}
