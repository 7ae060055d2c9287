//! The CPU files of sysfs: the masks under /sys/devices/system/cpu and each CPU's `online` file.
//!
//! The root is a parameter (`/sys` in the guest) so the logic runs against a directory of plain
//! files in unit tests. Everything here blocks (a write to `online` returns only once the CPU is up
//! or down, and waits for the kernel's device-hotplug lock while an ACPI hotplug is in progress);
//! async callers go through [`set_online`], which runs the writes on the blocking pool.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sysinfo::parse_cpu_set;

/// Attempts at writing a CPU's `online` file when the kernel answers EBUSY or EAGAIN.
pub const ONLINE_ATTEMPTS: u32 = 5;
/// Pause after the first EBUSY/EAGAIN; doubles per attempt (20 + 40 + 80 + 160 ms in all).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Errors of the CPU sysfs files.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// A file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file did not hold what the kernel writes there.
    #[error("Unexpected content in {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Writing a CPU's `online` file failed (after retries for EBUSY/EAGAIN).
    #[error("Cannot write {value} to {path} ({attempts} attempts)")]
    Write {
        /// The file.
        path: PathBuf,
        /// "1" or "0".
        value: &'static str,
        /// How many writes were tried.
        attempts: u32,
        /// The last write's error.
        #[source]
        source: io::Error,
    },
    /// The kernel has no device for this CPU (never plugged, or removed).
    #[error("CPU {0} is not registered")]
    NotRegistered(u32),
    /// The CPU has no `online` file: the kernel keeps it online and will not take it down.
    #[error("CPU {0} cannot be taken offline (it has no online control)")]
    NotHotpluggable(u32),
    /// The blocking task doing the write died.
    #[error("CPU {cpu}: the sysfs task failed: {detail}")]
    Task {
        /// The CPU.
        cpu: u32,
        /// What the runtime reported.
        detail: String,
    },
}

/// The CPU sets the kernel publishes, each sorted ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSets {
    /// /sys/devices/system/cpu/online.
    pub online: Vec<u32>,
    /// /sys/devices/system/cpu/present.
    pub present: Vec<u32>,
    /// /sys/devices/system/cpu/possible.
    pub possible: Vec<u32>,
    /// /sys/devices/system/cpu/enabled (Linux 6.11+); `None` when the kernel has no such file.
    pub enabled: Option<Vec<u32>>,
}

/// The CPU part of a sysfs tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSysfs {
    /// `<sysfs root>/devices/system/cpu`.
    dir: PathBuf,
}

impl CpuSysfs {
    /// The CPU files of the sysfs mounted at `sysfs_root` (`/sys` in the guest).
    pub fn new(sysfs_root: &Path) -> Self {
        Self {
            dir: sysfs_root.join("devices/system/cpu"),
        }
    }

    fn mask(&self, name: &str) -> Result<Option<Vec<u32>>, SysfsError> {
        let path = self.dir.join(name);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SysfsError::Read { path, source }),
        };
        parse_cpu_set(&text)
            .map(Some)
            .map_err(|detail| SysfsError::Parse { path, detail })
    }

    fn required_mask(&self, name: &str) -> Result<Vec<u32>, SysfsError> {
        self.mask(name)?.ok_or_else(|| SysfsError::Read {
            path: self.dir.join(name),
            source: io::ErrorKind::NotFound.into(),
        })
    }

    /// Reads the online, present, possible and (where the kernel has it) enabled masks.
    pub fn read_sets(&self) -> Result<CpuSets, SysfsError> {
        Ok(CpuSets {
            online: self.required_mask("online")?,
            present: self.required_mask("present")?,
            possible: self.required_mask("possible")?,
            enabled: self.mask("enabled")?,
        })
    }

    fn cpu_dir(&self, cpu: u32) -> PathBuf {
        self.dir.join(format!("cpu{cpu}"))
    }

    /// Whether `cpu` is online, from its own `online` file. A registered CPU without that file
    /// is one the kernel does not let go offline (the boot CPU on many machines): online.
    pub fn is_online(&self, cpu: u32) -> Result<bool, SysfsError> {
        let dir = self.cpu_dir(cpu);
        let path = dir.join("online");
        match fs::read_to_string(&path) {
            Ok(text) => match text.trim() {
                "1" => Ok(true),
                "0" => Ok(false),
                other => Err(SysfsError::Parse {
                    path,
                    detail: format!("{other:?} is not 0 or 1"),
                }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if dir.is_dir() {
                    Ok(true)
                } else {
                    Err(SysfsError::NotRegistered(cpu))
                }
            }
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// The CPUs the kernel has registered (a `cpu<n>` directory) that are offline, ascending.
    pub fn registered_offline(&self) -> Result<Vec<u32>, SysfsError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| SysfsError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let mut offline = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(cpu) = name
                .to_str()
                .and_then(|n| n.strip_prefix("cpu"))
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A CPU removed while we scan, or an unreadable file: not ours to online now; the
            // uevents will tell.
            if let Ok(false) = self.is_online(cpu) {
                offline.push(cpu);
            }
        }
        offline.sort_unstable();
        Ok(offline)
    }

    /// One write of "1" or "0" to `cpu`'s `online` file (no retries, blocking).
    pub fn write_online(&self, cpu: u32, online: bool) -> Result<(), io::Error> {
        let value: &[u8] = if online { b"1" } else { b"0" };
        // No create and no truncate: sysfs files exist or the CPU is not there.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(self.cpu_dir(cpu).join("online"))?;
        file.write_all(value)
    }
}

