//! The in-kernel GICv3 (VGIC): a distributor and ONE redistributor region sized for every
//! possible vCPU. KVM refuses vCPUs created after the VGIC is initialised, so this runs after all
//! of them exist and "possible" is fixed from then on.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::layout::{GICD_BASE, GICR_BASE, GIC_NR_IRQS};

/// Errors from setting up the VGIC, one per step.
#[derive(Debug, thiserror::Error)]
pub enum GicError {
    /// KVM_CREATE_DEVICE failed.
    #[error("Cannot create the in-kernel GICv3")]
    Create(#[source] kvm_ioctls::Error),
    /// A KVM_SET_DEVICE_ATTR step failed.
    #[error("Cannot set the GICv3 {0}")]
    Attr(&'static str, #[source] kvm_ioctls::Error),
}

/// Encodes KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION: count in bits 63:52, base in 51:16, index 11:0.
pub fn redist_region_attr(base: u64, count: u32, index: u32) -> u64 {
    (u64::from(count) << 52) | (base & 0x000f_ffff_ffff_0000) | u64::from(index & 0xfff)
}

fn set_attr(
    gic: &DeviceFd,
    what: &'static str,
    group: u32,
    attr: u32,
    addr: u64,
) -> Result<(), GicError> {
    let attr = kvm_device_attr {
        group,
        attr: u64::from(attr),
        addr,
        flags: 0,
    };
    gic.set_device_attr(&attr)
        .map_err(|e| GicError::Attr(what, e))
}

/// Creates and initialises the VGIC for `vcpus` possible vCPUs. Call after every vCPU exists.
pub fn create_vgic(vm: &VmFd, vcpus: u32) -> Result<DeviceFd, GicError> {
    let mut device = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut device).map_err(GicError::Create)?;

    let dist = GICD_BASE;
    let redist = redist_region_attr(GICR_BASE, vcpus, 0);
    let nr_irqs: u32 = GIC_NR_IRQS;
    // KVM reads these values through the pointers during each ioctl; the locals outlive them.
    set_attr(
        &gic,
        "distributor address",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_DIST,
        &dist as *const u64 as u64,
    )?;
    set_attr(
        &gic,
        "redistributor region",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION,
        &redist as *const u64 as u64,
    )?;
    set_attr(
        &gic,
        "number of IRQs",
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        &nr_irqs as *const u32 as u64,
    )?;
    set_attr(
        &gic,
        "initialisation",
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT,
        0,
    )?;
    Ok(gic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_redist_region_attr_packs_count_base_and_index() {
        assert_eq!(
            redist_region_attr(0x0810_0000, 128, 0),
            (128u64 << 52) | 0x0810_0000
        );
    }
}
