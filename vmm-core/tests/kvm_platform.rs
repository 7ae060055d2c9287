//! The KVM platform Accordion is built on, checked for real: runs in the emulated ARM64 node (or on an
//! ARM64 host with /dev/kvm). Under `ACCORDION_REQUIRE_KVM=1` a missing piece fails; it never skips.
#![cfg(target_arch = "aarch64")]

use accordion_vmm::platform::{self, PlatformReport, REQUIRED_MAX_VCPUS};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init,
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const GICD_BASE: u64 = 0x0800_0000;
const GICR_BASE: u64 = 0x080A_0000;
const GICR_STRIDE: u64 = 0x2_0000;
const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: usize = 0x10_0000;
/// Unbacked guest-physical address the test program stores to; above the GIC, below RAM.
const MMIO_PROBE: u64 = 0x1000_0000;
const SPIS: u32 = 96;

// Core register ids: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset in kvm_regs / 4).
const REG_X0: u64 = 0x6030_0000_0010_0000;
const REG_X1: u64 = REG_X0 + 2;
const REG_PC: u64 = REG_X0 + 0x40;

/// Returns the KVM handle, or `None` when the test may skip (no KVM and not required).
fn kvm_or_skip() -> Option<Kvm> {
    match platform::open_kvm() {
        Ok(kvm) => Some(kvm),
        Err(e) if platform::kvm_required() => {
            panic!("ACCORDION_REQUIRE_KVM=1 but KVM is unusable: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipping: KVM unusable here ({e}); set ACCORDION_REQUIRE_KVM=1 to fail instead"
            );
            None
        }
    }
}

fn probe_or_skip() -> Option<PlatformReport> {
    kvm_or_skip()?;
    Some(platform::probe().expect("probe after a successful open"))
}

#[test]
fn test_platform_has_psci_0_2() {
    let Some(report) = probe_or_skip() else {
        return;
    };
    assert!(report.psci_0_2, "KVM_CAP_ARM_PSCI_0_2 missing: {report:?}");
}

#[test]
fn test_platform_allows_128_vcpus() {
    let Some(report) = probe_or_skip() else {
        return;
    };
    assert!(
        report.max_vcpus >= REQUIRED_MAX_VCPUS,
        "KVM_CAP_MAX_VCPUS is {}",
        report.max_vcpus
    );
}

#[test]
fn test_platform_supports_smccc_filter() {
    let Some(report) = probe_or_skip() else {
        return;
    };
    assert!(
        report.smccc_filter,
        "KVM_ARM_VM_SMCCC_CTRL/FILTER unsupported: {report:?}"
    );
}

fn create_vcpus(vm: &VmFd, n: u64) -> Vec<VcpuFd> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi).expect("preferred target");
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    (0..n)
        .map(|id| {
            let vcpu = vm
                .create_vcpu(id)
                .unwrap_or_else(|e| panic!("create vCPU {id}: {e}"));
            let mut init = kvi;
            if id > 0 {
                init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
            }
            vcpu.vcpu_init(&init)
                .unwrap_or_else(|e| panic!("init vCPU {id}: {e}"));
            vcpu
        })
        .collect()
}

fn set_gic_attr(gic: &kvm_ioctls::DeviceFd, group: u32, attr: u64, addr: u64) {
    let a = kvm_device_attr {
        group,
        attr,
        addr,
        flags: 0,
    };
    gic.set_device_attr(&a)
        .unwrap_or_else(|e| panic!("VGIC attr group {group} attr {attr}: {e}"));
}

/// One distributor and ONE redistributor region covering every possible vCPU, initialised after all
/// vCPUs exist (KVM refuses vCPUs after VGIC init, so "possible" is fixed here).
fn init_vgic_v3(vm: &VmFd, vcpus: u64) -> kvm_ioctls::DeviceFd {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut dev).expect("create VGICv3");
    let dist = GICD_BASE;
    let redist = GICR_BASE;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
        &dist as *const u64 as u64,
    );
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
        &redist as *const u64 as u64,
    );
    let nr_irqs: u32 = 32 + SPIS;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        &nr_irqs as *const u32 as u64,
    );
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
    );
    assert!(
        GICR_BASE + vcpus * GICR_STRIDE <= MMIO_PROBE,
        "redistributors overlap the probe"
    );
    gic
}

#[test]
fn test_vm_with_128_vcpus_and_vgic_v3_initializes() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = kvm.create_vm().expect("create VM");
    let vcpus = create_vcpus(&vm, REQUIRED_MAX_VCPUS as u64);
    let _gic = init_vgic_v3(&vm, REQUIRED_MAX_VCPUS as u64);
    assert_eq!(vcpus.len(), REQUIRED_MAX_VCPUS);
    // KVM fixes the vCPU set at VGIC init: one more must be refused.
    assert!(
        vm.create_vcpu(REQUIRED_MAX_VCPUS as u64).is_err(),
        "vCPU accepted after VGIC init"
    );
}

#[test]
fn test_vcpu_runs_to_mmio_exit_at_expected_address() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = kvm.create_vm().expect("create VM");

    // `str x1, [x0]` then `b .`: one store to an unbacked address must exit to us.
    let code: [u32; 2] = [0xF900_0001, 0x1400_0000];
    let mut ram = vec![0u8; RAM_SIZE];
    for (i, insn) in code.iter().enumerate() {
        ram[i * 4..i * 4 + 4].copy_from_slice(&insn.to_le_bytes());
    }
    // SAFETY: anonymous private mapping of RAM_SIZE bytes; checked for MAP_FAILED below and kept
    // mapped (leaked) for the life of the test process, so KVM never sees a dangling host address.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED, "mmap guest RAM");
    // SAFETY: `host` is a fresh writable mapping of RAM_SIZE bytes and `ram` has the same length.
    unsafe { std::ptr::copy_nonoverlapping(ram.as_ptr(), host.cast::<u8>(), RAM_SIZE) };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM_BASE,
        memory_size: RAM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region points at a live mapping of exactly memory_size bytes that outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("memslot");

    let mut vcpus = create_vcpus(&vm, 1);
    let _gic = init_vgic_v3(&vm, 1);
    let vcpu = &mut vcpus[0];
    vcpu.set_one_reg(REG_PC, &RAM_BASE.to_le_bytes())
        .expect("set PC");
    vcpu.set_one_reg(REG_X0, &MMIO_PROBE.to_le_bytes())
        .expect("set X0");
    vcpu.set_one_reg(REG_X1, &0xACC0_4D10_u64.to_le_bytes())
        .expect("set X1");

    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::MmioWrite(addr, data) => {
            assert_eq!(addr, MMIO_PROBE);
            assert_eq!(data, &0xACC0_4D10_u64.to_le_bytes());
        }
        other => panic!("expected an MMIO write exit, got {other:?}"),
    }
}