/// Whether a failed write to `online` may succeed if tried again: EBUSY (CPU hotplug temporarily
/// disabled, e.g. around suspend) and EAGAIN. Everything else (EIO when the firmware refuses
/// CPU_ON, EINVAL, EPERM) will not change by retrying.
pub fn is_retryable(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
}

/// Brings `cpu` to `online` (true) or offline (false): nothing to do when it already is;
/// otherwise writes its `online` file on the blocking pool, retrying EBUSY/EAGAIN a few times.
/// Returns whether it wrote (false: the CPU already was in that state).
pub async fn set_online(sysfs: &CpuSysfs, cpu: u32, online: bool) -> Result<bool, SysfsError> {
    let value = if online { "1" } else { "0" };
    let mut pause = RETRY_PAUSE;
    let mut attempt = 1;
    loop {
        let files = sysfs.clone();
        let result = tokio::task::spawn_blocking(move || {
            if files.is_online(cpu)? == online {
                return Ok(Ok(false));
            }
            Ok(files.write_online(cpu, online).map(|()| true))
        })
        .await
        .map_err(|e| SysfsError::Task {
            cpu,
            detail: e.to_string(),
        })?;
        match result {
            Ok(Ok(wrote)) => return Ok(wrote),
            Err(e) => return Err(e),
            // A registered CPU without an online file reads as online; so only offlining gets here.
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if sysfs.cpu_dir(cpu).is_dir() {
                    SysfsError::NotHotpluggable(cpu)
                } else {
                    SysfsError::NotRegistered(cpu)
                })
            }
            Ok(Err(e)) if is_retryable(&e) && attempt < ONLINE_ATTEMPTS => {
                crate::debug!("cpu{cpu}: writing {value} to online: {e}; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            Ok(Err(source)) => {
                return Err(SysfsError::Write {
                    path: sysfs.cpu_dir(cpu).join("online"),
                    value,
                    attempts: attempt,
                    source,
                })
            }
        }
    }
}

