//! A pod on the host: its VM (a [`Sandbox`]), the virtiofsd that shares the containers' root
//! filesystems and volumes with it, and the share directory those are mounted in.
//!
//! Layout, in the sandbox's state directory `/run/accordion/<pod>/`:
//! `share/` (exported by virtiofsd; one `<container>/` each holding `rootfs/` and `mounts/N`),
//! `virtiofsd.sock`, `virtiofsd.log`, `virtiofsd.pid`.

use std::fs::{DirBuilder, File};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use accordion_vmm::{FsConfig, NetConfig};
use containerd_shim::protos::types::mount::Mount as RootfsMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::spec::{HostBind, PodNetworkMode, SandboxResources};
use crate::config::Config;
use crate::network::{self, NetworkError, PodNetwork};
use crate::resize::policy::{CpuShape, PodCpu};
use crate::sandbox::{self, Devices, Sandbox, SandboxError, SandboxSpec};

/// The virtio-fs tag of the pod's share; the guest agent mounts it (`accordion.share=`).
pub const SHARE_TAG: &str = "accordion";
const SHARE_DIR: &str = "share";
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
const VIRTIOFSD_PID: &str = "virtiofsd.pid";
/// Guest memory beyond a pod's memory limit, for the guest kernel and agent, so the limit is
/// usable by the containers.
const GUEST_OVERHEAD_MIB: u64 = 128;

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
    #[error("The pod's CPU resources")]
    Sizing(#[from] crate::resize::policy::PolicyError),
    #[error("Cannot create {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("The container's rootfs {0} does not exist")]
    MissingRootfs(PathBuf),
    #[error("containerd gave {0} rootfs mounts; accordion takes one (a snapshot) or none")]
    RootfsMounts(usize),
    #[error(
        "Cannot mount the container's rootfs ({kind} from {source_path}) on {target}: {message}"
    )]
    MountRootfs {
        kind: String,
        source_path: String,
        target: PathBuf,
        message: String,
    },
    #[error("Cannot bind {source_path} on {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// How a pod's VM is sized at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl PodSize {
    /// The design's sizing rule on the pod's resources, else the configured defaults.
    pub fn of(resources: &SandboxResources, config: &Config) -> Result<Self, PodError> {
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
        Ok(Self { vcpus, memory_mib })
    }
}

/// virtiofsd serving a pod's share. Dropping it kills it.
struct Virtiofsd {
    child: Child,
    pid_file: PathBuf,
}

impl Virtiofsd {
    fn spawn(config: &Config, dir: &Path, share: &Path) -> Result<Self, PodError> {
        let socket = dir.join(VIRTIOFSD_SOCKET);
        let log_path = dir.join("virtiofsd.log");
        let log = File::create(&log_path).map_err(|e| PodError::Dir(log_path.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| PodError::Dir(log_path.clone(), e))?;
        let path = &config.virtiofsd.path;
        let mut command = Command::new(path);
        command
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(share)
            // chroot, not the namespace sandbox: the shim mounts each container's rootfs in the
            // share after virtiofsd started, and must not depend on mount propagation into a
            // private namespace (which also cannot be set up on an initramfs root).
            .args(["--sandbox", "chroot", "--announce-submounts"])
            .args(["--cache", config.virtiofsd.cache.as_arg()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
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
        let pid_file = dir.join(VIRTIOFSD_PID);
        let _ = std::fs::write(&pid_file, format!("{}\n", child.id()));
        let mut me = Self { child, pid_file };
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
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
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
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// A running pod.
pub struct Pod {
    pub sandbox: Arc<Sandbox>,
    share: PathBuf,
    virtiofsd: Mutex<Option<Virtiofsd>>,
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
    ) -> Result<Pod, PodError> {
        let spec = SandboxSpec {
            name: id.to_string(),
            kernel: config.guest.kernel.clone(),
            initrd: config.guest.initrd.clone(),
            extra_cmdline: format!("accordion.share={SHARE_TAG} {}", config.guest.kernel_params),
            vcpus: size.vcpus,
            max_vcpus: config.vcpus.max,
            memory_mib: size.memory_mib,
            agent_timeout: Duration::from_secs(config.timeouts.agent_ready_secs),
            console_max_bytes: config.console_max_bytes(),
        };
        let mut virtiofsd = None;
        let mut pod_net: Option<PodNetwork> = None;
        let booted = Sandbox::boot_with(&spec, |dir| {
            let share = dir.join(SHARE_DIR);
            make_dir(&share, 0o711)?;
            let v = Virtiofsd::spawn(config, dir, &share)?;
            let socket_path = dir.join(VIRTIOFSD_SOCKET);
            virtiofsd = Some(v);
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
                }],
                net,
            })
        })
        .await;
        let sandbox = match booted {
            Ok(s) => s,
            Err(e) => {
                if let Some(net) = &pod_net {
                    detach_logged(id, net);
                }
                return Err(e.into());
            }
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
        let share = sandbox.dir().join(SHARE_DIR);
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
            virtiofsd: Mutex::new(virtiofsd),
            control: Mutex::new(control),
            network: Mutex::new(pod_net),
        })
    }

    /// The host directory of container `id` in the share.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.share.join(id)
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
        // power off): the sandbox removes its state directory when it stops, and removing through
        // a live rootfs mount would delete files in containerd's snapshot.
        unmount_all_under(&self.share);
        let reason = self.sandbox.stop(grace).await;
        drop(
            self.virtiofsd
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
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

fn make_dir(path: &Path, mode: u32) -> Result<(), PodError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| PodError::Dir(path.to_owned(), e))
}

