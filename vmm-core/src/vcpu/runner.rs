//! vCPU threads and the PSCI policy that starts and stops them.
//!
//! Every possible vCPU has a slot holding its state, its fd while no thread runs it, and the
//! thread handle while one does. A thread exists only between the guest's CPU_ON and CPU_OFF (or
//! VM exit); on CPU_OFF it hands the fd back to the slot and ends.
//!
//! Why spawn on CPU_ON rather than park on CPU_OFF and unpark on CPU_ON: measured in the node
//! (nested TCG, tests/hotplug.rs prints it), a spawn takes 0.8-1.8 ms until the thread runs and
//! waking a parked thread 0.16-0.28 ms, while one plug step there (the guest's Device Check, CPU
//! registration, PSCI round trip and secondary boot) takes 300-1200 ms: the millisecond is lost in
//! it. In exchange, an unplugged or offline vCPU costs no thread, no stack and no signal target,
//! a VM with 512 possible vCPUs has as many threads as online ones, and no parked thread's wake-up
//! can race with an unplug. The slot's state changes and the fd hand-over happen under its lock.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, kvm_run, kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
    KVM_MP_STATE_STOPPED,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::os::unix::thread::JoinHandleExt;

use super::kick;
use super::{EventHub, VcpuError, VcpuEvent, VcpuState};
use crate::arch::aarch64::psci::{cpu_on_refusal, PsciCall, PsciReturn};
use crate::arch::aarch64::regs;
use crate::devices::cpu_hotplug::{CpuHotplugError, CpuSlots};
use crate::exit::ExitReason;
use crate::machine::Machine;
use crate::seccomp::{self, ThreadKind};

/// MPIDR affinity fields; CPU_ON names its target by these.
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

struct Slot {
    state: VcpuState,
    /// The guest has read this vCPU's `_STA` as enabled since it was last plugged (boot vCPUs:
    /// the MADT says Enabled). CPU_ON is denied until then.
    seen_enabled: bool,
    fd: Option<VcpuFd>,
    thread: Option<JoinHandle<()>>,
}

/// All possible vCPUs.
pub(crate) struct Vcpus {
    slots: Vec<Mutex<Slot>>,
    mpidrs: Vec<u64>,
    /// VCPU_INIT for a warm reset: preferred target + PSCI 0.2, powered on.
    reset_init: kvm_vcpu_init,
    /// Subscribers to state changes.
    events: EventHub,
}

/// Creates and initialises every possible vCPU (secondaries powered off) and reads their MPIDRs.
/// Returns the fds with MPIDRs, and the VCPU_INIT to reuse for resets.
pub(crate) fn create_all(
    vm: &VmFd,
    count: u32,
) -> Result<(Vec<(VcpuFd, u64)>, kvm_vcpu_init), VcpuError> {
    let kvm_err = |step, index| {
        move |source| VcpuError::Kvm {
            step,
            index,
            source,
        }
    };
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .map_err(kvm_err("get the preferred target for", 0))?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count as usize {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(kvm_err("create", index))?;
        let mut this_init = init;
        if index > 0 {
            // Secondaries wait for PSCI CPU_ON (which we intercept) like on real hardware.
            this_init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        fd.vcpu_init(&this_init)
            .map_err(kvm_err("initialise", index))?;
        let mpidr = regs::get(&fd, regs::MPIDR_EL1).map_err(kvm_err("read the MPIDR of", index))?;
        vcpus.push((fd, mpidr));
    }
    Ok((vcpus, init))
}

/// How a thread's run loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The guest turned this vCPU off: keep the fd for a later CPU_ON.
    PoweredOff,
    /// The VM is stopping.
    VmExit,
}

