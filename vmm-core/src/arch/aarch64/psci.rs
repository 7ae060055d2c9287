//! PSCI calls the VMM handles itself (forwarded by KVM's SMCCC filter), and the policy for them.
//!
//! KVM keeps handling every other PSCI call (VERSION, FEATURES, AFFINITY_INFO, SYSTEM_OFF, ...).

/// PSCI CPU_OFF (only an SMC32 variant exists).
pub const CPU_OFF: u32 = 0x8400_0002;
/// PSCI CPU_ON, SMC32 calling convention (32-bit guests).
pub const CPU_ON_32: u32 = 0x8400_0003;
/// PSCI CPU_ON, SMC64 calling convention (what arm64 Linux uses).
pub const CPU_ON_64: u32 = 0xc400_0003;

/// Function ID ranges the VMM asks KVM to forward: (base, count).
pub const FORWARDED_RANGES: [(u32, u32); 2] = [(CPU_OFF, 2), (CPU_ON_64, 1)];

/// PSCI return codes (written to x0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum PsciReturn {
    /// SUCCESS.
    Success = 0,
    /// NOT_SUPPORTED.
    NotSupported = -1,
    /// INVALID_PARAMETERS.
    InvalidParameters = -2,
    /// DENIED: Linux 6.11+ skips a CPU that answers this, silently.
    Denied = -3,
    /// ALREADY_ON.
    AlreadyOn = -4,
    /// ON_PENDING.
    OnPending = -5,
    /// INTERNAL_FAILURE.
    InternalFailure = -6,
}

impl PsciReturn {
    /// The value as the guest's x0 register holds it.
    pub fn as_x0(self) -> u64 {
        self as i64 as u64
    }
}

/// A forwarded call, decoded from the function ID and x1..x3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciCall {
    /// Start the CPU whose MPIDR is `target` at `entry` with x0 = `context_id`.
    CpuOn {
        /// Target MPIDR (affinity fields).
        target: u64,
        /// Physical entry address.
        entry: u64,
        /// Value for the new CPU's x0.
        context_id: u64,
    },
    /// Power down the calling CPU.
    CpuOff,
    /// Something the filter should not have forwarded.
    Unknown(u64),
}

impl PsciCall {
    /// Decodes function `nr` with arguments x1..x3.
    pub fn decode(nr: u64, x1: u64, x2: u64, x3: u64) -> Self {
        let low32 = |v: u64| v & 0xffff_ffff;
        match u32::try_from(nr) {
            Ok(CPU_ON_64) => Self::CpuOn {
                target: x1,
                entry: x2,
                context_id: x3,
            },
            Ok(CPU_ON_32) => Self::CpuOn {
                target: low32(x1),
                entry: low32(x2),
                context_id: low32(x3),
            },
            Ok(CPU_OFF) => Self::CpuOff,
            _ => Self::Unknown(nr),
        }
    }
}

/// Where a vCPU stands, as far as CPU_ON is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Not plugged: the guest may know it is possible, but must not run it.
    Unplugged,
    /// Plugged and powered off: may be started.
    Off,
    /// Already running.
    On,
}

/// What to do about a CPU_ON for a target in `state`: `None` means start it, otherwise answer
/// with the given error.
pub fn cpu_on_refusal(state: Option<TargetState>) -> Option<PsciReturn> {
    match state {
        // An MPIDR that names no vCPU at all.
        None => Some(PsciReturn::InvalidParameters),
        Some(TargetState::Unplugged) => Some(PsciReturn::Denied),
        Some(TargetState::On) => Some(PsciReturn::AlreadyOn),
        Some(TargetState::Off) => None,
    }
}

/// Asks KVM to forward CPU_ON and CPU_OFF to the VMM (as `KVM_EXIT_HYPERCALL`). Must run before
/// the first KVM_RUN of any vCPU; needs host Linux 6.4+.
#[cfg(target_arch = "aarch64")]
pub fn forward_to_vmm(vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
    use kvm_bindings::{
        kvm_device_attr, kvm_smccc_filter, kvm_smccc_filter_action_KVM_SMCCC_FILTER_FWD_TO_USER,
        KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER,
    };
    for (base, nr_functions) in FORWARDED_RANGES {
        let filter = kvm_smccc_filter {
            base,
            nr_functions,
            action: kvm_smccc_filter_action_KVM_SMCCC_FILTER_FWD_TO_USER as u8,
            pad: [0; 15],
        };
        // KVM copies the filter during the ioctl; `filter` outlives it.
        let attr = kvm_device_attr {
            group: KVM_ARM_VM_SMCCC_CTRL,
            attr: u64::from(KVM_ARM_VM_SMCCC_FILTER),
            addr: &filter as *const kvm_smccc_filter as u64,
            flags: 0,
        };
        vm.set_device_attr(&attr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decode_cpu_on_64_keeps_full_registers() {
        let call = PsciCall::decode(0xc400_0003, 0x100, 0x4020_0000_1234, 7);
        assert_eq!(
            call,
            PsciCall::CpuOn {
                target: 0x100,
                entry: 0x4020_0000_1234,
                context_id: 7
            }
        );
    }

    #[test]
    fn test_decode_cpu_on_32_truncates_arguments() {
        let call = PsciCall::decode(0x8400_0003, 0xffff_0000_0000_0001, 0x1_4000_0000, 0);
        assert_eq!(
            call,
            PsciCall::CpuOn {
                target: 1,
                entry: 0x4000_0000,
                context_id: 0
            }
        );
    }

    #[test]
    fn test_decode_cpu_off_and_unknown() {
        assert_eq!(PsciCall::decode(0x8400_0002, 0, 0, 0), PsciCall::CpuOff);
        assert_eq!(
            PsciCall::decode(0x8400_0008, 0, 0, 0),
            PsciCall::Unknown(0x8400_0008)
        );
    }

    #[test]
    fn test_cpu_on_of_unplugged_vcpu_is_denied() {
        assert_eq!(
            cpu_on_refusal(Some(TargetState::Unplugged)),
            Some(PsciReturn::Denied)
        );
        assert_eq!(PsciReturn::Denied.as_x0(), (-3i64) as u64);
    }

    #[test]
    fn test_cpu_on_of_plugged_off_vcpu_is_granted() {
        assert_eq!(cpu_on_refusal(Some(TargetState::Off)), None);
    }

    #[test]
    fn test_cpu_on_of_running_or_unknown_vcpu_is_refused() {
        assert_eq!(
            cpu_on_refusal(Some(TargetState::On)),
            Some(PsciReturn::AlreadyOn)
        );
        assert_eq!(cpu_on_refusal(None), Some(PsciReturn::InvalidParameters));
    }

    #[test]
    fn test_forwarded_ranges_cover_cpu_on_and_cpu_off() {
        let covered = |f: u32| {
            FORWARDED_RANGES
                .iter()
                .any(|&(b, n)| (b..b + n).contains(&f))
        };
        assert!(covered(CPU_ON_64) && covered(CPU_ON_32) && covered(CPU_OFF));
        assert!(!covered(0x8400_0008), "SYSTEM_OFF stays with KVM");
    }
}