/// Mounts a container's rootfs at `<dir>/rootfs` (containerd's snapshot mount, or the bundle's
/// own rootfs directory when containerd passes none, as `ctr run --rootfs` does) and its host
/// binds at `<dir>/mounts/N`. On error, whatever was mounted is unmounted again.
pub fn mount_container(
    dir: &Path,
    rootfs: &[RootfsMount],
    bundle_rootfs: &Path,
    binds: &[HostBind],
) -> Result<(), PodError> {
    let target = dir.join("rootfs");
    make_dir(&target, 0o755)?;
    let result = mount_rootfs(rootfs, bundle_rootfs, &target).and_then(|()| {
        for b in binds {
            bind(b, dir)?;
        }
        Ok(())
    });
    if result.is_err() {
        unmount_all_under(dir);
    }
    result
}

fn mount_rootfs(
    rootfs: &[RootfsMount],
    bundle_rootfs: &Path,
    target: &Path,
) -> Result<(), PodError> {
    match rootfs {
        [] => {
            if !bundle_rootfs.is_dir() {
                return Err(PodError::MissingRootfs(bundle_rootfs.to_owned()));
            }
            bind(
                &HostBind {
                    source: bundle_rootfs.to_owned(),
                    target: PathBuf::from("rootfs"),
                    is_dir: true,
                    readonly: false,
                },
                target.parent().unwrap_or(target),
            )
        }
        [m] => {
            let err = |message: String| PodError::MountRootfs {
                kind: m.type_.clone(),
                source_path: m.source.clone(),
                target: target.to_owned(),
                message,
            };
            containerd_shim::mount::mount_rootfs(
                Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                Some(m.source.as_str()).filter(|s| !s.is_empty()),
                &m.options,
                target,
            )
            .map_err(|e| err(e.to_string()))
        }
        more => Err(PodError::RootfsMounts(more.len())),
    }
}

fn bind(b: &HostBind, dir: &Path) -> Result<(), PodError> {
    let target = dir.join(&b.target);
    if let Some(parent) = target.parent() {
        make_dir(parent, 0o755)?;
    }
    if b.is_dir {
        make_dir(&target, 0o755)?;
    } else if !target.exists() {
        File::create(&target).map_err(|e| PodError::Dir(target.clone(), e))?;
    }
    let fail = |source| PodError::Bind {
        source_path: b.source.clone(),
        target: target.clone(),
        source,
    };
    mount(
        Some(&b.source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(fail)?;
    if b.readonly {
        // A bind mount is made read-only by a remount (the flag is ignored on the first call).
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(fail)?;
    }
    Ok(())
}

/// Unmounts every mount at or below `dir`, deepest first (lazily: a process of ours may still
/// hold a file open).
pub fn unmount_all_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        if let Err(e) = umount2(&p, MntFlags::MNT_DETACH) {
            log::warn!("cannot unmount {}: {e}", p.display());
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c));
        if bytes[i] == b'\\' && octal {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            let v = u8::try_from(v).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Unmounts a container's share directory and removes it.
pub fn remove_container_dir(dir: &Path) {
    unmount_all_under(dir);
    // Only after every mount is gone: removing through a live rootfs mount would delete the
    // container's files in containerd's snapshot.
    if !still_mounted_under(dir) {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        log::warn!("{} still has mounts; left in place", dir.display());
    }
}

fn still_mounted_under(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .filter_map(|l| l.split(' ').nth(4))
                .any(|p| unescape_mountinfo(p).starts_with(dir))
        })
        .unwrap_or(true)
}

/// Cleanup after a shim that died (containerd's `shim delete`): kills its virtiofsd, unmounts the
/// share and removes the state directory of pod `id`, unless the pod's shim is still alive.
pub fn cleanup_dead_pod(id: &str) -> bool {
    let dir = sandbox::state_dir(id);
    if !dir.exists() {
        return false;
    }
    if let Some(pid) = sandbox::recorded_pid(&dir) {
        if sandbox::pid_is_ours(pid) {
            return false;
        }
    }
    if let Some(pid) = std::fs::read_to_string(dir.join(VIRTIOFSD_PID))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let is_virtiofsd = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|exe| exe.to_string_lossy().contains("virtiofsd"))
            .unwrap_or(false);
        if is_virtiofsd {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let share = dir.join(SHARE_DIR);
    unmount_all_under(&share);
    if still_mounted_under(&share) {
        log::warn!("{} still has mounts; left in place", share.display());
        return false;
    }
    std::fs::remove_dir_all(&dir).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_unescape_mountinfo_octal() {
        assert_eq!(
            unescape_mountinfo(r"/run/a\040b/c\134d"),
            PathBuf::from("/run/a b/c\\d")
        );
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mountinfo(r"/end\04"), PathBuf::from(r"/end\04"));
    }

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
            PodSize::of(&none, &config).unwrap(),
            PodSize {
                vcpus: 1,
                memory_mib: 512
            }
        );
        let r = SandboxResources {
            cpu_quota: Some(250_000),
            cpu_period: Some(100_000),
            cpu_shares: None,
            memory_bytes: Some(1 << 30),
        };
        assert_eq!(
            PodSize::of(&r, &config).unwrap(),
            PodSize {
                vcpus: 3,
                memory_mib: 1024 + GUEST_OVERHEAD_MIB
            }
        );
        let too_big = SandboxResources {
            cpu_quota: Some(2_000_000),
            ..r
        };
        assert!(PodSize::of(&too_big, &config).is_err());
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
                matches!(PodSize::of(&r, &config), Err(PodError::Sizing(_))),
                "{r:?}"
            );
        }
    }
}