impl Vcpus {
    /// Takes ownership of the created vCPUs; the first `boot_vcpus` are plugged.
    pub(crate) fn new(
        created: Vec<(VcpuFd, u64)>,
        boot_vcpus: u32,
        reset_init: kvm_vcpu_init,
    ) -> Self {
        let mut slots = Vec::with_capacity(created.len());
        let mut mpidrs = Vec::with_capacity(created.len());
        for (index, (fd, mpidr)) in created.into_iter().enumerate() {
            // vCPU 0 becomes Online when its thread starts.
            let state = match VcpuState::at_boot(index as u32, boot_vcpus) {
                VcpuState::Online => VcpuState::Plugged,
                other => other,
            };
            slots.push(Mutex::new(Slot {
                state,
                seen_enabled: state != VcpuState::Unplugged,
                fd: Some(fd),
                thread: None,
            }));
            mpidrs.push(mpidr);
        }
        Self {
            slots,
            mpidrs,
            reset_init,
            events: EventHub::default(),
        }
    }

    /// A receiver of every state change from now on.
    pub(crate) fn subscribe(&self) -> std::sync::mpsc::Receiver<VcpuEvent> {
        self.events.subscribe()
    }

    /// Moves the vCPU whose slot the caller holds to `state` and tells the subscribers (under the
    /// slot lock, so events of one vCPU arrive in the order they happened).
    fn set_state(&self, index: usize, slot: &mut Slot, state: VcpuState) {
        if slot.state != state {
            slot.state = state;
            self.events.emit(VcpuEvent {
                index: index as u32,
                state,
            });
        }
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Slot> {
        self.slots[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// MPIDR of every possible vCPU.
    pub(crate) fn mpidrs(&self) -> &[u64] {
        &self.mpidrs
    }

    /// State of every possible vCPU.
    pub(crate) fn states(&self) -> Vec<VcpuState> {
        (0..self.slots.len()).map(|i| self.lock(i).state).collect()
    }

    fn index_of(&self, mpidr: u64) -> Option<usize> {
        self.mpidrs
            .iter()
            .position(|m| m & MPIDR_AFFINITY_MASK == mpidr & MPIDR_AFFINITY_MASK)
    }

    /// Starts vCPU `index` at `entry` with x0 = `x0` in a new thread. The caller holds its slot.
    fn launch(
        &self,
        machine: &Arc<Machine>,
        index: usize,
        slot: &mut Slot,
        entry: u64,
        x0: u64,
    ) -> Result<(), VcpuError> {
        let fd = slot.fd.take().ok_or(VcpuError::Kvm {
            step: "find the fd of",
            index,
            source: kvm_ioctls::Error::new(libc::EBADF),
        })?;
        let kvm_err = |step| {
            move |source| VcpuError::Kvm {
                step,
                index,
                source,
            }
        };
        // VCPU_INIT again is KVM's warm reset: registers to their reset values, powered on.
        let reset = fd
            .vcpu_init(&self.reset_init)
            .map_err(kvm_err("reset"))
            .and_then(|()| regs::set(&fd, regs::PC, entry).map_err(kvm_err("set the PC of")))
            .and_then(|()| regs::set(&fd, regs::x(0), x0).map_err(kvm_err("set x0 of")));
        if let Err(e) = reset {
            slot.fd = Some(fd);
            return Err(e);
        }
        // A previous thread of this vCPU handed its fd back before ending; reap it.
        if let Some(old) = slot.thread.take() {
            let _ = old.join();
        }
        let thread_machine = Arc::clone(machine);
        // A vCPU started by a vCPU (PSCI CPU_ON) inherits the vCPU filter already.
        let confined = seccomp::confined_as() == Some(ThreadKind::Vcpu);
        let spawned = Instant::now();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_thread(thread_machine, index, fd, spawned, confined))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        log::debug!(
            "vCPU {index}: thread spawn call took {} us",
            spawned.elapsed().as_micros()
        );
        slot.thread = Some(handle);
        self.set_state(index, slot, VcpuState::Online);
        Ok(())
    }

    /// Starts the boot vCPU at the kernel entry with x0 = DTB address (arm64 boot protocol).
    pub(crate) fn start_boot_vcpu(
        &self,
        machine: &Arc<Machine>,
        entry: u64,
        dtb: u64,
    ) -> Result<(), VcpuError> {
        kick::install()?;
        let mut slot = self.lock(0);
        self.launch(machine, 0, &mut slot, entry, dtb)
    }

    /// PSCI CPU_ON: denied for unplugged vCPUs, a warm reset and a new thread for plugged ones.
    fn cpu_on(
        &self,
        machine: &Arc<Machine>,
        target: u64,
        entry: u64,
        context_id: u64,
    ) -> PsciReturn {
        let Some(index) = self.index_of(target) else {
            return PsciReturn::InvalidParameters;
        };
        let mut slot = self.lock(index);
        // Plugged but not yet seen by the guest's ACPI layer: this is the boot-time CPU_ON Linux
        // sends to Online Capable CPUs, not a CPU it registered. Answer as for an unplugged one.
        let target = slot.state.psci_target_for_guest(slot.seen_enabled);
        if let Some(refusal) = cpu_on_refusal(Some(target)) {
            log::debug!(
                "PSCI CPU_ON of vCPU {index} ({:?}): {refusal:?}",
                slot.state
            );
            return refusal;
        }
        if machine.exit.is_tripped() {
            return PsciReturn::Denied;
        }
        match self.launch(machine, index, &mut slot, entry, context_id) {
            Ok(()) => {
                log::debug!("PSCI CPU_ON of vCPU {index} at {entry:#x}");
                PsciReturn::Success
            }
            Err(e) => {
                log::error!("PSCI CPU_ON of vCPU {index} failed: {e}");
                PsciReturn::InternalFailure
            }
        }
    }

    /// Kicks every running vCPU out of KVM_RUN.
    pub(crate) fn kick_all(&self) {
        for index in 0..self.slots.len() {
            let slot = self.lock(index);
            if let Some(thread) = slot.thread.as_ref().filter(|t| !t.is_finished()) {
                kick::kick(thread.as_pthread_t());
            }
        }
    }

    /// Joins every vCPU thread, kicking stragglers, giving up on those still running at `timeout`.
    pub(crate) fn join_all(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for index in 0..self.slots.len() {
            let Some(thread) = self.lock(index).thread.take() else {
                continue;
            };
            while !thread.is_finished() && Instant::now() < deadline {
                kick::kick(thread.as_pthread_t());
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                if thread.join().is_err() {
                    log::error!("vCPU {index} thread panicked");
                }
            } else {
                log::error!("vCPU {index} thread did not stop within {timeout:?}; leaving it");
            }
        }
    }
}

fn vcpu_thread(
    machine: Arc<Machine>,
    index: usize,
    mut fd: VcpuFd,
    spawned: Instant,
    confined: bool,
) {
    log::debug!(
        "vCPU {index}: thread running {} us after its spawn",
        spawned.elapsed().as_micros()
    );
    let filtered = if confined {
        seccomp::inherited(ThreadKind::Vcpu);
        Ok(())
    } else {
        seccomp::confine(ThreadKind::Vcpu)
    };
    let outcome = match filtered {
        Ok(()) => {
            let armed = kick::arm(fd.get_kvm_run() as *mut kvm_run);
            // The launcher holds our slot until our handle is stored, so from here on kicks
            // reach us.
            drop(machine.vcpus.lock(index));
            let outcome = run_loop(&machine, index, &mut fd);
            drop(armed);
            outcome
        }
        Err(e) => {
            let error = crate::error_chain(&e);
            log::error!("vCPU {index}: {error}");
            drop(machine.vcpus.lock(index));
            machine.request_exit(ExitReason::VcpuFailed { vcpu: index, error });
            Outcome::VmExit
        }
    };
    let mut slot = machine.vcpus.lock(index);
    slot.fd = Some(fd);
    if outcome == Outcome::PoweredOff {
        machine
            .vcpus
            .set_state(index, &mut slot, VcpuState::Plugged);
    }
}

/// The hotplug controller's view: Unplugged ↔ Plugged, never touching an Online vCPU.
impl CpuSlots for Vcpus {
    fn count(&self) -> u32 {
        self.slots.len() as u32
    }

    fn is_plugged(&self, index: u32) -> bool {
        self.slots
            .get(index as usize)
            .is_some_and(|_| self.lock(index as usize).state != VcpuState::Unplugged)
    }

    fn plug(&self, index: u32) {
        let index = index as usize;
        if index < self.slots.len() {
            let mut slot = self.lock(index);
            if slot.state == VcpuState::Unplugged {
                slot.seen_enabled = false;
                self.set_state(index, &mut slot, VcpuState::Plugged);
            }
        }
    }

    fn seen_enabled(&self, index: u32) {
        if let Some(slot) = self.slots.get(index as usize) {
            slot.lock().unwrap_or_else(|e| e.into_inner()).seen_enabled = true;
        }
    }

    fn unplug(&self, index: u32) -> Result<(), CpuHotplugError> {
        if index == 0 {
            return Err(CpuHotplugError::BootVcpu);
        }
        let i = index as usize;
        if i >= self.slots.len() {
            return Ok(());
        }
        let mut slot = self.lock(i);
        // Online, or its thread has not handed the fd back yet: the guest still runs it.
        if slot.state == VcpuState::Online || slot.fd.is_none() {
            return Err(CpuHotplugError::StillRunning(index));
        }
        // The thread, if any, has ended (it returned the fd under this lock): reap it.
        if let Some(old) = slot.thread.take() {
            let _ = old.join();
        }
        self.set_state(i, &mut slot, VcpuState::Unplugged);
        Ok(())
    }
}

/// Control flow after a PSCI call.
enum Flow {
    Continue,
    PoweredOff,
    Failed,
}

fn run_loop(machine: &Arc<Machine>, index: usize, fd: &mut VcpuFd) -> Outcome {
    loop {
        if machine.exit.is_tripped() {
            return Outcome::VmExit;
        }
        let failure = match fd.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                machine.bus.read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                machine.bus.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Hypercall(call)) => {
                let nr = call.nr;
                match handle_psci(machine, index, fd, nr) {
                    Flow::Continue => continue,
                    Flow::PoweredOff => return Outcome::PoweredOff,
                    Flow::Failed => return Outcome::VmExit,
                }
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                machine.request_exit(ExitReason::from_system_event(index, kind));
                return Outcome::VmExit;
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        log::error!("vCPU {index}: {failure}");
        machine.request_exit(ExitReason::VcpuFailed {
            vcpu: index,
            error: failure,
        });
        return Outcome::VmExit;
    }
}

fn handle_psci(machine: &Arc<Machine>, index: usize, fd: &VcpuFd, nr: u64) -> Flow {
    let args = regs::get(fd, regs::x(1))
        .and_then(|x1| Ok((x1, regs::get(fd, regs::x(2))?, regs::get(fd, regs::x(3))?)));
    let ret = match args.map(|(x1, x2, x3)| PsciCall::decode(nr, x1, x2, x3)) {
        Ok(PsciCall::CpuOn {
            target,
            entry,
            context_id,
        }) => machine.vcpus.cpu_on(machine, target, entry, context_id),
        Ok(PsciCall::CpuOff) => {
            // KVM answers AFFINITY_INFO itself, so it must learn that this vCPU is off.
            match fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_STOPPED,
            }) {
                Ok(()) => {
                    log::debug!("PSCI CPU_OFF of vCPU {index}");
                    return Flow::PoweredOff;
                }
                Err(e) => {
                    log::error!("vCPU {index}: cannot stop it for CPU_OFF: {e}");
                    PsciReturn::Denied
                }
            }
        }
        Ok(PsciCall::Unknown(nr)) => {
            log::warn!("vCPU {index}: unexpected forwarded SMCCC call {nr:#x}");
            PsciReturn::NotSupported
        }
        Err(e) => {
            log::error!("vCPU {index}: cannot read PSCI arguments: {e}");
            PsciReturn::InternalFailure
        }
    };
    match regs::set(fd, regs::x(0), ret.as_x0()) {
        Ok(()) => Flow::Continue,
        Err(e) => {
            machine.request_exit(ExitReason::VcpuFailed {
                vcpu: index,
                error: format!("cannot return from PSCI: {e}"),
            });
            Flow::Failed
        }
    }
}
