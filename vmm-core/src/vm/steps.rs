//! The steps of `Vm::start`, each named for what it builds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};

use super::{
    acpi_config, virtio_slots, VmError, FIRST_FS_SLOT, FIRST_NET_SLOT, MEM_SLOT, VSOCK_SLOT,
};
use crate::arch::aarch64::boot_block::{BootBlock, BootBlockSpec};
use crate::arch::aarch64::kernel::{self, BootPlacement, KernelFile};
use crate::arch::aarch64::{gic, layout, psci};
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::devices::boot_timer::{BootTime, BootTimer};
use crate::devices::cpu_hotplug::{CpuHotplug, CpuSlots};
use crate::devices::ged::Ged;
use crate::devices::serial::SerialDevice as Uart;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mem::{Mem, MemoryControl};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::exit::{ExitLatch, ExitReason};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::Vcpus;

/// Connects to each virtiofsd, which must already listen, or takes the connection the caller
/// made: a missing or unresponsive one fails here, before KVM is touched.
pub(super) fn connect_virtiofsd(config: &mut VmConfig) -> Result<Vec<Fs>, VmError> {
    config
        .fs
        .iter_mut()
        .map(|fs| {
            match fs.stream.take() {
                Some(stream) => Fs::from_stream(&fs.tag, stream, &fs.socket_path),
                None => Fs::connect(&fs.tag, &fs.socket_path),
            }
            .map_err(|source| VmError::Fs {
                tag: fs.tag.clone(),
                source,
            })
        })
        .collect()
}

/// Guest RAM (memfd-backed) with the kernel at its base and the initrd above it, and the
/// virtio-mem region (nothing in it yet) when memory can grow.
pub(super) fn load_guest_ram(
    config: &VmConfig,
    kernel: &KernelFile,
    placement: &BootPlacement,
) -> Result<GuestRam, VmError> {
    let ram = GuestRam::with_hotplug(
        layout::RAM_BASE,
        config.memory_bytes(),
        config.hotplug_region(),
    )?;
    kernel::load_kernel(&ram, &config.kernel, kernel, placement)?;
    if let Some(initrd) = &config.initrd {
        kernel::load_initrd(&ram, initrd, placement)?;
    }
    Ok(ram)
}

/// The VM and its memslots: boot RAM, and the virtio-mem region when there is one.
pub(super) fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create the VM", e))?;
    let host_addr = ram
        .host_address()
        .ok_or(VmError::Memory(MemoryError::TooLarge(ram.size())))?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: ram.base(),
        memory_size: ram.size(),
        userspace_addr: host_addr,
    };
    // SAFETY: the region is RAM mapped by `ram`, which the Machine keeps alive for as long as
    // the VM fd (it is dropped after it), and nothing else is mapped at those guest addresses.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| VmError::Kvm("map guest RAM", e))?;
    if let Some(hotplug) = ram.hotplug() {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: hotplug.base,
            memory_size: hotplug.size,
            userspace_addr: hotplug.host_address,
        };
        // SAFETY: as above; the region is `ram`'s second mapping, disjoint from boot RAM.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("map the virtio-mem region", e))?;
    }
    Ok(vm)
}

/// The GICv3 sized for every possible vCPU (KVM accepts no vCPU after VGIC init, so they exist
/// already), then the SMCCC filter so CPU_ON/CPU_OFF reach the VMM before any KVM_RUN.
pub(super) fn create_interrupt_controller(
    vm: &VmFd,
    max_vcpus: u32,
) -> Result<kvm_ioctls::DeviceFd, VmError> {
    let gic = gic::create_vgic(vm, max_vcpus)?;
    psci::forward_to_vmm(vm)
        .map_err(|e| VmError::Kvm("forward PSCI CPU_ON/CPU_OFF (SMCCC filter)", e))?;
    Ok(gic)
}

