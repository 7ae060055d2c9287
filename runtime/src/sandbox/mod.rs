//! A sandbox: one microVM (the embedded VMM) whose PID 1 is Accordion's agent, reachable over the
//! VM's hybrid-vsock socket. Its state lives in `/run/accordion/<name>/` (0700, root only), owned
//! by the process holding its lock ([`owner`]); the VM is charged to a host cgroup of its own
//! ([`crate::host_cgroup`]).

pub mod owner;

pub mod capped_log;

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::os::unix::ffi::OsStringExt;

// A state directory is removed only when nothing is mounted under it (a pod's share is).
use accordion_share::remove_dir_unless_mounted;
use accordion_vmm::{ExitReason, FsConfig, NetConfig, VcpuState};

use self::capped_log::CappedLog;
use self::owner::OwnerLock;
use crate::host_cgroup::{self, HostCgroup};
use crate::vmm_process::channel::{JailSpec, SetVcpusRefusal, StartSpec};
use crate::vmm_process::{IdLease, SetMemoryError, SetVcpusError, StartFds, VmProcess, VmmError};

/// Devices a sandbox gets beside its vsock: virtio-fs shares and virtio-net interfaces, and the
/// host processes serving them (virtiofsd), which the sandbox keeps until its VM is down.
#[derive(Default)]
pub struct Devices {
    pub fs: Vec<FsConfig>,
    pub net: Vec<NetConfig>,
    /// Dropped once the VM has stopped (so the guest can still sync), before the host cgroup
    /// and the state directory go.
    pub companions: Vec<Box<dyn Send>>,
}

use crate::agent_client::{AgentClient, AgentClientError};

/// Where sandboxes keep their state (`ACCORDION_RUN_DIR` overrides it, e.g. for tests).
pub fn run_root() -> PathBuf {
    std::env::var_os("ACCORDION_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/accordion"))
}

/// Where guest assets are installed (`ACCORDION_SHARE_DIR` overrides it).
pub fn share_dir() -> PathBuf {
    std::env::var_os("ACCORDION_SHARE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/accordion/share"))
}

/// The names of the sandboxes under the run root, sorted; none when the run root does not exist.
pub fn names() -> std::io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(run_root()) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The state directory of sandbox `name`.
pub fn state_dir(name: &str) -> PathBuf {
    run_root().join(name)
}

/// The operator control socket of sandbox `name`.
pub fn control_socket(name: &str) -> PathBuf {
    state_dir(name).join(CONTROL_SOCKET)
}

/// File names inside a sandbox's state directory.
pub(crate) const CONTROL_SOCKET: &str = "control.sock";
/// The guest's serial console (and `console.log.1`, its older half).
pub const CONSOLE_LOG: &str = "console.log";
/// The host cgroup's directory, for the cleanup of a sandbox whose owner died.
pub(crate) const CGROUP_FILE: &str = "cgroup";

/// How long the VMM process may take to start the VM.
const VMM_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest CID of every sandbox: each VM has its own vsock device, so CIDs need not differ.
const GUEST_CID: u64 = 3;

/// Errors of a sandbox's life cycle.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Invalid sandbox name {0:?}: use 1-64 of [A-Za-z0-9_.-], not starting with '.'")]
    Name(String),
    #[error("Sandbox {0} already exists (see `accordion ps`; `accordion stop {0}` removes it)")]
    Exists(String),
    #[error("Cannot create the state directory {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
    #[error("Cannot place the VM in its host cgroup")]
    HostCgroup(#[from] crate::host_cgroup::HostCgroupError),
    #[error("Cannot prepare the sandbox's devices")]
    Prepare(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("Cannot open {0}")]
    Input(PathBuf, #[source] std::io::Error),
    #[error("Cannot start the VM")]
    Vmm(#[from] VmmError),
    #[error("The guest agent did not come up; last console lines:\n{console_tail}")]
    Agent {
        console_tail: String,
        #[source]
        source: AgentClientError,
    },
    #[error(
        "Guest stopped ({reason:?}) before its agent answered; last console lines:\n{console_tail}"
    )]
    GuestStopped {
        reason: ExitReason,
        console_tail: String,
    },
}

