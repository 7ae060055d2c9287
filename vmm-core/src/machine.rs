//! Everything a running VM's threads share.

use std::sync::Arc;

use crate::bus::Bus;
use crate::device_manager::DeviceThread;
use crate::exit::{ExitLatch, ExitReason};
use crate::memory::GuestRam;
use crate::vcpu::Vcpus;

/// A running VM: its vCPUs, devices and KVM objects.
///
/// Field order is drop order: vCPU fds and devices go before the VM fd, guest RAM goes last (KVM's
/// memslot points into it).
pub(crate) struct Machine {
    /// Shared with the CPU hotplug controller on the bus.
    pub(crate) vcpus: Arc<Vcpus>,
    /// Stopped before the bus's devices go (it services them).
    pub(crate) _devices: DeviceThread,
    pub(crate) bus: Bus,
    /// Shared with [`crate::exit::ExitWatch`]es, which outlive nothing else of the machine.
    pub(crate) exit: Arc<ExitLatch>,
    pub(crate) _gic: kvm_ioctls::DeviceFd,
    pub(crate) _vm: kvm_ioctls::VmFd,
    pub(crate) _ram: GuestRam,
}

impl Machine {
    /// Records why the VM stops (first reason wins) and kicks every vCPU out of the guest.
    pub(crate) fn request_exit(&self, reason: ExitReason) {
        if self.exit.trip(reason) {
            self.vcpus.kick_all();
        }
    }
}
