//! KVM register IDs for the registers the VMM touches (ONE_REG API, Documentation/virt/kvm/api.rst).

/// KVM_REG_ARM64 | KVM_REG_SIZE_U64.
const ARM64_U64: u64 = 0x6030_0000_0000_0000;
/// KVM_REG_ARM_CORE: offsets into struct kvm_regs, in 32-bit words.
const CORE: u64 = 0x0010_0000;
/// KVM_REG_ARM64_SYSREG.
const SYSREG: u64 = 0x0013_0000;

/// General-purpose register xN (user_pt_regs.regs[n], 8 bytes each).
pub const fn x(n: u64) -> u64 {
    ARM64_U64 | CORE | (n * 8 / 4)
}

/// The program counter (user_pt_regs.pc, after 31 registers and sp).
pub const PC: u64 = ARM64_U64 | CORE | (32 * 8 / 4);

/// A system register by its encoding.
pub const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    ARM64_U64 | SYSREG | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

/// MPIDR_EL1 (S3_0_C0_C0_5).
pub const MPIDR_EL1: u64 = sysreg(3, 0, 0, 0, 5);

#[cfg(target_arch = "aarch64")]
pub use kvm::*;

#[cfg(target_arch = "aarch64")]
mod kvm {
    use kvm_ioctls::VcpuFd;

    /// Reads a 64-bit register.
    pub fn get(vcpu: &VcpuFd, id: u64) -> Result<u64, kvm_ioctls::Error> {
        let mut bytes = [0u8; 8];
        vcpu.get_one_reg(id, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes a 64-bit register.
    pub fn set(vcpu: &VcpuFd, id: u64, value: u64) -> Result<(), kvm_ioctls::Error> {
        vcpu.set_one_reg(id, &value.to_le_bytes()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_x0_id_matches_the_value_verified_in_the_node() {
        assert_eq!(x(0), 0x6030_0000_0010_0000);
    }

    #[test]
    fn test_pc_and_x3_ids() {
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(x(3), 0x6030_0000_0010_0006);
    }

    #[test]
    fn test_mpidr_el1_id() {
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
    }
}
