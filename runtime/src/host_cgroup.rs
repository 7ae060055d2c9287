//! A sandbox's place on the host: the cgroup v2 directory its VM is charged to, with memory.max,
//! cpu.max and pids.max, and the OOM ranking of its processes (docs/security.md, "Host cgroups").
//!
//! The process that runs the VM (the shim, or `accordion run`: its vCPU and device threads live
//! in it) joins the cgroup before the VM starts, so guest RAM, vCPU time and every thread are
//! charged there, and virtiofsd, spawned after, inherits it. For a CRI pod the cgroup is the
//! sandbox's `linux.cgroupsPath`, under the pod cgroup kubelet manages, so kubelet's pod limits,
//! accounting and eviction see the VM; without one, `/accordion/<name>`.

use std::fs::{DirBuilder, File};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the unified hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Controllers a sandbox's cgroup needs.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// The CFS period cpu.max is written with (kubelet's and runc's default), µs.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel takes, µs.
const MIN_CPU_QUOTA_US: u64 = 1_000;
/// The kernel's OOM score adjustment range.
const OOM_SCORE_ADJ_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;

/// Errors of a sandbox's host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    #[error("invalid cgroups path {path:?}: {why}")]
    Path { path: String, why: &'static str },
    #[error("{0} is not a cgroup v2 (unified) hierarchy; accordion needs cgroup v2")]
    NotUnified(PathBuf),
    #[error("the host's cgroup v2 hierarchy has no {controller} controller")]
    Controller { controller: &'static str },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("processes were still in {0} after they were killed")]
    StillPopulated(PathBuf),
    #[error("oom_score_adj {0} is outside -1000..=1000")]
    OomScore(i64),
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> HostCgroupError + 'a {
    move |source| HostCgroupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The limits of a sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// memory.max, bytes.
    pub memory_max: u64,
    /// cpu.max as millicores; `None`: no limit ("max").
    pub cpu_millis: Option<u64>,
    /// pids.max.
    pub pids_max: u64,
}

/// Where a sandbox's cgroup lives, relative to the hierarchy's root: containerd's
/// `linux.cgroupsPath` in either of its forms, cgroupfs (`/kubepods/burstable/pod…/<id>`) or
/// systemd (`kubepods-burstable-pod….slice:cri-containerd:<id>`, laid out as systemd would), or
/// `accordion/<name>` when the spec names none.
pub fn relative_path(cgroups_path: Option<&str>, name: &str) -> Result<PathBuf, HostCgroupError> {
    let bad = |why| HostCgroupError::Path {
        path: cgroups_path.unwrap_or_default().to_string(),
        why,
    };
    let path = match cgroups_path.map(str::trim).filter(|p| !p.is_empty()) {
        None => Path::new("accordion").join(name),
        Some(p) if !p.starts_with('/') && p.contains(':') => systemd_path(p)
            .ok_or_else(|| bad("a systemd cgroups path is slice:prefix:name, each without '/'"))?,
        // A relative cgroupfs path is taken from the root, like an absolute one.
        Some(p) => PathBuf::from(p.trim_start_matches('/')),
    };
    let clean = path.components().all(|c| matches!(c, Component::Normal(_)));
    if !clean || path.as_os_str().is_empty() {
        return Err(bad(
            "it must name a directory below the root, without '.' or '..'",
        ));
    }
    if path.as_os_str().len() > 4096 {
        return Err(bad("it is longer than PATH_MAX"));
    }
    Ok(path)
}

/// systemd's `slice:prefix:name` as a directory: the slice expanded into its parents
/// (`a-b-c.slice` lives in `a.slice/a-b.slice/`), the unit `prefix-name.scope` in it.
fn systemd_path(spec: &str) -> Option<PathBuf> {
    let mut parts = spec.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [slice, prefix, name].iter().any(|p| p.contains('/')) {
        return None;
    }
    if name.is_empty() {
        return None;
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut path = PathBuf::new();
    if slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
            return None;
        }
        let mut prefix_so_far = String::new();
        for word in stem.split('-') {
            if !prefix_so_far.is_empty() {
                prefix_so_far.push('-');
            }
            prefix_so_far.push_str(word);
            path.push(format!("{prefix_so_far}.slice"));
        }
    }
    let unit = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    path.push(unit);
    Some(path)
}

/// cpu.max for `millis` millicores: `quota period`, or `max period` for no limit.
pub fn cpu_max_line(millis: Option<u64>) -> String {
    match millis {
        None => format!("max {CPU_PERIOD_US}"),
        Some(m) => {
            let quota = m
                .saturating_mul(CPU_PERIOD_US)
                .div_ceil(1000)
                .max(MIN_CPU_QUOTA_US);
            format!("{quota} {CPU_PERIOD_US}")
        }
    }
}

