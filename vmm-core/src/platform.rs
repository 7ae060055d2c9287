//! What the host's KVM offers Accordion, probed without building a guest.
//!
//! Used by `accordion check`, the installer's refusal of unsuitable hosts, and the node's platform
//! test. A probe never panics: each missing piece is a named error or a `false` in the report.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version Linux has ever shipped; anything else means the fd is not a usable KVM
/// (e.g. qemu-user forwarding an x86 `/dev/kvm` to an aarch64 process answers -1).
const KVM_API_VERSION: i32 = 12;

/// Possible vCPUs Accordion must be able to create in one VM (tested at 128 in the node).
pub const REQUIRED_MAX_VCPUS: usize = 128;

/// Errors from probing the host's KVM.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("Cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm answers API version {0}, not {KVM_API_VERSION}: not a usable KVM for this architecture")]
    ApiVersion(i32),
    #[error("Cannot create a VM")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// The host capabilities Accordion depends on, and how long probing them took.
#[derive(Debug, Clone)]
pub struct PlatformReport {
    pub api_version: i32,
    /// KVM_CAP_ARM_PSCI_0_2: guests get PSCI 0.2 (CPU_ON/CPU_OFF/SYSTEM_OFF).
    pub psci_0_2: bool,
    /// KVM_CAP_NR_VCPUS: the recommended vCPU count (usually the host's CPUs).
    pub nr_vcpus: usize,
    /// KVM_CAP_MAX_VCPUS: the hard limit of vCPUs per VM.
    pub max_vcpus: usize,
    /// KVM_CAP_ARM_VM_IPA_SIZE: guest physical address bits (0 = fixed 40 bits).
    pub ipa_bits: u32,
    /// An in-kernel GICv3 can be created.
    pub vgic_v3: bool,
    /// KVM_ARM_VM_SMCCC_CTRL/KVM_ARM_VM_SMCCC_FILTER: PSCI calls can be forwarded to the VMM
    /// (host kernel >= 6.4). Without it an unplugged vCPU cannot be kept from coming up.
    pub smccc_filter: bool,
    /// Named steps of the probe and their wall time.
    pub timings: Vec<(&'static str, Duration)>,
}

impl PlatformReport {
    /// What is missing for Accordion's vCPU hotplug, in words; empty when the host is suitable.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if !self.psci_0_2 {
            missing.push("KVM_CAP_ARM_PSCI_0_2".to_string());
        }
        if self.max_vcpus < REQUIRED_MAX_VCPUS {
            missing.push(format!(
                "KVM_CAP_MAX_VCPUS >= {REQUIRED_MAX_VCPUS} (host allows {})",
                self.max_vcpus
            ));
        }
        if !self.vgic_v3 {
            missing.push("in-kernel GICv3 (KVM_DEV_TYPE_ARM_VGIC_V3)".to_string());
        }
        if !self.smccc_filter {
            missing.push("SMCCC filter (KVM_ARM_VM_SMCCC_CTRL, host kernel >= 6.4)".to_string());
        }
        missing
    }
}

/// Opens `/dev/kvm` and checks that it is a working KVM, not just an openable file.
pub fn open_kvm() -> Result<Kvm, PlatformError> {
    open_kvm_from(None)
}

/// Like `open_kvm`, but with `/dev/kvm` already open when `file` is given (a jailed VMM cannot
/// open it; its parent passes it, read-write and O_CLOEXEC). It is checked the same way.
pub fn open_kvm_from(file: Option<File>) -> Result<Kvm, PlatformError> {
    let kvm = match file {
        // SAFETY: `into_raw_fd` hands over a valid fd that nothing else owns, so `Kvm` may own and
        // close it; an fd that is not /dev/kvm only makes the ioctls below fail.
        Some(file) => unsafe { Kvm::from_raw_fd(file.into_raw_fd()) },
        None => Kvm::new().map_err(PlatformError::Open)?,
    };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(PlatformError::ApiVersion(version));
    }
    Ok(kvm)
}

/// Probes the host's KVM for everything Accordion needs.
pub fn probe() -> Result<PlatformReport, PlatformError> {
    let mut timings = Vec::new();
    let t = Instant::now();
    let kvm = open_kvm()?;
    timings.push(("open /dev/kvm", t.elapsed()));

    let t = Instant::now();
    let vm = kvm.create_vm().map_err(PlatformError::CreateVm)?;
    timings.push(("create VM", t.elapsed()));

    let t = Instant::now();
    let (vgic_v3, smccc_filter) = arch::probe_vm(&vm);
    timings.push(("probe VGICv3 and SMCCC filter", t.elapsed()));

    Ok(PlatformReport {
        api_version: kvm.get_api_version(),
        psci_0_2: kvm.check_extension(Cap::ArmPsci02),
        nr_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        ipa_bits: u32::try_from(kvm.check_extension_int(Cap::ArmVmIPASize)).unwrap_or(0),
        vgic_v3,
        smccc_filter,
        timings,
    })
}

/// Whether tests that need KVM must fail (rather than skip) when it is missing: CI sets
/// `ACCORDION_REQUIRE_KVM=1` so a node without KVM can never pass silently.
pub fn kvm_required() -> bool {
    std::env::var("ACCORDION_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

#[cfg(target_arch = "aarch64")]
mod arch {
    use kvm_bindings::{
        kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER,
    };
    use kvm_ioctls::VmFd;

    pub(super) fn probe_vm(vm: &VmFd) -> (bool, bool) {
        // A real (uninitialised) device in this scratch VM, not KVM_CREATE_DEVICE_TEST: in test mode
        // KVM returns no fd and kvm-ioctls would wrap (and later close) fd 0.
        let mut gic = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let vgic_v3 = vm.create_device(&mut gic).is_ok();
        let filter = kvm_device_attr {
            group: KVM_ARM_VM_SMCCC_CTRL,
            attr: u64::from(KVM_ARM_VM_SMCCC_FILTER),
            addr: 0,
            flags: 0,
        };
        let smccc_filter = vm.has_device_attr(&filter).is_ok();
        (vgic_v3, smccc_filter)
    }
}

#[cfg(not(target_arch = "aarch64"))]
mod arch {
    use kvm_ioctls::VmFd;

    /// Only the ARM64 backend exists; other hosts have neither piece.
    pub(super) fn probe_vm(_vm: &VmFd) -> (bool, bool) {
        (false, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> PlatformReport {
        PlatformReport {
            api_version: 12,
            psci_0_2: true,
            nr_vcpus: 2,
            max_vcpus: 512,
            ipa_bits: 48,
            vgic_v3: true,
            smccc_filter: true,
            timings: Vec::new(),
        }
    }

    #[test]
    fn test_open_kvm_from_a_file_that_is_not_kvm_is_refused() {
        let not_kvm = File::open("/dev/null").unwrap();
        let result = open_kvm_from(Some(not_kvm));
        assert!(matches!(result, Err(PlatformError::ApiVersion(-1))));
    }

    #[test]
    fn test_missing_suitable_host_is_empty() {
        assert!(report().missing().is_empty());
    }

    #[test]
    fn test_missing_names_each_absent_piece() {
        let r = PlatformReport {
            psci_0_2: false,
            max_vcpus: 64,
            vgic_v3: false,
            smccc_filter: false,
            ..report()
        };
        let missing = r.missing().join("; ");
        assert!(missing.contains("PSCI_0_2"), "{missing}");
        assert!(
            missing.contains("MAX_VCPUS >= 128 (host allows 64)"),
            "{missing}"
        );
        assert!(missing.contains("GICv3"), "{missing}");
        assert!(missing.contains("SMCCC filter"), "{missing}");
    }
}
