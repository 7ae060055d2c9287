//! A sandbox: one microVM (the embedded VMM) whose PID 1 is Accordion's agent, reachable over the
//! VM's hybrid-vsock socket. Its state lives in `/run/accordion/<name>/` (0700, root only).

pub mod console;

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use accordion_vmm::{ExitReason, FsConfig, NetConfig, VcpuState, Vm, VmConfig, VsockConfig};

/// Devices a sandbox gets beside its vsock: virtio-fs shares and virtio-net interfaces.
#[derive(Debug, Default)]
pub struct Devices {
    pub fs: Vec<FsConfig>,
    pub net: Vec<NetConfig>,
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
const PID_FILE: &str = "pid";

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
    #[error("Cannot prepare the sandbox's devices")]
    Prepare(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("Cannot start the VM")]
    Vm(#[from] accordion_vmm::VmError),
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
    /// How long the agent may take to answer after the VM starts.
    pub agent_timeout: Duration,
    /// The most the guest's console log may take on disk (`console.max_kib`).
    pub console_max_bytes: u64,
}

/// Timings of a sandbox's start, for `accordion status` and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// `Vm::start` returned (VM built, boot vCPU running).
    pub vm_started: Duration,
    /// The agent answered Health.
    pub agent_ready: Duration,
}

/// A running sandbox. Dropping it forces the VM down and removes its state directory.
///
/// Shared (`Arc`) between the control server's calls and the task that owns its life: every
/// method takes `&self`, and `stop` may be called from any of them (the first one stops it).
pub struct Sandbox {
    name: String,
    dir: PathBuf,
    /// `None` once stopped.
    vm: Mutex<Option<Vm>>,
    /// Why it stopped, once `stop` ran.
    stopped: Mutex<Option<ExitReason>>,
    agent: AgentClient,
    timings: BootTimings,
    max_vcpus: u32,
    memory_mib: u64,
    resizer: crate::resize::Resizer,
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
        let pid_path = dir.join(PID_FILE);
        std::fs::write(&pid_path, format!("{}\n", std::process::id()))
            .map_err(|e| SandboxError::StateDir(pid_path, e))?;
        let console = console::ConsoleLog::create(&dir, spec.console_max_bytes)
            .map_err(|e| SandboxError::StateDir(dir.join(console::LOG_FILE), e))?;
        let vsock_path = dir.join("vsock.sock");

        let mut config = VmConfig::new(&spec.kernel);
        config.initrd = Some(spec.initrd.clone());
        if !spec.extra_cmdline.trim().is_empty() {
            config.cmdline = format!("{} {}", config.cmdline, spec.extra_cmdline.trim());
        }
        config.boot_vcpus = spec.vcpus;
        config.max_vcpus = spec.max_vcpus;
        config.memory_mib = spec.memory_mib;
        config.console = Box::new(console);
        config.vsock = Some(VsockConfig {
            cid: GUEST_CID,
            uds_path: vsock_path.clone(),
        });
        let devices = prepare(&dir).map_err(SandboxError::Prepare)?;
        config.fs = devices.fs;
        config.net = devices.net;
        let vm = Vm::start(config)?;
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
        let timings = BootTimings {
            vm_started,
            agent_ready: t0.elapsed(),
        };
        cleanup.0 = None;
        Ok(Sandbox {
            name: spec.name.clone(),
            dir,
            vm: Mutex::new(Some(vm)),
            stopped: Mutex::new(None),
            agent,
            timings,
            max_vcpus: spec.max_vcpus,
            memory_mib: spec.memory_mib,
            resizer: crate::resize::Resizer::default(),
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

    fn vm(&self) -> std::sync::MutexGuard<'_, Option<Vm>> {
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
        self.vm().as_ref().map(Vm::vcpu_states).unwrap_or_default()
    }

    /// Asks the VMM for `target` plugged vCPUs; does not wait for the guest (see `resize`).
    pub fn set_vcpus(
        &self,
        target: u32,
    ) -> Result<accordion_vmm::HotplugRequest, accordion_vmm::CpuHotplugError> {
        match self.vm().as_ref() {
            Some(vm) => vm.set_vcpus(target),
            None => Err(accordion_vmm::CpuHotplugError::InvalidTarget { target, max: 0 }),
        }
    }

    /// Resizes to `target` vCPUs and waits up to `timeout` for the guest to acknowledge it.
    pub async fn resize(
        &self,
        target: u32,
        timeout: Duration,
    ) -> Result<crate::resize::ResizeOutcome, crate::resize::ResizeError> {
        self.resizer.resize(self, target, timeout).await
    }

    /// The last finished resizes, oldest first.
    pub fn recent_resizes(&self) -> Vec<crate::resize::ResizeRecord> {
        self.resizer.history()
    }

    /// Time from `Vm::start` to the guest's init writing the boot timer, if it did.
    pub fn guest_init_time(&self) -> Option<Duration> {
        self.vm().as_ref()?.boot_time()
    }

    /// Stops the sandbox: asks the agent to power the guest off, waits up to `grace` for it, then
    /// forces the VM down. The state directory is removed either way. Returns why the VM stopped;
    /// later calls return the same reason.
    pub async fn stop(&self, grace: Duration) -> ExitReason {
        let Some(vm) = self.vm().take() else {
            return self.exit_reason().unwrap_or(ExitReason::Shutdown);
        };
        if vm.wait_timeout(Duration::ZERO).is_none() {
            // A dead agent is fine here: the VM is forced down below.
            let _ = self.agent.shutdown().await;
        }
        let reason = tokio::task::spawn_blocking(move || {
            let reason = vm.wait_timeout(grace).unwrap_or_else(|| vm.shutdown());
            drop(vm);
            reason
        })
        .await
        .unwrap_or(ExitReason::Shutdown);
        let _ = std::fs::remove_dir_all(&self.dir);
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        reason
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(vm) = self.vm().take() {
            vm.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pid recorded in a sandbox's state directory.
pub fn recorded_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live process running the same executable as this one (a recycled pid of
/// some other program does not count).
pub fn pid_is_ours(pid: u32) -> bool {
    let exe = |p: &str| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    match (exe(&pid.to_string()), exe("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

/// Removes a state directory whose recorded process is gone (it crashed or was killed); returns
/// whether it did. A directory without a pid file is left alone: its owner may be starting.
pub fn remove_if_stale(dir: &Path) -> bool {
    match recorded_pid(dir) {
        Some(pid) if !pid_is_ours(pid) => std::fs::remove_dir_all(dir).is_ok(),
        _ => false,
    }
}

/// The last lines of a VM's console log: what a user needs when a guest fails to come up (the
/// state directory holding the log is removed on failure).
fn console_tail(dir: &Path) -> String {
    console::tail(dir, 25)
}

struct RemoveDirOnDrop(Option<PathBuf>);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
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
