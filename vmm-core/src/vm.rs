//! `Vm::start`: how an Accordion microVM is built, in the order of docs/architecture.md's boot steps.

#[cfg(target_arch = "aarch64")]
use std::sync::Arc;
use std::time::Duration;

use crate::acpi::{
    AcpiConfig, AcpiError, AcpiTables, CpuDesc, GicDesc, HotplugDesc, SerialDevice,
    VirtioMmioDevice,
};
use crate::arch::aarch64::boot_block::BootBlockError;
use crate::arch::aarch64::kernel::{self, BootPlacement, KernelError, KernelFile};
use crate::arch::aarch64::layout;
use crate::config::{ConfigError, VmConfig, FIRST_FS_SLOT, FIRST_NET_SLOT, MEM_SLOT};
use crate::devices::boot_timer::BootTime;
use crate::devices::cpu_hotplug::{CpuHotplugError, HotplugRequest};
use crate::exit::ExitReason;
use crate::memory::MemoryError;
use crate::platform::PlatformError;
use crate::vcpu::{VcpuError, VcpuEvent, VcpuState};

#[cfg(target_arch = "aarch64")]
mod steps;

#[cfg(target_arch = "aarch64")]
/// How long `shutdown` waits for vCPU threads before leaving them behind.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from starting a VM. Everything up to `Kvm` is detected before any VM exists.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("Invalid VM configuration")]
    Config(#[from] ConfigError),
    /// The kernel or initrd is unusable or does not fit.
    #[error("Cannot use the kernel or initrd")]
    Kernel(#[from] KernelError),
    /// The vsock device could not be created.
    #[error("Cannot create the vsock device")]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// A virtio-fs device could not reach its virtiofsd.
    #[error("Cannot set up virtio-fs device {tag:?}")]
    Fs {
        /// The device's tag.
        tag: String,
        /// Cause (names the socket).
        #[source]
        source: crate::devices::virtio::fs::FsError,
    },
    /// A virtio-net device could not be created.
    #[error("Cannot create a network interface")]
    Net(#[source] crate::devices::virtio::net::NetError),
    /// The virtio-mem device could not be created.
    #[error("Cannot create the memory resize device")]
    Mem(#[source] crate::devices::virtio::mem::MemError),
    /// This host architecture has no backend.
    #[error("Accordion VMs run only on aarch64 hosts")]
    UnsupportedArch,
    /// /dev/kvm is missing or unusable.
    #[error("KVM is not usable")]
    Platform(#[from] PlatformError),
    /// Guest RAM could not be set up.
    #[error("Cannot set up guest RAM")]
    Memory(#[from] MemoryError),
    /// A KVM VM-level step failed.
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// vCPU creation or start failed.
    #[error("Cannot set up vCPUs")]
    Vcpu(#[from] VcpuError),
    /// The interrupt controller could not be set up.
    #[cfg(target_arch = "aarch64")]
    #[error("Cannot set up the interrupt controller")]
    Gic(#[from] crate::arch::aarch64::gic::GicError),
    /// The boot block (EFI, DTB, ACPI) could not be built.
    #[error("Cannot build the firmware tables")]
    BootBlock(#[from] BootBlockError),
    /// A device could not be attached, or the device manager not started.
    #[cfg(target_arch = "aarch64")]
    #[error("Cannot set up the devices")]
    Devices(#[from] crate::device_manager::DeviceManagerError),
}

/// The MPIDR KVM gives vCPU `index` (Aff0 = low 4 bits, Aff1 and Aff2 above; bit 31 RES1).
pub fn kvm_default_mpidr(index: u32) -> u64 {
    let id = u64::from(index);
    (1 << 31) | (id & 0xf) | (((id >> 4) & 0xff) << 8) | (((id >> 12) & 0xff) << 16)
}

/// Everything checkable without KVM: settings, the kernel's Image header, and where the kernel,
/// initrd and boot block go in RAM.
fn preflight(config: &VmConfig) -> Result<(KernelFile, BootPlacement), VmError> {
    config.validate()?;
    let kernel = KernelFile::inspect(&config.kernel)?;
    let initrd_size = config
        .initrd
        .as_ref()
        .map(kernel::initrd_size)
        .transpose()?;
    let placement = kernel::place(
        layout::RAM_BASE,
        config.memory_bytes(),
        &kernel,
        initrd_size,
    )?;
    Ok((kernel, placement))
}

/// Refuses more possible vCPUs than KVM_CAP_MAX_VCPUS allows.
pub fn check_kvm_vcpu_limit(max_vcpus: u32, kvm_limit: usize) -> Result<(), ConfigError> {
    if max_vcpus as usize > kvm_limit {
        return Err(ConfigError::MaxAboveKvm {
            max: max_vcpus,
            kvm: kvm_limit,
        });
    }
    Ok(())
}

/// virtio-mmio slot of the vsock device.
pub const VSOCK_SLOT: u32 = 0;

/// The virtio-mmio slots a configuration uses: vsock's, one per virtio-fs device, one per NIC,
/// virtio-mem's when memory can grow.
// Only Vm::start (aarch64) uses it outside tests.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
fn virtio_slots(config: &VmConfig) -> Vec<u32> {
    let vsock = config.vsock.iter().map(|_| VSOCK_SLOT);
    vsock
        .chain((FIRST_FS_SLOT..).take(config.fs.len()))
        .chain((FIRST_NET_SLOT..).take(config.net.len()))
        .chain(config.hotplug_region().map(|_| MEM_SLOT))
        .collect()
}

/// A VM's memory: what it booted with, the most it may have, and where a resize stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmMemory {
    /// Boot RAM in bytes.
    pub boot: u64,
    /// The most guest RAM in bytes (boot RAM + the virtio-mem region).
    pub max: u64,
    /// Bytes the guest has plugged above boot RAM.
    pub plugged: u64,
    /// Bytes the host asked the guest to plug above boot RAM.
    pub requested: u64,
}

impl VmMemory {
    /// Guest RAM now: boot RAM + what is plugged.
    pub fn current(&self) -> u64 {
        self.boot + self.plugged
    }

    /// Guest RAM asked for: boot RAM + the requested size.
    pub fn target(&self) -> u64 {
        self.boot + self.requested
    }
}

/// Errors from asking for a memory size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum MemoryResizeError {
    /// The VM was started without max_memory above its boot memory.
    #[error(
        "this VM's memory cannot change: it was started without max_memory above its {boot} bytes"
    )]
    Fixed {
        /// Boot RAM in bytes.
        boot: u64,
    },
    /// Less than boot RAM: that memory never goes away.
    #[error("{target} bytes is below the VM's boot memory of {boot} bytes")]
    BelowBoot {
        /// Bytes asked for.
        target: u64,
        /// Boot RAM in bytes.
        boot: u64,
    },
    /// More than max_memory.
    #[error("{target} bytes is above the VM's max_memory of {max} bytes")]
    AboveMax {
        /// Bytes asked for.
        target: u64,
        /// The maximum in bytes.
        max: u64,
    },
}

/// A memory size asked for; [`MemoryRequest::wait`] waits until the guest has plugged or
/// unplugged its way there.
#[derive(Debug)]
pub struct MemoryRequest {
    control: crate::devices::virtio::mem::MemoryControl,
    boot: u64,
    /// Guest RAM asked for in bytes (rounded up to whole 2 MiB blocks).
    pub target: u64,
}

impl MemoryRequest {
    /// Waits until the guest's plugged memory matches the request (or a later one), at most
    /// `timeout`; on timeout the error is how far it got.
    pub fn wait(&self, timeout: Duration) -> Result<VmMemory, VmMemory> {
        let to_memory = |s: crate::devices::virtio::mem::MemorySnapshot| VmMemory {
            boot: self.boot,
            max: self.boot + s.region_size,
            plugged: s.plugged,
            requested: s.requested,
        };
        self.control
            .wait_plugged(timeout)
            .map(to_memory)
            .map_err(to_memory)
    }
}

/// Checks a memory target against a VM's boot and maximum memory; returns the bytes to request
/// from virtio-mem.
fn memory_request(
    target: u64,
    boot: u64,
    control: Option<&crate::devices::virtio::mem::MemoryControl>,
) -> Result<u64, MemoryResizeError> {
    let Some(control) = control else {
        return Err(MemoryResizeError::Fixed { boot });
    };
    let max = boot + control.snapshot().region_size;
    if target < boot {
        return Err(MemoryResizeError::BelowBoot { target, boot });
    }
    if target > max {
        return Err(MemoryResizeError::AboveMax { target, max });
    }
    Ok(target - boot)
}
/// Register window of a virtio-mmio transport (registers + config space) as ACPI describes it.
const VIRTIO_MMIO_WINDOW: u32 = 0x200;

/// The virtio-mmio transport in `slot`, as the DSDT describes it.
fn virtio_mmio_desc(slot: u32) -> Option<VirtioMmioDevice> {
    Some(VirtioMmioDevice {
        slot,
        base: layout::virtio_mmio_base(slot)?,
        size: VIRTIO_MMIO_WINDOW,
        gsi: layout::spi_intid(layout::virtio_mmio_spi(slot)?),
    })
}

/// What ACPI describes for a VM with these vCPUs and virtio slots.
fn acpi_config(mpidrs: &[u64], boot_vcpus: u32, virtio_slots: &[u32]) -> AcpiConfig {
    let possible = mpidrs.len() as u32;
    AcpiConfig {
        cpus: mpidrs
            .iter()
            .zip(0u32..)
            .map(|(&mpidr, uid)| CpuDesc {
                uid,
                mpidr,
                plugged: uid < boot_vcpus,
            })
            .collect(),
        gic: GicDesc {
            gicd_base: layout::GICD_BASE,
            gicr_base: layout::GICR_BASE,
            gicr_size: layout::gicr_size(possible) as u32,
        },
        serial: SerialDevice {
            base: layout::SERIAL_BASE,
            size: layout::DEVICE_SIZE as u32,
            gsi: layout::spi_intid(layout::SERIAL_SPI),
        },
        virtio: virtio_slots
            .iter()
            .filter_map(|&s| virtio_mmio_desc(s))
            .collect(),
        hotplug: HotplugDesc {
            controller_base: layout::CPU_HOTPLUG_BASE,
            ged_base: layout::GED_BASE,
            ged_gsi: layout::spi_intid(layout::GED_SPI),
        },
    }
}

/// The ACPI tables a VM with `boot_vcpus` of `max_vcpus` gets (MPIDRs as KVM assigns them), for
/// inspection without KVM (`accordion acpi-dump`).
pub fn acpi_tables(boot_vcpus: u32, max_vcpus: u32) -> Result<AcpiTables, AcpiError> {
    let mpidrs: Vec<u64> = (0..max_vcpus).map(kvm_default_mpidr).collect();
    AcpiTables::build(&acpi_config(&mpidrs, boot_vcpus, &[]), 0)
}

/// Wall time of each step of `Vm::start`, for the log.
#[cfg(target_arch = "aarch64")]
struct StepTimes {
    last: std::time::Instant,
    steps: Vec<(&'static str, Duration)>,
}

#[cfg(target_arch = "aarch64")]
impl StepTimes {
    fn new(start: std::time::Instant) -> Self {
        Self {
            last: start,
            steps: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }
}

#[cfg(target_arch = "aarch64")]
impl std::fmt::Display for StepTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: Duration = self.steps.iter().map(|(_, d)| *d).sum();
        write!(f, "{:.1} ms", total.as_secs_f64() * 1e3)?;
        for (step, d) in &self.steps {
            write!(f, "; {step} {:.1}", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// A running microVM. Dropping it shuts it down.
pub struct Vm {
    #[cfg(target_arch = "aarch64")]
    machine: Arc<crate::machine::Machine>,
    #[cfg(not(target_arch = "aarch64"))]
    never: std::convert::Infallible,
    #[cfg(target_arch = "aarch64")]
    hotplug: Arc<std::sync::Mutex<crate::devices::cpu_hotplug::CpuHotplug>>,
    /// virtio-mem's control, when memory can grow.
    memory: Option<crate::devices::virtio::mem::MemoryControl>,
    /// Boot RAM in bytes.
    boot_memory: u64,
    boot_time: BootTime,
    acpi: AcpiTables,
}

#[cfg(target_arch = "aarch64")]
impl Vm {
    /// Builds and starts a VM: the boot vCPU runs the kernel when this returns. Each step is a
    /// function of `steps` (vm/steps.rs), in the order of docs/architecture.md's boot sequence.
    pub fn start(mut config: VmConfig) -> Result<Vm, VmError> {
        use crate::device_manager::DeviceManager;
        use crate::exit::ExitLatch;
        use crate::machine::Machine;
        use crate::vcpu::{self, Vcpus};

        let started = std::time::Instant::now();
        let mut times = StepTimes::new(started);
        // Bad input stops in the first two steps, before any KVM object exists.
        let (kernel, placement) = preflight(&config)?;
        times.mark("checks");
        let fs_devices = steps::connect_virtiofsd(&mut config)?;
        times.mark("vhost-user");
        let kvm = crate::platform::open_kvm_from(config.kvm.take())?;
        check_kvm_vcpu_limit(config.max_vcpus, kvm.get_max_vcpus())?;
        let ram = steps::load_guest_ram(&config, &kernel, &placement)?;
        times.mark("guest RAM");
        let vm = steps::create_vm(&kvm, &ram)?;
        let (created, reset_init) = vcpu::create_all(&vm, config.max_vcpus)?;
        let mpidrs: Vec<u64> = created.iter().map(|(_, mpidr)| *mpidr).collect();
        times.mark("VM + vCPUs");
        let gic = steps::create_interrupt_controller(&vm, config.max_vcpus)?;
        times.mark("VGIC + SMCCC filter");
        let block = steps::write_boot_block(&config, &ram, &placement, &mpidrs)?;
        times.mark("boot block");

        let vcpus = Arc::new(Vcpus::new(created, config.boot_vcpus, reset_init));
        let exit = Arc::new(ExitLatch::default());
        let boot_time = BootTime::default();
        let mut devices = DeviceManager::new(&vm, ram.memory().clone())?;
        let hotplug =
            steps::attach_platform_devices(&mut devices, &mut config, &vcpus, started, &boot_time)?;
        let memory = steps::attach_virtio_devices(&mut devices, &mut config, fs_devices, &ram)?;
        let (bus, device_thread) = devices.start(steps::stop_on_device_failure(&exit, &vcpus))?;
        times.mark("devices");

        // The guest turns the other plugged vCPUs on with PSCI CPU_ON, which spawns their threads.
        let machine = Arc::new(Machine {
            vcpus,
            _devices: device_thread,
            bus,
            exit,
            _gic: gic,
            _vm: vm,
            _ram: ram,
        });
        machine
            .vcpus
            .start_boot_vcpu(&machine, placement.kernel_load, block.dtb_addr)?;
        times.mark("boot vCPU");
        log::info!("VM started: {times}");
        Ok(Vm {
            machine,
            hotplug,
            memory,
            boot_memory: config.memory_bytes(),
            boot_time,
            acpi: block.acpi,
        })
    }

    /// Blocks until the VM stops, joins its vCPU threads and says why it stopped.
    pub fn wait(&self) -> ExitReason {
        let reason = self.machine.exit.wait();
        self.machine.vcpus.join_all(JOIN_TIMEOUT);
        reason
    }

    /// Like `wait`, giving up after `timeout` (then the VM keeps running).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.machine.exit.wait_timeout(timeout)?;
        self.machine.vcpus.join_all(JOIN_TIMEOUT);
        Some(reason)
    }

    /// Stops the VM (if the guest has not already) and joins its vCPU threads.
    pub fn shutdown(&self) -> ExitReason {
        self.machine.request_exit(ExitReason::Shutdown);
        self.wait()
    }

    /// A handle that waits for the VM to stop without holding it (for a death watch).
    pub fn exit_watch(&self) -> crate::exit::ExitWatch {
        crate::exit::ExitWatch::new(Arc::clone(&self.machine.exit))
    }

    /// State of every possible vCPU, by index.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.machine.vcpus.states()
    }

    /// MPIDR of every possible vCPU, by index.
    pub fn vcpu_mpidrs(&self) -> Vec<u64> {
        self.machine.vcpus.mpidrs().to_vec()
    }

    /// Asks for `target` plugged vCPUs (1 to max_vcpus): plugs the lowest-numbered unplugged
    /// vCPUs, asks the guest to remove the highest-numbered plugged ones (never vCPU 0), withdraws
    /// what an earlier target started and this one no longer wants, and raises the GED. Returns
    /// without waiting for the guest: plugged vCPUs become Online when the guest turns them on
    /// (PSCI CPU_ON), removed ones Unplugged when it ejects them (`subscribe_vcpu_events`).
    /// An invalid target changes nothing.
    pub fn set_vcpus(&self, target: u32) -> Result<HotplugRequest, CpuHotplugError> {
        let request = self
            .hotplug
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_target(target)?;
        log::info!("vCPU target {target}: {request:?}");
        Ok(request)
    }

    /// Every vCPU state change from now on (Unplugged → Plugged → Online and back), in order per
    /// vCPU. Any number of subscribers; dropping the receiver unsubscribes.
    pub fn subscribe_vcpu_events(&self) -> std::sync::mpsc::Receiver<VcpuEvent> {
        self.machine.vcpus.subscribe()
    }
}

#[cfg(not(target_arch = "aarch64"))]
impl Vm {
    /// Validates the request, then reports that this host has no backend.
    pub fn start(config: VmConfig) -> Result<Vm, VmError> {
        preflight(&config)?;
        Err(VmError::UnsupportedArch)
    }

    /// Blocks until the VM stops.
    pub fn wait(&self) -> ExitReason {
        match self.never {}
    }

    /// Like `wait`, giving up after `timeout`.
    pub fn wait_timeout(&self, _timeout: Duration) -> Option<ExitReason> {
        match self.never {}
    }

    /// Stops the VM.
    pub fn shutdown(&self) -> ExitReason {
        match self.never {}
    }

    /// A handle that waits for the VM to stop.
    pub fn exit_watch(&self) -> crate::exit::ExitWatch {
        match self.never {}
    }

    /// State of every possible vCPU.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        match self.never {}
    }

    /// MPIDR of every possible vCPU.
    pub fn vcpu_mpidrs(&self) -> Vec<u64> {
        match self.never {}
    }

    /// Asks for `target` plugged vCPUs.
    pub fn set_vcpus(&self, _target: u32) -> Result<HotplugRequest, CpuHotplugError> {
        match self.never {}
    }

    /// Every vCPU state change from now on.
    pub fn subscribe_vcpu_events(&self) -> std::sync::mpsc::Receiver<VcpuEvent> {
        match self.never {}
    }
}

impl Vm {
    /// Asks for `target` bytes of guest RAM (boot RAM up to max_memory, rounded up to whole
    /// 2 MiB blocks): sets virtio-mem's requested size and interrupts the guest, whose driver
    /// plugs or unplugs blocks to get there. Returns without waiting ([`MemoryRequest::wait`]).
    /// An invalid target changes nothing.
    pub fn set_memory(&self, target: u64) -> Result<MemoryRequest, MemoryResizeError> {
        let requested = memory_request(target, self.boot_memory, self.memory.as_ref())?;
        let Some(control) = self.memory.clone() else {
            return Err(MemoryResizeError::Fixed {
                boot: self.boot_memory,
            });
        };
        let requested =
            control
                .set_requested(requested)
                .map_err(|_| MemoryResizeError::AboveMax {
                    target,
                    max: self.boot_memory + control.snapshot().region_size,
                })?;
        log::info!("memory target {target} bytes: {requested} bytes above boot RAM");
        Ok(MemoryRequest {
            control,
            boot: self.boot_memory,
            target: self.boot_memory + requested,
        })
    }

    /// Waits up to `timeout` for the plugged or requested memory to differ from `seen`; returns
    /// the memory then (as `seen` on timeout). A VM without max_memory answers at once.
    pub fn wait_memory_change(&self, seen: &VmMemory, timeout: Duration) -> VmMemory {
        let Some(control) = &self.memory else {
            return self.memory();
        };
        let seen = crate::devices::virtio::mem::MemorySnapshot {
            plugged: seen.plugged,
            requested: seen.requested,
            ..control.snapshot()
        };
        let s = control.wait_changed(&seen, timeout);
        VmMemory {
            boot: self.boot_memory,
            max: self.boot_memory + s.region_size,
            plugged: s.plugged,
            requested: s.requested,
        }
    }

    /// The VM's memory now (for a VM without max_memory: boot RAM, nothing plugged).
    pub fn memory(&self) -> VmMemory {
        let boot = self.boot_memory;
        match &self.memory {
            Some(control) => {
                let s = control.snapshot();
                VmMemory {
                    boot,
                    max: boot + s.region_size,
                    plugged: s.plugged,
                    requested: s.requested,
                }
            }
            None => VmMemory {
                boot,
                max: boot,
                plugged: 0,
                requested: 0,
            },
        }
    }

    /// Time from `Vm::start` to the guest's boot-timer write, once it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        *self.boot_time.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ACPI tables the guest was given.
    pub fn acpi_tables(&self) -> &AcpiTables {
        &self.acpi
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        #[cfg(target_arch = "aarch64")]
        {
            self.machine.request_exit(ExitReason::Shutdown);
            self.machine.vcpus.join_all(JOIN_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kvm_default_mpidr_spreads_index_over_aff0_and_aff1() {
        assert_eq!(kvm_default_mpidr(0), 0x8000_0000);
        assert_eq!(kvm_default_mpidr(17), 0x8000_0101);
        assert_eq!(kvm_default_mpidr(127), 0x8000_070f);
    }

    #[test]
    fn test_acpi_tables_for_dump_describe_all_possible_vcpus() {
        let tables = acpi_tables(1, 128).unwrap();
        let madt = tables
            .tables()
            .iter()
            .find(|t| t.signature == "APIC")
            .unwrap();
        // Header 44 + GICD 24 + GICR 16 + 128 GICCs of 82 bytes.
        assert_eq!(madt.bytes.len(), 44 + 24 + 16 + 128 * 82);
    }

    #[test]
    fn test_vsock_slot_is_described_at_its_mmio_base_and_spi() {
        let config = acpi_config(&[kvm_default_mpidr(0)], 1, &[VSOCK_SLOT]);
        assert_eq!(
            config.virtio,
            [VirtioMmioDevice {
                slot: 0,
                base: 0x0e00_0000,
                size: 0x200,
                gsi: 48
            }]
        );
    }

    #[test]
    fn test_fs_devices_take_the_slots_after_vsock() {
        let fs = |tag: &str| crate::config::FsConfig {
            tag: tag.into(),
            socket_path: "/run/fs.sock".into(),
            stream: None,
        };
        let config = VmConfig {
            vsock: Some(crate::config::VsockConfig {
                cid: 3,
                uds_path: "/run/v.sock".into(),
                listener: None,
            }),
            fs: vec![fs("a"), fs("b")],
            ..VmConfig::new("/nonexistent")
        };
        let slots = virtio_slots(&config);
        let described = acpi_config(&[kvm_default_mpidr(0)], 1, &slots);
        assert_eq!(slots, [0, 1, 2]);
        let tap =
            || std::os::fd::OwnedFd::from(std::os::unix::net::UnixDatagram::pair().unwrap().0);
        let with_nics = VmConfig {
            net: vec![
                crate::config::NetConfig {
                    tap: tap(),
                    mac: [2, 0, 0, 0, 0, 1],
                    mtu: 1500,
                },
                crate::config::NetConfig {
                    tap: tap(),
                    mac: [2, 0, 0, 0, 0, 2],
                    mtu: 1500,
                },
            ],
            ..config
        };
        assert_eq!(virtio_slots(&with_nics), [0, 1, 2, 16, 17]);
        assert_eq!(
            described.virtio.last(),
            Some(&VirtioMmioDevice {
                slot: 2,
                base: 0x0e00_2000,
                size: 0x200,
                gsi: 50
            })
        );
    }

    #[test]
    fn test_max_vcpus_above_kvm_limit_is_refused() {
        assert_eq!(
            check_kvm_vcpu_limit(128, 64),
            Err(ConfigError::MaxAboveKvm { max: 128, kvm: 64 })
        );
        assert_eq!(check_kvm_vcpu_limit(512, 512), Ok(()));
    }

    #[test]
    fn test_start_with_zero_boot_vcpus_fails_before_kvm() {
        let config = VmConfig {
            boot_vcpus: 0,
            ..VmConfig::new("/nonexistent")
        };
        assert!(matches!(
            Vm::start(config),
            Err(VmError::Config(ConfigError::NoBootVcpus))
        ));
    }

    #[test]
    fn test_start_with_missing_kernel_fails_before_kvm() {
        let config = VmConfig::new("/nonexistent/Image");
        assert!(matches!(
            Vm::start(config),
            Err(VmError::Kernel(KernelError::KernelRead(..)))
        ));
    }
}