/// A sandbox's cgroup, created (or found, when kubelet's parent already made the path).
#[derive(Debug)]
pub struct HostCgroup {
    /// The hierarchy's mount point.
    root: PathBuf,
    dir: PathBuf,
    /// The cgroup this process was in before it joined (it returns there before removal).
    original: Option<PathBuf>,
}

impl HostCgroup {
    /// Creates `root/relative` with every missing parent, turns the cpu, memory and pids
    /// controllers on down to it, and writes `limits`.
    pub fn create(root: &Path, relative: &Path, limits: &Limits) -> Result<Self, HostCgroupError> {
        check_unified(root)?;
        let available = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(io("read", &root.join("cgroup.controllers")))?;
        for controller in CONTROLLERS {
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(HostCgroupError::Controller { controller });
            }
        }
        let dir = root.join(relative);
        // A cgroup that was there before (kubelet's) is not ours to remove when this fails.
        let existed = dir.exists();
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(io("create", &dir))?;
        let cgroup = Self {
            root: root.to_owned(),
            dir,
            original: None,
        };
        match cgroup.configure(relative, limits) {
            Ok(()) => Ok(cgroup),
            Err(e) => {
                if !existed {
                    if let Err(removal) = kill_and_remove(&cgroup.dir) {
                        log::warn!(
                            "cannot remove the half-made cgroup {}: {}",
                            cgroup.dir.display(),
                            crate::error_chain(&removal)
                        );
                    }
                }
                Err(e)
            }
        }
    }

    /// Delegates the controllers from the root down to the cgroup and writes its limits.
    fn configure(&self, relative: &Path, limits: &Limits) -> Result<(), HostCgroupError> {
        let mut at = self.root.clone();
        for part in relative.components() {
            enable_controllers(&at)?;
            at.push(part);
        }
        self.write("memory.max", &limits.memory_max.to_string())?;
        self.set_cpu(limits.cpu_millis)?;
        self.write("pids.max", &limits.pids_max.to_string())
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves this whole process (every thread) into the cgroup; children spawned after follow.
    pub fn join(&mut self) -> Result<(), HostCgroupError> {
        let original = own_cgroup(&self.root)?;
        self.write("cgroup.procs", "0")?;
        self.original = Some(original);
        Ok(())
    }

    /// Moves process `pid` (a child this process started) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), HostCgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Sets cpu.max to `millis` millicores (`None`: no limit).
    pub fn set_cpu(&self, millis: Option<u64>) -> Result<(), HostCgroupError> {
        self.write("cpu.max", &cpu_max_line(millis))
    }

    /// Sets memory.max to `bytes` (the guest's memory follows a memory resize).
    pub fn set_memory_max(&self, bytes: u64) -> Result<(), HostCgroupError> {
        self.write("memory.max", &bytes.to_string())
    }

    /// Reads one of the cgroup's files.
    pub fn read(&self, file: &str) -> Result<String, HostCgroupError> {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).map_err(io("read", &path))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), HostCgroupError> {
        let path = self.dir.join(file);
        // One write(2) per value: cgroup files take a value per write.
        File::options()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(io("write", &path))
    }

    /// Leaves the cgroup (back to where this process came from), kills whatever is still in it
    /// and removes it. The caller has already stopped the VM and its helpers.
    pub fn remove(mut self) -> Result<(), HostCgroupError> {
        if let Some(original) = self.original.take() {
            let procs = original.join("cgroup.procs");
            File::options()
                .write(true)
                .open(&procs)
                .and_then(|mut f| f.write_all(b"0"))
                .map_err(io("return to", &original))?;
        }
        kill_and_remove(&self.dir)
    }
}

/// Kills every process left in the cgroup `dir` (cgroup.kill: the cgroup names them, never a
/// pid that could have been recycled), waits until it is empty and removes it. A missing
/// directory is not an error.
pub fn kill_and_remove(dir: &Path) -> Result<(), HostCgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    if populated(dir)? {
        let kill = dir.join("cgroup.kill");
        std::fs::write(&kill, "1").map_err(io("write", &kill))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(dir)? {
            if Instant::now() > deadline {
                return Err(HostCgroupError::StillPopulated(dir.to_owned()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostCgroupError::Io {
            what: "remove",
            path: dir.to_owned(),
            source: e,
        }),
    }
}

/// Whether processes are in the cgroup `dir` (cgroup.events `populated`).
fn populated(dir: &Path) -> Result<bool, HostCgroupError> {
    let path = dir.join("cgroup.events");
    let events = match std::fs::read_to_string(&path) {
        Ok(events) => events,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("read", &path)(e)),
    };
    Ok(events.lines().any(|l| l.trim() == "populated 1"))
}

/// Checks that `root` is a cgroup2 mount.
fn check_unified(root: &Path) -> Result<(), HostCgroupError> {
    let stat = nix::sys::statfs::statfs(root).map_err(|e| HostCgroupError::Io {
        what: "statfs",
        path: root.to_owned(),
        source: e.into(),
    })?;
    if stat.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(HostCgroupError::NotUnified(root.to_owned()))
    }
}