/// The firmware-less boot block at the top of RAM: EFI system table and memory map, stub DTB,
/// ACPI tables describing every possible vCPU.
pub(super) fn write_boot_block(
    config: &VmConfig,
    ram: &GuestRam,
    placement: &BootPlacement,
    mpidrs: &[u64],
) -> Result<BootBlock, VmError> {
    let acpi = acpi_config(mpidrs, config.boot_vcpus, &virtio_slots(config));
    // The guest init finds the boot timer through the command line (guest/ initramfs).
    let mut cmdline = format!(
        "{} accordion.boot_timer={:#x}",
        config.cmdline,
        layout::BOOT_TIMER_BASE
    );
    // Memory virtio-mem plugs goes to ZONE_MOVABLE, so the guest can empty it and unplug it.
    if ram.hotplug().is_some() {
        cmdline.push_str(" memhp_default_state=online_movable");
    }
    let block = BootBlock::build(&BootBlockSpec {
        ram_base: ram.base(),
        ram_end: ram.end(),
        cmdline: &cmdline,
        initrd: placement.initrd.map(|(start, size)| (start, start + size)),
        acpi: &acpi,
        has_its: false,
    })?;
    debug_assert_eq!(block.base, placement.boot_block);
    ram.write(block.base, &block.bytes)?;
    Ok(block)
}

/// The console UART, the boot timer, the GED and the CPU hotplug controller (which shares the
/// vCPU table). Returns the hotplug controller, which `Vm::set_vcpus` drives.
pub(super) fn attach_platform_devices(
    devices: &mut DeviceManager,
    config: &mut VmConfig,
    vcpus: &Arc<Vcpus>,
    started: Instant,
    boot_time: &BootTime,
) -> Result<Arc<Mutex<CpuHotplug>>, VmError> {
    let console = std::mem::replace(&mut config.console, Box::new(std::io::sink()));
    let uart = Uart::new(devices.irq_line(layout::SERIAL_SPI)?, console);
    devices.attach_mmio("serial", layout::SERIAL_BASE, Arc::new(Mutex::new(uart)))?;
    let timer = BootTimer::new(started, boot_time.clone());
    devices.attach_mmio(
        "boot-timer",
        layout::BOOT_TIMER_BASE,
        Arc::new(Mutex::new(timer)),
    )?;
    let ged = Arc::new(Mutex::new(Ged::new(devices.irq_line(layout::GED_SPI)?)));
    devices.attach_mmio("ged", layout::GED_BASE, ged.clone())?;
    let slots: Arc<dyn CpuSlots> = vcpus.clone();
    let hotplug = Arc::new(Mutex::new(CpuHotplug::new(slots, ged, config.boot_vcpus)));
    devices.attach_mmio("cpu-hotplug", layout::CPU_HOTPLUG_BASE, hotplug.clone())?;
    Ok(hotplug)
}

/// virtio-vsock, then the virtio-fs devices (kicks go straight from KVM to virtiofsd), then the
/// NICs, then virtio-mem over `ram`'s region, each in its slot (the slots ACPI described:
/// `virtio_slots`). Returns virtio-mem's control, which `Vm::set_memory` drives.
pub(super) fn attach_virtio_devices(
    devices: &mut DeviceManager,
    config: &mut VmConfig,
    fs_devices: Vec<Fs>,
    ram: &GuestRam,
) -> Result<Option<MemoryControl>, VmError> {
    if let Some(vsock) = &mut config.vsock {
        let device = match vsock.listener.take() {
            Some(listener) => Vsock::from_listener(vsock.cid, &vsock.uds_path, listener)?,
            None => Vsock::new(vsock.cid, &vsock.uds_path)?,
        };
        devices.attach_virtio("virtio-vsock", VSOCK_SLOT, Box::new(device))?;
    }
    for (device, slot) in fs_devices.into_iter().zip(FIRST_FS_SLOT..) {
        devices.attach_virtio("virtio-fs", slot, Box::new(device))?;
    }
    for (net, slot) in std::mem::take(&mut config.net)
        .into_iter()
        .zip(FIRST_NET_SLOT..)
    {
        let device = Net::new(net.tap, net.mac, net.mtu).map_err(VmError::Net)?;
        devices.attach_virtio("virtio-net", slot, Box::new(device))?;
    }
    let Some(region) = ram.hotplug() else {
        return Ok(None);
    };
    let device = Mem::new(region.base, region.size, region.memfd.clone()).map_err(VmError::Mem)?;
    let control = device.control();
    devices.attach_virtio("virtio-mem", MEM_SLOT, Box::new(device))?;
    Ok(Some(control))
}

/// What the device manager's thread does should it fail: stop the VM, saying why.
pub(super) fn stop_on_device_failure(
    exit: &Arc<ExitLatch>,
    vcpus: &Arc<Vcpus>,
) -> impl Fn(String) + Send + Sync + 'static {
    let (exit, vcpus) = (exit.clone(), vcpus.clone());
    move |error| {
        if exit.trip(ExitReason::DevicesFailed { error }) {
            vcpus.kick_all();
        }
    }
}