/// A sysfs-shaped directory of plain files for tests.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;

    /// A temp dir laid out like /sys/devices/system/cpu; removed on drop.
    pub struct FakeSysfs {
        /// The "sysfs root".
        pub root: PathBuf,
    }

    impl FakeSysfs {
        /// CPUs 0..`possible` possible and present, `registered` of them with a cpu<n> dir whose
        /// `online` reads as in `online` (CPU 0 gets no online file, as on many arm64 machines).
        pub fn new(name: &str, possible: u32, online: &[u32], registered: &[u32]) -> Self {
            let root =
                std::env::temp_dir().join(format!("accordion-cpu-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            let dir = root.join("devices/system/cpu");
            fs::create_dir_all(&dir).expect("mkdir");
            let all = format!("0-{}\n", possible - 1);
            fs::write(dir.join("possible"), &all).expect("write");
            fs::write(dir.join("present"), &all).expect("write");
            let fake = Self { root };
            fake.set_mask("online", online);
            for &cpu in registered {
                fs::create_dir_all(dir.join(format!("cpu{cpu}"))).expect("mkdir");
                if cpu != 0 {
                    let state = if online.contains(&cpu) { "1\n" } else { "0\n" };
                    fs::write(dir.join(format!("cpu{cpu}/online")), state).expect("write");
                }
            }
            fake
        }

        /// Writes mask file `name` ("online", "enabled", …).
        pub fn set_mask(&self, name: &str, cpus: &[u32]) {
            let text = format!("{}\n", crate::sysinfo::format_cpulist(cpus));
            fs::write(self.sysfs().dir.join(name), text).expect("write mask");
        }

        /// The content of cpu<n>/online.
        pub fn online_file(&self, cpu: u32) -> String {
            fs::read_to_string(self.sysfs().cpu_dir(cpu).join("online")).expect("read online")
        }

        /// Path of cpu<n>.
        pub fn cpu_dir(&self, cpu: u32) -> PathBuf {
            self.sysfs().cpu_dir(cpu)
        }

        /// The CpuSysfs of this tree.
        pub fn sysfs(&self) -> CpuSysfs {
            CpuSysfs::new(&self.root)
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::FakeSysfs;
    use super::*;

    #[test]
    fn test_read_sets_reads_masks_and_enabled_only_when_present() {
        let fake = FakeSysfs::new("sets", 8, &[0, 1], &[0, 1, 2]);
        let without = fake.sysfs().read_sets().expect("sets");
        fake.set_mask("enabled", &[0, 1, 2]);
        let with = fake.sysfs().read_sets().expect("sets");
        assert_eq!(
            without,
            CpuSets {
                online: vec![0, 1],
                present: (0..8).collect(),
                possible: (0..8).collect(),
                enabled: None
            }
        );
        assert_eq!(with.enabled, Some(vec![0, 1, 2]));
    }

    #[test]
    fn test_read_sets_garbage_mask_is_parse_error() {
        let fake = FakeSysfs::new("garbage", 4, &[0], &[0]);
        fs::write(fake.root.join("devices/system/cpu/online"), "0-zz\n").expect("write");
        assert!(matches!(
            fake.sysfs().read_sets(),
            Err(SysfsError::Parse { .. })
        ));
    }

    #[test]
    fn test_registered_offline_lists_only_offline_cpu_dirs() {
        let fake = FakeSysfs::new("scan", 8, &[0, 1], &[0, 1, 2, 5]);
        fs::create_dir_all(fake.root.join("devices/system/cpu/cpufreq")).expect("mkdir");
        assert_eq!(fake.sysfs().registered_offline().expect("scan"), vec![2, 5]);
    }

    #[test]
    fn test_is_online_distinguishes_unregistered_and_fixed_cpus() {
        let fake = FakeSysfs::new("state", 4, &[0], &[0, 1]);
        let sysfs = fake.sysfs();
        assert!(sysfs.is_online(0).expect("cpu0 has no online file"));
        assert!(!sysfs.is_online(1).expect("cpu1"));
        assert!(matches!(
            sysfs.is_online(3),
            Err(SysfsError::NotRegistered(3))
        ));
    }

    #[test]
    fn test_is_retryable_only_ebusy_and_eagain() {
        let retryable: Vec<bool> = [
            libc::EBUSY,
            libc::EAGAIN,
            libc::EIO,
            libc::EINVAL,
            libc::EPERM,
        ]
        .into_iter()
        .map(|errno| is_retryable(&io::Error::from_raw_os_error(errno)))
        .collect();
        assert_eq!(retryable, [true, true, false, false, false]);
    }

    #[tokio::test]
    async fn test_set_online_writes_one_to_offline_cpu() {
        let fake = FakeSysfs::new("write", 4, &[0], &[0, 1]);
        let wrote = set_online(&fake.sysfs(), 1, true).await.expect("online");
        let again = set_online(&fake.sysfs(), 1, true).await.expect("online");
        assert_eq!((wrote, again), (true, false));
        assert_eq!(fake.online_file(1), "1\n");
    }

    #[tokio::test]
    async fn test_set_online_refuses_unregistered_and_fixed_cpus() {
        let fake = FakeSysfs::new("refuse", 4, &[0], &[0, 1]);
        let sysfs = fake.sysfs();
        let unregistered = set_online(&sysfs, 3, true).await;
        let fixed = set_online(&sysfs, 0, false).await;
        let fixed_online = set_online(&sysfs, 0, true).await;
        assert!(
            matches!(unregistered, Err(SysfsError::NotRegistered(3))),
            "{unregistered:?}"
        );
        assert!(
            matches!(fixed, Err(SysfsError::NotHotpluggable(0))),
            "{fixed:?}"
        );
        assert!(fixed_online.is_ok(), "{fixed_online:?}");
    }

    #[tokio::test]
    async fn test_set_online_write_error_is_not_retried_and_named() {
        let fake = FakeSysfs::new("eisdir", 4, &[0], &[0]);
        // An `online` that is a directory: open for writing fails with EISDIR.
        fs::create_dir_all(fake.cpu_dir(2).join("online")).expect("mkdir");
        let err = set_online(&fake.sysfs(), 2, true)
            .await
            .expect_err("eisdir");
        assert!(
            matches!(
                err,
                SysfsError::Read { .. } | SysfsError::Write { attempts: 1, .. }
            ),
            "{err:?}"
        );
    }
}
