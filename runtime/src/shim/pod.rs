//! A pod on the host: its VM (a [`Sandbox`]), the virtiofsd that shares the containers' root
//! filesystems and volumes with it, and the pod's share (accordion-share) those are mounted in.
//!
//! Layout, in the sandbox's state directory `/run/accordion/<pod>/`: `mounts/` (where the shim
//! mounts, one `<container>/` each holding `rootfs/` and `mounts/N`), `share/` (its read-only
//! view, exported by virtiofsd), `stage/`, `virtiofsd.sock`, `virtiofsd.log`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use accordion_share::{remove_dir_unless_mounted, PodShare, Rootfs, ShareError};
use accordion_vmm::{FsConfig, NetConfig};
use containerd_shim::protos::types::mount::Mount as RootfsMount;

use super::spec::{HostBind, PodNetworkMode, SandboxResources};
use crate::config::Config;
use crate::network::{self, NetworkError, PodNetwork};
use crate::pidfd::PidFd;
use crate::resize::policy::{CpuShape, PodCpu};
use crate::sandbox::capped_log::{self, CappedLog};
use crate::sandbox::{self, Devices, Sandbox, SandboxError, SandboxSpec};

/// The virtio-fs tag of the pod's share; the guest agent mounts it (`accordion.share=`).
pub const SHARE_TAG: &str = "accordion";
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
const VIRTIOFSD_LOG: &str = "virtiofsd.log";
/// virtiofsd's log on /run, both halves together.
const VIRTIOFSD_LOG_MAX_BYTES: u64 = 1 << 20;
/// Guest memory beyond a pod's memory limit, for the guest kernel and agent, so the limit is
/// usable by the containers (docs/resize.md, "Memory").
pub const GUEST_OVERHEAD_MIB: u64 = 128;