/// Turns the controllers on in `dir`'s cgroup.subtree_control.
///
/// Written even when a read already lists them: another sandbox starting at the same moment
/// may have set the mask while the kernel is still adding the controllers' files to the
/// children (a read shows the mask before that is done; the write waits for it). The kernel
/// ignores controllers that are already on, so under kubelet's pod cgroups, where they are,
/// the write changes nothing; should it be refused there, a mask that lists them all is enough.
fn enable_controllers(dir: &Path) -> Result<(), HostCgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let all: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    match std::fs::write(&path, all.join(" ")) {
        Ok(()) => Ok(()),
        Err(e) => {
            let enabled = std::fs::read_to_string(&path).map_err(io("read", &path))?;
            if CONTROLLERS
                .iter()
                .all(|c| enabled.split_whitespace().any(|e| e == *c))
            {
                Ok(())
            } else {
                Err(io("enable controllers in", &path)(e))
            }
        }
    }
}

/// This process's cgroup directory (the `0::` line of /proc/self/cgroup) under `root`.
fn own_cgroup(root: &Path) -> Result<PathBuf, HostCgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| HostCgroupError::NotUnified(root.to_owned()))?;
    Ok(root.join(relative.trim().trim_start_matches('/')))
}

/// Sets the OOM score adjustment of process `pid` (`None`: this process), as runc does for a
/// container's `process.oomScoreAdj`.
pub fn set_oom_score_adj(pid: Option<u32>, value: i64) -> Result<(), HostCgroupError> {
    if !OOM_SCORE_ADJ_RANGE.contains(&value) {
        return Err(HostCgroupError::OomScore(value));
    }
    let path = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/oom_score_adj")),
        None => PathBuf::from("/proc/self/oom_score_adj"),
    };
    std::fs::write(&path, value.to_string()).map_err(io("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_relative_path_without_a_cgroups_path_is_accordion_name() {
        assert_eq!(
            relative_path(None, "p1").unwrap(),
            PathBuf::from("accordion/p1")
        );
        assert_eq!(
            relative_path(Some(" "), "p1").unwrap(),
            PathBuf::from("accordion/p1")
        );
    }

    #[test]
    fn test_relative_path_of_cgroupfs_paths_is_below_the_root() {
        assert_eq!(
            relative_path(Some("/kubepods/burstable/pod1/abc"), "x").unwrap(),
            PathBuf::from("kubepods/burstable/pod1/abc")
        );
        assert_eq!(
            relative_path(Some("default/c1"), "x").unwrap(),
            PathBuf::from("default/c1")
        );
    }

    #[test]
    fn test_relative_path_of_systemd_paths_expands_the_slice() {
        assert_eq!(
            relative_path(Some("kubepods-burstable-pod12.slice:cri-containerd:abc"), "x")
                .unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path(Some(":accordion:p"), "x").unwrap(),
            PathBuf::from("system.slice/accordion-p.scope")
        );
        assert_eq!(
            relative_path(Some("-.slice::p"), "x").unwrap(),
            PathBuf::from("p.scope")
        );
    }

    #[test]
    fn test_relative_path_refuses_escapes_and_malformed_systemd_paths() {
        for bad in [
            "/kubepods/../../etc",
            "/",
            "//",
            "a.slice:p:../x",
            "a--b.slice:p:n",
            "nosuffix:p:n",
            "a.slice:p:",
            "a.slice:p:n:extra",
        ] {
            assert!(relative_path(Some(bad), "x").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_cpu_max_line_follows_the_limit_with_the_kernel_minimum() {
        assert_eq!(cpu_max_line(None), "max 100000");
        assert_eq!(cpu_max_line(Some(250)), "25000 100000");
        assert_eq!(cpu_max_line(Some(4000)), "400000 100000");
        assert_eq!(cpu_max_line(Some(1)), "1000 100000");
        assert!(cpu_max_line(Some(u64::MAX)).ends_with(" 100000"));
    }

    #[test]
    fn test_oom_score_adj_outside_the_kernel_range_is_refused() {
        assert!(matches!(
            set_oom_score_adj(None, 1001),
            Err(HostCgroupError::OomScore(1001))
        ));
        assert!(matches!(
            set_oom_score_adj(None, -1001),
            Err(HostCgroupError::OomScore(-1001))
        ));
    }

    #[test]
    fn test_kill_and_remove_of_a_missing_cgroup_is_ok() {
        let dir = std::env::temp_dir().join(format!("accordion-no-cgroup-{}", std::process::id()));
        assert!(kill_and_remove(&dir).is_ok());
    }
}
