//! Where each possible vCPU stands.

use crate::arch::aarch64::psci::TargetState;

/// One possible vCPU's state, as `Vm::vcpu_states` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    fn test_psci_target_maps_plugged_to_off() {
        assert_eq!(VcpuState::Plugged.psci_target(), TargetState::Off);
        assert_eq!(VcpuState::Unplugged.psci_target(), TargetState::Unplugged);
    }
}