/// Checks a sandbox name: it becomes a directory name under the run root.
pub fn validate_name(name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Name(name.to_string()))
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the VMM's default command line.
    pub extra_cmdline: String,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_mib: u64,
    /// The most guest memory a memory resize may reach, MiB (None: fixed at `memory_mib`); above
    /// `memory_mib` by a multiple of 128 MiB.
    pub max_memory_mib: Option<u64>,
    /// How long the agent may take to answer after the VM starts.
    pub agent_timeout: Duration,
    /// The most the guest's console log may take on disk (`console.max_kib`).
    pub console_max_bytes: u64,
    /// The host cgroup the VM is charged to: a pod's `linux.cgroupsPath`, or None for
    /// `accordion/<name>`.
    pub cgroups_path: Option<String>,
    /// The pod's CPU limit (millicores); cpu.max is the smaller of it and the vCPUs.
    pub cpu_limit_millis: Option<u64>,
    /// Host memory and tasks the sandbox may use beyond its guest RAM.
    pub host: crate::config::HostConfig,
}

/// What cpu.max of a sandbox's cgroup follows: the pod's CPU limit, and its vCPUs (a VM of n
/// vCPUs never needs more than n CPUs of host time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuBudget {
    pod_limit_millis: Option<u64>,
    vcpus: u32,
}

impl CpuBudget {
    fn millis(self) -> u64 {
        let vcpus = u64::from(self.vcpus) * 1000;
        self.pod_limit_millis
            .map_or(vcpus, |limit| limit.min(vcpus))
    }
}

/// Timings of a sandbox's start, for `accordion status` and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// `Vm::start` returned (VM built, boot vCPU running).
    pub vm_started: Duration,
    /// The agent answered Health.
    pub agent_ready: Duration,
    /// Of `vm_started`, the VMM's jail (None when it runs unjailed).
    pub jail_setup: Option<Duration>,
}

/// A running sandbox. Dropping it forces the VM down and removes its state directory.
///
/// Shared (`Arc`) between the control server's calls and the task that owns its life: every
/// method takes `&self`, and `stop` may be called from any of them (the first one stops it).
pub struct Sandbox {
    name: String,
    dir: PathBuf,
    /// The VMM process; `None` once stopped.
    vm: Mutex<Option<VmProcess>>,
    /// Why it stopped, once `stop` ran.
    stopped: Mutex<Option<ExitReason>>,
    agent: AgentClient,
    timings: BootTimings,
    max_vcpus: u32,
    memory_mib: u64,
    /// The most guest memory, MiB (`memory_mib` when fixed).
    max_memory_mib: u64,
    /// host.memory_overhead_mib: memory.max of the host cgroup is guest memory plus this.
    memory_overhead_mib: u64,
    /// The guest's MemTotal with nothing plugged (read at boot), when memory can grow: what a
    /// memory resize's acknowledgement is measured against.
    guest_base_total: Option<u64>,
    resizer: crate::resize::Resizer,
    /// Host processes serving the VM's devices; dropped right after the VM stops.
    companions: Mutex<Vec<Box<dyn Send>>>,
    /// The host cgroup the VM is charged to (None once removed).
    cgroup: Mutex<Option<HostCgroup>>,
    cpu: Mutex<CpuBudget>,
    /// Held for the sandbox's life: it is what tells others the state directory is in use.
    _owner: OwnerLock,
}

impl Sandbox {
    /// Boots the VM and waits until its agent answers.
    pub async fn boot(spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
        Self::boot_with(spec, |_| Ok(Devices::default())).await
    }