/// Errors of a pod's host side.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("Cannot start virtiofsd {path}")]
    VirtiofsdSpawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtiofsd did not listen on {socket} within {after:?}; its log:\n{log}")]
    VirtiofsdSocket {
        socket: PathBuf,
        after: Duration,
        log: String,
    },
    #[error("Cannot boot the pod's VM")]
    Boot(#[from] SandboxError),
    #[error("Cannot carry the pod's network into the VM")]
    Network(#[from] NetworkError),
    #[error("The guest could not configure the pod's network")]
    GuestNetwork(#[source] crate::agent_client::AgentClientError),
    #[error("The pod's resources")]
    Sizing(#[from] crate::resize::policy::PolicyError),
    #[error(
        "The pod's max memory ({max_mib} MiB, annotation {}) is below the memory it boots with \
         ({boot_mib} MiB)",
        super::spec::MAX_MEMORY
    )]
    MaxMemoryBelowBoot { max_mib: u64, boot_mib: u64 },
    #[error("Cannot create {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("The container's rootfs {0} does not exist")]
    MissingRootfs(PathBuf),
    #[error("containerd gave {0} rootfs mounts; accordion takes one (a snapshot) or none")]
    RootfsMounts(usize),
    #[error("The pod's share")]
    Share(#[from] ShareError),
    #[error("Cannot watch virtiofsd")]
    VirtiofsdWatch(#[source] std::io::Error),
    #[error("Cannot set the pod's OOM score")]
    OomScore(#[from] crate::host_cgroup::HostCgroupError),
}

/// How a pod's VM is sized at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSize {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The most memory it may grow to (None: fixed at `memory_mib`).
    pub max_memory_mib: Option<u64>,
}

impl PodSize {
    /// The design's sizing rule on the pod's resources, else the configured defaults. The max
    /// memory is the pod's annotation (`annotated_max_mib`), else config.toml's `memory.max_mib`,
    /// in whole memory blocks above the boot memory.
    pub fn of(
        resources: &SandboxResources,
        annotated_max_mib: Option<u64>,
        config: &Config,
    ) -> Result<Self, PodError> {
        let v = &config.vcpus;
        let vcpus = if resources.cpu_quota.is_none() && resources.cpu_shares.is_none() {
            v.default
        } else {
            let shape = CpuShape::from_cfs(
                resources.cpu_quota,
                resources.cpu_period,
                resources.cpu_shares,
            )?;
            if shape == CpuShape::default() {
                v.default
            } else {
                PodCpu {
                    containers: Default::default(),
                    pod: Some(shape),
                }
                .target(v.sizing_policy, v.min, v.max)?
            }
        };
        let memory_mib = match resources.memory_bytes {
            Some(bytes) => crate::resize::policy::guest_memory_mib(bytes, GUEST_OVERHEAD_MIB)?
                .max(config.memory.default_mib),
            None => config.memory.default_mib,
        };
        let max_mib = match annotated_max_mib {
            Some(max_mib) if max_mib < memory_mib => {
                return Err(PodError::MaxMemoryBelowBoot {
                    max_mib,
                    boot_mib: memory_mib,
                })
            }
            Some(max_mib) if max_mib > crate::config::MAX_MEMORY_MIB => {
                return Err(crate::resize::policy::PolicyError::MemoryTooLarge {
                    bytes: max_mib.saturating_mul(1 << 20),
                    max_mib: crate::config::MAX_MEMORY_MIB,
                }
                .into())
            }
            Some(max_mib) => max_mib,
            None => config.memory.max_mib,
        };
        Ok(Self {
            vcpus,
            memory_mib,
            max_memory_mib: crate::resize::policy::max_memory_mib(memory_mib, max_mib),
        })
    }
}

/// virtiofsd serving a pod's share. Dropping it kills it (through its unreaped child handle:
/// its pid cannot be recycled before we wait for it; its sandboxed server, pid 1 of a pid
/// namespace of its own, dies with it).
struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    fn spawn(config: &Config, dir: &Path, share: &Path) -> Result<Self, PodError> {
        let socket = dir.join(VIRTIOFSD_SOCKET);
        let log_path = dir.join(VIRTIOFSD_LOG);
        // virtiofsd's output goes through a pipe into a capped log: the guest's requests can make
        // it write (errors per request), and the log is on /run like the console.
        let mut log = CappedLog::create(&log_path, VIRTIOFSD_LOG_MAX_BYTES)
            .map_err(|e| PodError::Dir(log_path.clone(), e))?;
        let (read_end, write_end) =
            nix::unistd::pipe().map_err(|e| PodError::Dir(log_path.clone(), e.into()))?;
        let write_end2 = write_end
            .try_clone()
            .map_err(|e| PodError::Dir(log_path.clone(), e))?;
        let path = &config.virtiofsd.path;
        let mut command = Command::new(path);
        command
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(share)
            // The namespace sandbox (its seccomp filter stays on): pid, net and mount namespaces
            // of its own, rooted in a clone of the share, not a root chroot. Containers mounted
            // after it started reach its namespace by propagation: the share is a slave of the
            // pod's mounts/, and so are virtiofsd's copies of it (accordion-share).
            .args(["--sandbox", "namespace", "--announce-submounts"])
            .args(["--cache", config.virtiofsd.cache.as_arg()])
            .stdin(Stdio::null())
            .stdout(write_end)
            .stderr(write_end2);
        // SAFETY: between fork and exec, prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                // virtiofsd must not outlive the shim (whose VM is its only client).
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().map_err(|source| PodError::VirtiofsdSpawn {
            path: path.clone(),
            source,
        })?;
        // Our copies of the pipe's write end go with the command, so the copier sees EOF (and
        // ends) when virtiofsd and its server have exited.
        drop(command);
        let mut me = Self { child };
        let mut read_end = File::from(read_end);
        let copier = std::thread::Builder::new()
            .name("virtiofsd-log".into())
            .spawn(move || {
                let _ = std::io::copy(&mut read_end, &mut log);
            });
        if let Err(e) = copier {
            return Err(PodError::Dir(log_path, e));
        }
        let limit = Duration::from_secs(20);
        let deadline = Instant::now() + limit;
        // The socket file appears at bind(), before listen(): wait until it listens, or the VMM's
        // connect can be refused (seen with ten pods starting at once).
        while !listening(&socket) {
            let exited = matches!(me.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                return Err(PodError::VirtiofsdSocket {
                    socket,
                    after: limit,
                    log: capped_log::tail(&log_path, 25),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }
}

/// Whether the Unix socket at `path` is listening (/proc/net/unix: flag __SO_ACCEPTCON); when
/// /proc/net/unix cannot be read, whether the file exists.
fn listening(path: &Path) -> bool {
    match std::fs::read_to_string("/proc/net/unix") {
        Ok(table) => unix_socket_listens(&table, path),
        Err(_) => path.exists(),
    }
}

/// /proc/net/unix columns: Num RefCount Protocol Flags Type St Inode Path.
fn unix_socket_listens(table: &str, path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8
            && Path::new(f[7]) == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
    })
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a pod's VM stands on the host: the cgroup it is charged to, its CPU limit and the OOM
/// ranking its QoS asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The sandbox's `linux.cgroupsPath` (None: `accordion/<pod>`).
    pub cgroups_path: Option<String>,
    /// The pod's CPU limit, millicores.
    pub cpu_limit_millis: Option<u64>,
    /// The sandbox's `process.oomScoreAdj`.
    pub oom_score_adj: Option<i64>,
}

/// A running pod.
pub struct Pod {
    pub sandbox: Arc<Sandbox>,
    share: PodShare,
    /// virtiofsd's pid (our unreaped child until the sandbox drops it) and a pidfd on it for the
    /// death watch.
    virtiofsd_pid: u32,
    virtiofsd_exit: Mutex<Option<PidFd>>,
    /// The highest OOM score adjustment asked for so far (the VM runs every container).
    oom_score_adj: Mutex<Option<i64>>,
    /// Why the pod died (its VM or virtiofsd ended while it ran), once it has.
    dead: Mutex<Option<String>>,
    /// The operator control socket (`accordion status/exec/resize <pod>`).
    control: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The pod's interfaces, their taps and redirects (None: no CNI namespace).
    network: Mutex<Option<PodNetwork>>,
}

impl Pod {
    /// Starts virtiofsd, carries the pod's network namespace (if CNI made one) into taps, boots
    /// the VM named `id` and has the guest configure its interfaces like the pod's.
    pub async fn boot(
        id: &str,
        size: PodSize,
        config: &Config,
        net_mode: &PodNetworkMode,
        placement: &Placement,
    ) -> Result<Pod, PodError> {
        // Before virtiofsd and the VMM process are spawned: they inherit the score.
        if let Some(score) = placement.oom_score_adj {
            crate::host_cgroup::set_oom_score_adj(None, score)?;
        }
        let spec = SandboxSpec {
            name: id.to_string(),
            kernel: config.guest.kernel.clone(),
            initrd: config.guest.initrd.clone(),
            extra_cmdline: format!("accordion.share={SHARE_TAG} {}", config.guest.kernel_params),
            vcpus: size.vcpus,
            max_vcpus: config.vcpus.max,
            memory_mib: size.memory_mib,
            max_memory_mib: size.max_memory_mib,
            agent_timeout: Duration::from_secs(config.timeouts.agent_ready_secs),
            cgroups_path: placement.cgroups_path.clone(),
            cpu_limit_millis: placement.cpu_limit_millis,
            host: config.host.clone(),
            console_max_bytes: config.console_max_bytes(),
        };
        let mut virtiofsd_pid = 0;
        let mut virtiofsd_exit = None;
        let mut pod_net: Option<PodNetwork> = None;
        let mut pod_share: Option<PodShare> = None;
        let booted = Sandbox::boot_with(&spec, |dir| {
            let share = PodShare::create(dir).map_err(PodError::from)?;
            pod_share = Some(share.clone());
            let v = Virtiofsd::spawn(config, dir, &share.exported())?;
            virtiofsd_pid = v.child.id();
            virtiofsd_exit = Some(PidFd::open(virtiofsd_pid).map_err(PodError::VirtiofsdWatch)?);
            let socket_path = dir.join(VIRTIOFSD_SOCKET);
            // The sandbox keeps it until its VM is down.
            let companions: Vec<Box<dyn Send>> = vec![Box::new(v)];
            let mut net = Vec::new();
            if let PodNetworkMode::Netns(path) = net_mode {
                let (attached, taps) =
                    network::attach(path, accordion_vmm::config::MAX_NET_DEVICES)
                        .map_err(PodError::from)?;
                for (iface, tap) in attached.interfaces.iter().zip(taps) {
                    net.push(NetConfig {
                        tap: tap.into_fd(),
                        mac: iface.mac,
                        mtu: u16::try_from(iface.mtu).unwrap_or(u16::MAX),
                    });
                }
                pod_net = Some(attached);
            }
            Ok(Devices {
                fs: vec![FsConfig {
                    tag: SHARE_TAG.into(),
                    socket_path,
                    stream: None,
                }],
                net,
                companions,
            })
        })
        .await;
        let sandbox = match booted {
            Ok(s) => s,
            Err(e) => {
                if let Some(net) = &pod_net {
                    detach_logged(id, net);
                }
                // The sandbox left its directory in place (the share is mounted in it); it
                // already stopped virtiofsd.
                if let Some(share) = &pod_share {
                    share.unmount_all();
                    remove_dir_unless_mounted(share.dir());
                }
                return Err(e.into());
            }
        };
        let Some(share) = pod_share else {
            // boot_with runs `prepare` before it can succeed.
            return Err(PodError::Dir(
                sandbox.dir().to_owned(),
                std::io::Error::other("the pod's share was not set up"),
            ));
        };
        if let Some(net) = &pod_net {
            let t = Instant::now();
            if let Err(e) = sandbox.agent().configure_network(net.to_proto()).await {
                sandbox
                    .stop(Duration::from_secs(config.timeouts.stop_grace_secs))
                    .await;
                detach_logged(id, net);
                return Err(PodError::GuestNetwork(e));
            }
            log::info!(
                "pod {id}: network: {} interface(s) from {} in {:.1} ms",
                net.interfaces.len(),
                net.netns.display(),
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        let sandbox = Arc::new(sandbox);
        let control = match crate::control::server::serve_pod(Arc::clone(&sandbox)) {
            Ok(task) => Some(task),
            Err(e) => {
                log::warn!("pod {id}: no control socket: {}", crate::error_chain(&e));
                None
            }
        };
        Ok(Pod {
            sandbox,
            share,
            virtiofsd_pid,
            virtiofsd_exit: Mutex::new(virtiofsd_exit),
            oom_score_adj: Mutex::new(placement.oom_score_adj),
            dead: Mutex::new(None),
            control: Mutex::new(control),
            network: Mutex::new(pod_net),
        })
    }

    /// The pod's share: where containers' root filesystems and volumes are mounted.
    pub fn share(&self) -> &PodShare {
        &self.share
    }

    /// Records that the pod died and why (the death watch).
    pub fn mark_dead(&self, why: &str) {
        *self.dead.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.to_string());
    }

    /// Why the pod died, if it did.
    pub fn dead(&self) -> Option<String> {
        self.dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The pidfd the death watch waits on for virtiofsd's exit (once).
    pub fn take_virtiofsd_exit(&self) -> Option<PidFd> {
        self.virtiofsd_exit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Raises the OOM score adjustment of the pod's host processes (this one, its VMM process and virtiofsd) to
    /// `score` when it is higher than what they have: the VM holds every container, so it is as
    /// expendable as the most expendable of them (runc gives each container its own).
    pub fn raise_oom_score_adj(&self, score: i64) -> Result<(), PodError> {
        let mut current = self
            .oom_score_adj
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.is_some_and(|c| c >= score) {
            return Ok(());
        }
        crate::host_cgroup::set_oom_score_adj(None, score)?;
        // The VMM process, which holds guest RAM: the one the OOM killer should find.
        if let Some(vmm) = self.sandbox.vmm_pid() {
            crate::host_cgroup::set_oom_score_adj(Some(vmm), score)?;
        }
        set_oom_score_adj_of_virtiofsd(self.virtiofsd_pid, score)?;
        *current = Some(score);
        Ok(())
    }

    /// Unmounts whatever is left in the share, stops the VM and virtiofsd, and removes the state
    /// directory.
    pub async fn stop(&self, grace: Duration) {
        if let Some(control) = self
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            control.abort();
        }
        // Unmount first (lazily: virtiofsd keeps what it has open, so the guest can still sync and
        // power off): the sandbox removes its state directory when it stops, which it does only
        // once nothing is mounted in it.
        self.share.unmount_all();
        // The VM powers off first, then virtiofsd goes (the guest can sync its share until then).
        let reason = self.sandbox.stop(grace).await;
        // The VM is gone, and its taps with it; the redirects on the pod's interfaces go now.
        let net = self
            .network
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(net) = net {
            detach_logged(self.sandbox.name(), &net);
        }
        log::info!("pod {}: VM stopped ({reason:?})", self.sandbox.name());
    }
}

/// Removes the pod's redirects and taps; a failure is logged (the pod is going away anyway).
fn detach_logged(id: &str, net: &PodNetwork) {
    if let Err(e) = network::detach(net) {
        log::warn!("pod {id}: network teardown: {}", crate::error_chain(&e));
    }
}

/// Mounts container `id`'s root filesystem and binds in the pod's share: containerd's snapshot
/// mount (one), or the bundle's own rootfs directory when containerd passes none (as
/// `ctr run --rootfs` does). On error nothing of it is left mounted.
pub fn mount_container(
    share: &PodShare,
    id: &str,
    rootfs: &[RootfsMount],
    bundle_rootfs: &Path,
    binds: &[HostBind],
) -> Result<(), PodError> {
    match rootfs {
        [] => {
            if !bundle_rootfs.is_dir() {
                return Err(PodError::MissingRootfs(bundle_rootfs.to_owned()));
            }
            Ok(share.mount_container(id, Rootfs::Bind(bundle_rootfs), binds)?)
        }
        [m] => {
            // containerd's own mount code (overlay options, long lowerdirs, loop devices), on
            // the empty directory the share gives it.
            let mount = |target: &Path| {
                containerd_shim::mount::mount_rootfs(
                    Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                    Some(m.source.as_str()).filter(|s| !s.is_empty()),
                    &m.options,
                    target,
                )
                .map_err(|e| format!("{} from {}: {e}", m.type_, m.source))
            };
            Ok(share.mount_container(id, Rootfs::Mount(&mount), binds)?)
        }
        more => Err(PodError::RootfsMounts(more.len())),
    }
}

/// Sets the OOM score adjustment of virtiofsd (our child `pid`, not yet waited for, so the pid
/// is its own) and of its sandboxed server (its only child). The server's pid is checked the way
/// a pid must be: a pidfd is opened first, the parent must still list it as its child after that,
/// and it must still be alive after the write, so the write reached that process.
fn set_oom_score_adj_of_virtiofsd(pid: u32, score: i64) -> Result<(), PodError> {
    crate::host_cgroup::set_oom_score_adj(Some(pid), score)?;
    let children = |parent: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    for child in children(pid) {
        let Ok(pidfd) = PidFd::open(child) else {
            continue;
        };
        if !children(pid).contains(&child) {
            continue;
        }
        crate::host_cgroup::set_oom_score_adj(Some(child), score)?;
        if pidfd.exited().unwrap_or(true) {
            log::warn!("virtiofsd's server {child} exited while its OOM score was set");
        }
    }
    Ok(())
}

/// Cleanup after a shim that died (containerd's `shim delete`): unless the pod's owner still
/// holds its lock, kills what it left in its host cgroup (virtiofsd: the cgroup names it, never
/// a pid), unmounts the share and removes the state directory of pod `id`.
pub fn cleanup_dead_pod(id: &str) -> bool {
    let dir = sandbox::state_dir(id);
    if !dir.exists() || sandbox::owner::owner(&dir) == sandbox::owner::Owner::Alive {
        return false;
    }
    sandbox::remove_orphaned_cgroup(&dir);
    PodShare::at(&dir).unmount_all();
    remove_dir_unless_mounted(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_listening_unix_socket_from_proc_net_unix() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 1234 /run/accordion/p/virtiofsd.sock\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 1235 /run/accordion/q/virtiofsd.sock\n";
        assert!(unix_socket_listens(
            table,
            Path::new("/run/accordion/p/virtiofsd.sock")
        ));
        assert!(!unix_socket_listens(
            table,
            Path::new("/run/accordion/q/virtiofsd.sock")
        ));
        assert!(!unix_socket_listens(
            table,
            Path::new("/run/accordion/r/virtiofsd.sock")
        ));
    }

    #[test]
    fn test_pod_size_defaults_and_annotations() {
        let mut config = Config::default();
        config.vcpus.max = 8;
        let none = SandboxResources::default();
        assert_eq!(
            PodSize::of(&none, None, &config).unwrap(),
            PodSize {
                vcpus: 1,
                memory_mib: 512,
                max_memory_mib: None,
            }
        );
        let r = SandboxResources {
            cpu_quota: Some(250_000),
            cpu_period: Some(100_000),
            cpu_shares: None,
            memory_bytes: Some(1 << 30),
        };
        assert_eq!(
            PodSize::of(&r, None, &config).unwrap(),
            PodSize {
                vcpus: 3,
                memory_mib: 1024 + GUEST_OVERHEAD_MIB,
                max_memory_mib: None,
            }
        );
        let too_big = SandboxResources {
            cpu_quota: Some(2_000_000),
            ..r
        };
        assert!(PodSize::of(&too_big, None, &config).is_err());
    }

    #[test]
    fn test_pod_max_memory_from_the_annotation_else_the_config_in_whole_blocks() {
        let mut config = Config::default();
        let none = SandboxResources::default();
        let max = |annotated, config: &Config| {
            PodSize::of(&none, annotated, config).map(|s| s.max_memory_mib)
        };
        assert_eq!(max(None, &config).unwrap(), None);
        config.memory.max_mib = 2000;
        // 512 + 11 blocks of 128 MiB.
        assert_eq!(max(None, &config).unwrap(), Some(1920));
        // The annotation wins, either way.
        assert_eq!(max(Some(4096), &config).unwrap(), Some(4096));
        assert_eq!(max(Some(1024), &config).unwrap(), Some(1024));
        // As booted, or less than a block above it: fixed.
        assert_eq!(max(Some(512), &config).unwrap(), None);
        assert_eq!(max(Some(600), &config).unwrap(), None);
        assert!(matches!(
            max(Some(256), &config),
            Err(PodError::MaxMemoryBelowBoot {
                max_mib: 256,
                boot_mib: 512
            })
        ));
        assert!(matches!(
            max(Some(u64::MAX >> 20), &config),
            Err(PodError::Sizing(_))
        ));
    }

    /// runtime/fuzz/regressions/guest_spec/sandbox_quota_i64_max.json: a sandbox annotation
    /// quota of i64::MAX overflowed `quota × 1000`.
    #[test]
    fn test_pod_size_huge_values_are_sizing_errors_not_wraps() {
        let config = Config::default();
        for r in [
            SandboxResources {
                cpu_quota: Some(i64::MAX),
                cpu_period: Some(100_000),
                ..Default::default()
            },
            SandboxResources {
                cpu_quota: Some(100_000),
                cpu_period: Some(1),
                ..Default::default()
            },
            SandboxResources {
                cpu_shares: Some(u64::MAX),
                ..Default::default()
            },
            SandboxResources {
                memory_bytes: Some(u64::MAX),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(PodSize::of(&r, None, &config), Err(PodError::Sizing(_))),
                "{r:?}"
            );
        }
    }
}
