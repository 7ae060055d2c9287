//! Where each possible vCPU stands.

use crate::arch::aarch64::psci::TargetState;

/// One possible vCPU's state, as `Vm::vcpu_states` reports it (serializable: it crosses the
/// jailed VMM's process boundary as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VcpuState {
    /// Possible but not plugged: ACPI says present, not enabled; CPU_ON is denied; no thread.
    Unplugged,
    /// Plugged (enabled) but not running: the guest has not turned it on, or turned it off.
    Plugged,
    /// Running in its own thread.
    Online,
}

impl VcpuState {
    /// What a PSCI CPU_ON aimed at this vCPU finds.
    pub fn psci_target(self) -> TargetState {
        match self {
            Self::Unplugged => TargetState::Unplugged,
            Self::Plugged => TargetState::Off,
            Self::Online => TargetState::On,
        }
    }

    /// What a PSCI CPU_ON finds when the guest may not yet know the vCPU: a Plugged vCPU whose
    /// `_STA` the guest has not read as enabled is treated as unplugged (Linux sends CPU_ON to
    /// every Online Capable CPU at boot, before evaluating any `_STA`).
    pub fn psci_target_for_guest(self, seen_enabled: bool) -> TargetState {
        match self {
            Self::Plugged if !seen_enabled => TargetState::Unplugged,
            other => other.psci_target(),
        }
    }

    /// The state of vCPU `index` right after boot, before the guest turns secondaries on.
    pub fn at_boot(index: u32, boot_vcpus: u32) -> Self {
        match index {
            0 => Self::Online,
            i if i < boot_vcpus => Self::Plugged,
            _ => Self::Unplugged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_at_boot_only_vcpu0_runs_the_other_boot_vcpus_wait_for_cpu_on() {
        let states: Vec<VcpuState> = (0..4).map(|i| VcpuState::at_boot(i, 2)).collect();
        assert_eq!(
            states,
            [
                VcpuState::Online,
                VcpuState::Plugged,
                VcpuState::Unplugged,
                VcpuState::Unplugged
            ]
        );
    }

    #[test]
    fn test_plugged_vcpu_the_guest_has_not_seen_is_a_denied_target() {
        assert_eq!(
            VcpuState::Plugged.psci_target_for_guest(false),
            TargetState::Unplugged
        );
        assert_eq!(
            VcpuState::Plugged.psci_target_for_guest(true),
            TargetState::Off
        );
        assert_eq!(
            VcpuState::Online.psci_target_for_guest(false),
            TargetState::On
        );
    }

    #[test]
    fn test_psci_target_maps_plugged_to_off() {
        assert_eq!(VcpuState::Plugged.psci_target(), TargetState::Off);
        assert_eq!(VcpuState::Unplugged.psci_target(), TargetState::Unplugged);
    }
}