    /// Like [`Sandbox::boot`], with devices: `prepare` runs once the (empty) state directory
    /// exists and before the VM starts, e.g. to start virtiofsd in it or open the pod's taps, and
    /// returns the devices to attach. The shim boots pods this way.
    pub async fn boot_with<P>(spec: &SandboxSpec, prepare: P) -> Result<Sandbox, SandboxError>
    where
        P: FnOnce(&Path) -> Result<Devices, Box<dyn std::error::Error + Send + Sync>>,
    {
        validate_name(&spec.name)?;
        let t0 = Instant::now();
        let root = run_root();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| SandboxError::StateDir(root.clone(), e))?;
        let dir = root.join(&spec.name);
        if remove_if_stale(&dir) {
            eprintln!(
                "accordion: removed the state of sandbox {} (its process is gone)",
                spec.name
            );
        }
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(spec.name.clone()))
            }
            Err(e) => return Err(SandboxError::StateDir(dir, e)),
        }
        // From here on the directory is ours: remove it on every failure.
        let mut cleanup = RemoveDirOnDrop(Some(dir.clone()));
        let owner = OwnerLock::acquire(&dir).map_err(|e| SandboxError::StateDir(dir.clone(), e))?;
        // Into the host cgroup before anything runs: guest RAM, vCPU threads and the device
        // helpers prepare() spawns are all charged there from their first page.
        let cpu = CpuBudget {
            pod_limit_millis: spec.cpu_limit_millis,
            vcpus: spec.vcpus,
        };
        let cgroup = host_cgroup_for(spec, &dir, cpu)?;
        let mut cgroup_cleanup = RemoveCgroupOnDrop(Some(cgroup));
        let console = CappedLog::create(&dir.join(CONSOLE_LOG), spec.console_max_bytes)
            .map_err(|e| SandboxError::StateDir(dir.join(CONSOLE_LOG), e))?;
        let vsock_path = dir.join("vsock.sock");
        let devices = prepare(&dir).map_err(SandboxError::Prepare)?;
        // Whatever fails from here drops the companions first (virtiofsd), then the cgroup.
        let companions = CompanionsOnDrop(devices.companions);
        let vm = start_vmm(
            spec,
            &dir,
            cgroup_cleanup.0.as_ref(),
            console,
            &vsock_path,
            devices.fs,
            devices.net,
        )?;
        let vm_started = t0.elapsed();

        // Connect while watching the VM: a guest that dies must not cost the whole deadline.
        let connect = AgentClient::connect(&vsock_path, spec.agent_timeout);
        tokio::pin!(connect);
        let agent = loop {
            tokio::select! {
                r = &mut connect => {
                    break r.map_err(|source| SandboxError::Agent {
                        console_tail: console_tail(&dir),
                        source,
                    })?;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Some(reason) = vm.wait_timeout(Duration::ZERO) {
                        let console_tail = console_tail(&dir);
                        return Err(SandboxError::GuestStopped { reason, console_tail });
                    }
                }
            }
        };
        agent.health().await.map_err(|source| SandboxError::Agent {
            console_tail: console_tail(&dir),
            source,
        })?;
        // Nothing is plugged yet: this MemTotal is the base plugged memory adds to.
        let guest_base_total = match max_memory_mib(spec) > spec.memory_mib {
            true => Some(
                agent
                    .guest_info()
                    .await
                    .map_err(|source| SandboxError::Agent {
                        console_tail: console_tail(&dir),
                        source,
                    })?
                    .memory_total_bytes,
            ),
            false => None,
        };
        let timings = BootTimings {
            vm_started,
            agent_ready: t0.elapsed(),
            jail_setup: vm.jail_setup(),
        };
        cleanup.0 = None;
        match crate::confinement::Confinement::of(vm.pid()) {
            Ok(c) => log::info!(
                "sandbox {}: the VM runs confined by: {}",
                spec.name,
                c.summary()
            ),
            Err(e) => log::warn!(
                "sandbox {}: cannot read the VMM's confinement: {e}",
                spec.name
            ),
        }
        Ok(Sandbox {
            name: spec.name.clone(),
            dir,
            vm: Mutex::new(Some(vm)),
            stopped: Mutex::new(None),
            agent,
            timings,
            max_vcpus: spec.max_vcpus,
            memory_mib: spec.memory_mib,
            max_memory_mib: max_memory_mib(spec),
            memory_overhead_mib: spec.host.memory_overhead_mib,
            guest_base_total,
            resizer: crate::resize::Resizer::default(),
            companions: Mutex::new(companions.take()),
            cgroup: Mutex::new(cgroup_cleanup.0.take()),
            cpu: Mutex::new(cpu),
            _owner: owner,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// Possible vCPUs of the VM.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    /// Guest memory configured for the VM, MiB.
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    /// The most guest memory a memory resize may reach, MiB (`memory_mib` when fixed).
    pub fn max_memory_mib(&self) -> u64 {
        self.max_memory_mib
    }

    /// The guest's MemTotal at boot, with nothing plugged (None when memory is fixed).
    pub fn guest_base_total(&self) -> Option<u64> {
        self.guest_base_total
    }

    /// The VMM's memory sizes (None once stopped, or if the VMM does not answer).
    pub fn vm_memory(&self) -> Option<accordion_vmm::VmMemory> {
        self.vm().as_ref().and_then(|vm| vm.memory().ok())
    }

    /// Asks the VMM for `bytes` of guest memory; does not wait for the guest (see
    /// `resize_memory`).
    pub fn set_memory(&self, bytes: u64) -> Result<accordion_vmm::VmMemory, SetMemoryError> {
        match self.vm().as_ref() {
            Some(vm) => vm.set_memory(bytes),
            None => Err(SetMemoryError::Vmm(VmmError::Ended("stopped".into()))),
        }
    }

    /// Sets the host cgroup's memory.max for `guest_bytes` of guest memory (plus the overhead).
    pub fn set_host_memory(
        &self,
        guest_bytes: u64,
    ) -> Result<(), crate::host_cgroup::HostCgroupError> {
        let bytes = guest_bytes.saturating_add(self.memory_overhead_mib.saturating_mul(1 << 20));
        match self
            .cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            Some(cgroup) => cgroup.set_memory_max(bytes),
            None => Ok(()),
        }
    }

    /// Resizes the guest's memory to `bytes` and waits up to `timeout` for the guest to
    /// acknowledge it.
    pub async fn resize_memory(
        &self,
        bytes: u64,
        timeout: Duration,
    ) -> Result<crate::resize::memory::MemoryOutcome, crate::resize::memory::MemoryResizeError>
    {
        self.resizer.resize_memory(self, bytes, timeout).await
    }

    /// The last memory resizes, oldest first.
    pub fn memory_resizes(&self) -> Vec<crate::resize::memory::MemoryRecord> {
        self.resizer.memory_history()
    }

    fn vm(&self) -> std::sync::MutexGuard<'_, Option<VmProcess>> {
        self.vm.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the VM stopped, if it has (by itself or through `stop`).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        if let Some(reason) = self
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Some(reason);
        }
        self.vm().as_ref()?.wait_timeout(Duration::ZERO)
    }

    /// The VMM's view of every possible vCPU (empty once stopped).
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.vm()
            .as_ref()
            .map(VmProcess::vcpu_states)
            .unwrap_or_default()
    }

    /// Asks the VMM for `target` plugged vCPUs; does not wait for the guest (see `resize`).
    pub fn set_vcpus(&self, target: u32) -> Result<accordion_vmm::HotplugRequest, SetVcpusError> {
        match self.vm().as_ref() {
            Some(vm) => vm.set_vcpus(target),
            None => Err(SetVcpusError::Refused(SetVcpusRefusal::InvalidTarget {
                target,
                max: 0,
            })),
        }
    }

    /// The VMM process's pid, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vm().as_ref().map(VmProcess::pid)
    }

    /// Resizes to `target` vCPUs and waits up to `timeout` for the guest to acknowledge it.
    pub async fn resize(
        &self,
        target: u32,
        timeout: Duration,
    ) -> Result<crate::resize::ResizeOutcome, crate::resize::ResizeError> {
        let outcome = self.resizer.resize(self, target, timeout).await?;
        self.update_cpu_budget(|b| b.vcpus = target);
        Ok(outcome)
    }

    /// Records the pod's CPU limit (millicores; None: none) and rewrites cpu.max.
    pub fn set_cpu_limit(&self, millis: Option<u64>) {
        self.update_cpu_budget(|b| b.pod_limit_millis = millis);
    }

    fn update_cpu_budget(&self, change: impl FnOnce(&mut CpuBudget)) {
        let mut budget = self.cpu.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut budget);
        let millis = budget.millis();
        if let Some(cgroup) = self
            .cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if let Err(e) = cgroup.set_cpu(Some(millis)) {
                log::warn!("sandbox {}: cpu.max: {}", self.name, crate::error_chain(&e));
            }
        }
    }

    /// The host cgroup's directory, while the sandbox has one.
    pub fn host_cgroup_dir(&self) -> Option<PathBuf> {
        self.cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|c| c.dir().to_owned())
    }

    /// Sees a new value whenever a vCPU's state or the VM's memory changes, and when the VM
    /// ends (None once stopped): what resizes wait on.
    pub fn vm_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.vm().as_ref().map(VmProcess::changes)
    }

    /// A handle that waits for the VM to stop (for a death watch); None once stopped.
    pub fn exit_watch(&self) -> Option<accordion_vmm::ExitWatch> {
        self.vm().as_ref().map(VmProcess::exit_watch)
    }

    /// The last finished resizes, oldest first.
    pub fn recent_resizes(&self) -> Vec<crate::resize::ResizeRecord> {
        self.resizer.history()
    }

    /// Every finished resize (CPU and memory) since the sandbox started, as histograms.
    pub fn resize_stats(
        &self,
    ) -> Vec<(crate::resize::stats::Key, crate::resize::stats::Histogram)> {
        self.resizer.stats()
    }

    /// Time from `Vm::start` to the guest's init writing the boot timer, if it did.
    pub fn guest_init_time(&self) -> Option<Duration> {
        self.vm().as_ref()?.boot_time()
    }

    /// Stops the sandbox: asks the agent to power the guest off, waits up to `grace` for it, then
    /// forces the VM down; then its device helpers, host cgroup and state directory go (also when
    /// the VM had already stopped or was killed; the directory stays, logged, if something is
    /// still mounted in it). Returns why the VM stopped; later calls return the same reason.
    pub async fn stop(&self, grace: Duration) -> ExitReason {
        let vm = self.vm().take();
        let reason = match vm {
            Some(vm) => {
                if vm.wait_timeout(Duration::ZERO).is_none() {
                    // A dead agent is fine here: the VM is forced down below.
                    let _ = self.agent.shutdown().await;
                }
                tokio::task::spawn_blocking(move || {
                    let reason = vm.wait_timeout(grace).unwrap_or_else(|| vm.shutdown());
                    drop(vm);
                    reason
                })
                .await
                .unwrap_or(ExitReason::Shutdown)
            }
            None => self.exit_reason().unwrap_or(ExitReason::Shutdown),
        };
        self.record_stop(&reason);
        let companions = std::mem::take(
            &mut *self
                .companions
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let cgroup = self
            .cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let _ = tokio::task::spawn_blocking(move || {
            drop(companions);
            remove_host_cgroup(cgroup);
        })
        .await;
        remove_dir_unless_mounted(&self.dir);
        reason
    }

    /// Forces the VM down at once, without asking the guest (its disks or share are gone); the
    /// rest is left to `stop`.
    pub async fn kill(&self) -> ExitReason {
        let Some(vm) = self.vm().take() else {
            return self.exit_reason().unwrap_or(ExitReason::Shutdown);
        };
        let reason = tokio::task::spawn_blocking(move || {
            let reason = vm.shutdown();
            drop(vm);
            reason
        })
        .await
        .unwrap_or(ExitReason::Shutdown);
        self.record_stop(&reason);
        reason
    }

    fn record_stop(&self, reason: &ExitReason) {
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if stopped.is_none() {
            *stopped = Some(reason.clone());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(vm) = self.vm().take() {
            vm.shutdown();
        }
        self.companions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        remove_host_cgroup(
            self.cgroup
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        remove_dir_unless_mounted(&self.dir);
    }
}

/// Where the VMM processes' host ids are leased: beside the run root (`/run/accordion-ids`), so
/// it is not taken for a sandbox.
fn lease_dir() -> PathBuf {
    let root = run_root();
    let mut name = root.file_name().unwrap_or_default().to_owned();
    name.push("-ids");
    root.with_file_name(name)
}

/// `ACCORDION_JAIL=off` runs the VMM process unconfined: a development switch (to compare, or
/// to debug the VMM with the host's tools), never set in CI (docs/security.md).
fn jail_enabled() -> bool {
    std::env::var("ACCORDION_JAIL").as_deref() != Ok("off")
}

/// Opens what the VM needs and starts its VMM process, jailed (vmm_process/jail.rs).
fn start_vmm(
    spec: &SandboxSpec,
    dir: &Path,
    cgroup: Option<&HostCgroup>,
    console: CappedLog,
    vsock_path: &Path,
    fs: Vec<FsConfig>,
    net: Vec<NetConfig>,
) -> Result<VmProcess, SandboxError> {
    let open = |path: &Path| {
        std::fs::File::open(path).map_err(|e| SandboxError::Input(path.to_owned(), e))
    };
    let kvm_path = Path::new("/dev/kvm");
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_path)
        .map_err(|e| SandboxError::Input(kvm_path.to_owned(), e))?;
    let (current, older, _) = console
        .into_files()
        .map_err(|e| SandboxError::StateDir(dir.join(CONSOLE_LOG), e))?;
    let vsock = std::os::unix::net::UnixListener::bind(vsock_path)
        .map_err(|e| SandboxError::StateDir(vsock_path.to_owned(), e))?;
    let mut streams = Vec::with_capacity(fs.len());
    for device in &fs {
        let stream = match device.stream.as_ref() {
            Some(stream) => stream.try_clone(),
            None => std::os::unix::net::UnixStream::connect(&device.socket_path),
        };
        streams.push(stream.map_err(|e| SandboxError::Input(device.socket_path.clone(), e))?);
    }
    let mut cmdline = accordion_vmm::config::DEFAULT_CMDLINE.to_string();
    if !spec.extra_cmdline.trim().is_empty() {
        cmdline = format!("{cmdline} {}", spec.extra_cmdline.trim());
    }
    let memory_bytes = spec.memory_mib.saturating_mul(1 << 20);
    let lease = if jail_enabled() {
        let (base, count) = (spec.host.vmm_id_base, spec.host.vmm_ids);
        Some(IdLease::take(&lease_dir(), base, count).map_err(VmmError::from)?)
    } else {
        None
    };
    let jail = lease.as_ref().map(|lease| JailSpec {
        root: dir.to_string_lossy().into_owned(),
        uid: lease.id,
        gid: lease.id,
        // The vCPU fds, the device threads' eventfds and epolls, vsock's connections: a few
        // hundred at 128 vCPUs.
        nofile: 4096,
        // Threads count: a vCPU each, the device threads, the channel.
        nproc: u64::from(spec.max_vcpus) + 64,
        // Guest RAM is a memfd of that size, the virtio-mem region one of at most the maximum;
        // the console's halves are smaller.
        fsize: max_memory_mib(spec)
            .saturating_mul(1 << 20)
            .max(memory_bytes)
            .max(spec.console_max_bytes)
            .saturating_add(1 << 20),
    });
    let start = StartSpec {
        name: spec.name.clone(),
        kernel_name: spec.kernel.display().to_string(),
        initrd_name: spec.initrd.display().to_string(),
        cmdline,
        memory_mib: spec.memory_mib,
        max_memory_mib: spec.max_memory_mib.filter(|&max| max > spec.memory_mib),
        boot_vcpus: spec.vcpus,
        max_vcpus: spec.max_vcpus,
        vsock_cid: GUEST_CID,
        vsock_path: vsock_path.display().to_string(),
        fs_tags: fs.iter().map(|d| d.tag.clone()).collect(),
        net: net.iter().map(|d| (d.mac, d.mtu)).collect(),
        console_max_bytes: spec.console_max_bytes,
        initrd: true,
        jail,
        log_level: log::max_level() as usize,
    };
    let fds = StartFds {
        kvm,
        kernel: open(&spec.kernel)?,
        initrd: Some(open(&spec.initrd)?),
        console: (current, older),
        vsock,
        fs: streams,
        taps: net.into_iter().map(|d| d.tap).collect(),
    };
    Ok(VmProcess::start(
        start,
        fds,
        lease,
        cgroup,
        VMM_START_TIMEOUT,
    )?)
}

/// The most guest memory of `spec`, MiB: its maximum, never below its boot memory.
fn max_memory_mib(spec: &SandboxSpec) -> u64 {
    spec.max_memory_mib
        .unwrap_or(spec.memory_mib)
        .max(spec.memory_mib)
}

/// Creates the sandbox's host cgroup with its limits, records where it is (for cleanup after a
/// crash) and moves this process into it.
fn host_cgroup_for(
    spec: &SandboxSpec,
    dir: &Path,
    cpu: CpuBudget,
) -> Result<HostCgroup, SandboxError> {
    let relative = host_cgroup::relative_path(spec.cgroups_path.as_deref(), &spec.name)?;
    let memory_mib = spec
        .memory_mib
        .saturating_add(spec.host.memory_overhead_mib);
    let limits = host_cgroup::Limits {
        memory_max: memory_mib.saturating_mul(1 << 20),
        cpu_millis: Some(cpu.millis()),
        pids_max: spec.host.pids_max,
    };
    let mut cgroup = HostCgroup::create(Path::new(host_cgroup::CGROUP_ROOT), &relative, &limits)?;
    let record = dir.join(CGROUP_FILE);
    let recorded = std::fs::write(&record, cgroup.dir().as_os_str().as_encoded_bytes())
        .map_err(|e| SandboxError::StateDir(record, e));
    if let Err(e) = recorded.and_then(|()| cgroup.join().map_err(SandboxError::from)) {
        remove_host_cgroup(Some(cgroup));
        return Err(e);
    }
    Ok(cgroup)
}

/// Leaves and removes a host cgroup; a failure is logged (the sandbox is going away).
fn remove_host_cgroup(cgroup: Option<HostCgroup>) {
    if let Some(cgroup) = cgroup {
        let dir = cgroup.dir().to_owned();
        if let Err(e) = cgroup.remove() {
            log::warn!(
                "cannot remove the host cgroup {}: {}",
                dir.display(),
                crate::error_chain(&e)
            );
        }
    }
}

struct RemoveCgroupOnDrop(Option<HostCgroup>);

impl Drop for RemoveCgroupOnDrop {
    fn drop(&mut self) {
        remove_host_cgroup(self.0.take());
    }
}

struct CompanionsOnDrop(Vec<Box<dyn Send>>);

impl CompanionsOnDrop {
    fn take(mut self) -> Vec<Box<dyn Send>> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for CompanionsOnDrop {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// Removes a state directory whose owner is gone (it crashed or was killed), after killing what
/// it left in its host cgroup, if nothing is mounted in it; returns whether it did. A directory
/// without a lock is left alone: its owner may be starting.
pub fn remove_if_stale(dir: &Path) -> bool {
    if owner::owner(dir) != owner::Owner::Gone {
        return false;
    }
    remove_orphaned_cgroup(dir);
    remove_dir_unless_mounted(dir)
}

/// Kills whatever a dead owner left in the host cgroup it recorded in `dir`, and removes it.
pub fn remove_orphaned_cgroup(dir: &Path) {
    let Ok(recorded) = std::fs::read(dir.join(CGROUP_FILE)) else {
        return;
    };
    let cgroup = PathBuf::from(std::ffi::OsString::from_vec(recorded));
    // Our own file in a root-only directory, but a path is checked before it is acted on.
    let inside = cgroup
        .strip_prefix(host_cgroup::CGROUP_ROOT)
        .is_ok_and(|rest| {
            rest.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
                && rest.components().next().is_some()
        });
    if !inside {
        log::warn!("{}: ignoring cgroup {}", dir.display(), cgroup.display());
        return;
    }
    if let Err(e) = host_cgroup::kill_and_remove(&cgroup) {
        log::warn!(
            "cannot remove the host cgroup {}: {}",
            cgroup.display(),
            crate::error_chain(&e)
        );
    }
}

/// The last lines of a VM's console log: what a user needs when a guest fails to come up (the
/// state directory holding the log is removed on failure).
fn console_tail(dir: &Path) -> String {
    capped_log::tail(&dir.join(CONSOLE_LOG), 25)
}

struct RemoveDirOnDrop(Option<PathBuf>);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_dir_unless_mounted(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_name_accepts_plain_names() {
        assert!(validate_name("b1").is_ok());
        assert!(validate_name("pod_a.b-c").is_ok());
    }

    #[test]
    fn test_validate_name_rejects_paths_and_empty() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            ".hidden",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
