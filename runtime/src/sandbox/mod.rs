//! A sandbox: one microVM (the embedded VMM) whose PID 1 is Accordion's agent, reachable over the
//! VM's hybrid-vsock socket. Its state lives in `/run/accordion/<name>/` (0700, root only).

use std::fs::{DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use accordion_vmm::{ExitReason, Vm, VmConfig, VsockConfig};

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

/// The guest CID of every sandbox: each VM has its own vsock device, so CIDs need not differ.
const GUEST_CID: u64 = 3;

/// Errors of a sandbox's life cycle.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Invalid sandbox name {0:?}: use 1-64 of [A-Za-z0-9_.-], not starting with '.'")]
    Name(String),
    #[error("Sandbox {0} already exists")]
    Exists(String),
    #[error("Cannot create the state directory {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
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
pub struct Sandbox {
    name: String,
    dir: PathBuf,
    vm: Option<Vm>,
    agent: AgentClient,
    timings: BootTimings,
}

impl Sandbox {
    /// Boots the VM and waits until its agent answers.
    pub async fn boot(spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
        validate_name(&spec.name)?;
        let t0 = Instant::now();
        let root = run_root();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| SandboxError::StateDir(root.clone(), e))?;
        let dir = root.join(&spec.name);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(spec.name.clone()))
            }
            Err(e) => return Err(SandboxError::StateDir(dir, e)),
        }
        // From here on the directory is ours: remove it on every failure.
        let mut cleanup = RemoveDirOnDrop(Some(dir.clone()));
        let console_path = dir.join("console.log");
        let console = File::create(&console_path)
            .map_err(|e| SandboxError::StateDir(console_path.clone(), e))?;
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
        let vm = Vm::start(config)?;
        let vm_started = t0.elapsed();

        // Connect while watching the VM: a guest that dies must not cost the whole deadline.
        let connect = AgentClient::connect(&vsock_path, spec.agent_timeout);
        tokio::pin!(connect);
        let agent = loop {
            tokio::select! {
                r = &mut connect => {
                    break r.map_err(|source| SandboxError::Agent {
                        console_tail: console_tail(&console_path),
                        source,
                    })?;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Some(reason) = vm.wait_timeout(Duration::ZERO) {
                        let console_tail = console_tail(&console_path);
                        return Err(SandboxError::GuestStopped { reason, console_tail });
                    }
                }
            }
        };
        agent.health().await.map_err(|source| SandboxError::Agent {
            console_tail: console_tail(&console_path),
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
            vm: Some(vm),
            agent,
            timings,
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

    /// Stops the sandbox: asks the agent to power the guest off, waits up to `grace` for it, then
    /// forces the VM down. The state directory is removed either way. Returns why the VM stopped.
    pub async fn stop(mut self, grace: Duration) -> ExitReason {
        let Some(vm) = self.vm.take() else {
            return ExitReason::Shutdown;
        };
        // A dead agent is fine here: the VM is forced down below.
        let _ = self.agent.shutdown().await;
        let reason = tokio::task::spawn_blocking(move || {
            let reason = vm.wait_timeout(grace).unwrap_or_else(|| vm.shutdown());
            drop(vm);
            reason
        })
        .await
        .unwrap_or(ExitReason::Shutdown);
        let _ = std::fs::remove_dir_all(&self.dir);
        reason
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last lines of a VM's console log: what a user needs when a guest fails to come up (the
/// state directory holding the full log is removed on failure).
fn console_tail(path: &Path) -> String {
    const LINES: usize = 25;
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    if tail.trim().is_empty() {
        "(console is empty)".to_string()
    } else {
        tail
    }
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
