//! What PID 1 owes the guest: the basic filesystems, the host's share, a console, and a clean
//! power-off.
//!
//! Runs only when the agent is PID 1 or is started with `--init`; on a host (tests, `--no-init`)
//! none of this touches the machine.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Errors of PID-1 setup.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("Cannot mount {fstype} on {target}")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A mount point could not be created.
    #[error("Cannot create {target}")]
    MountPoint {
        /// Mount point.
        target: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// /dev/console could not be opened.
    #[error("Cannot open /dev/console")]
    Console(#[source] io::Error),
    /// The root could not be moved to a tmpfs (the step is named).
    #[error("Cannot move the root filesystem to a tmpfs: {step}")]
    RootMove {
        /// What failed.
        step: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Errors of mounting the host's share.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareError {
    /// The command line names a tag no virtio-fs device could have.
    #[error("{SHARE_PARAM}={0:?} is not a virtio-fs tag (1-{MAX_TAG_LEN} bytes, no NUL)")]
    InvalidTag(String),
}

/// The kernel command line parameter naming the virtio-fs tag to mount on [`SHARE_MOUNT`].
pub const SHARE_PARAM: &str = "accordion.share";
/// Where the share is mounted: the root every bundle must be under.
pub const SHARE_MOUNT: &str = crate::containers::BUNDLES_ROOT;
/// The longest virtio-fs tag: the device's config space has 36 bytes for it.
pub const MAX_TAG_LEN: usize = 36;

/// The parameters of a kernel command line, split as the kernel does: at spaces outside double
/// quotes, with the quotes removed. Everything after a lone "--" is init's, not the kernel's, and
/// is left out.
pub fn cmdline_params(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_ascii_whitespace() && !quoted => {
                if started {
                    if current == "--" {
                        return params;
                    }
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started && current != "--" {
        params.push(current);
    }
    params
}

/// The virtio-fs tag `accordion.share=<tag>` names on the kernel command line (the last one when
/// repeated, as the kernel does with its own parameters); `Ok(None)` when there is none.
pub fn share_tag(cmdline: &str) -> Result<Option<String>, ShareError> {
    let Some(tag) = cmdline_params(cmdline)
        .into_iter()
        .filter_map(|p| {
            p.strip_prefix(SHARE_PARAM)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        })
        .next_back()
    else {
        return Ok(None);
    };
    if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
        return Err(ShareError::InvalidTag(tag));
    }
    Ok(Some(tag))
}

/// What became of the host's share at boot, for GetGuestInfo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShareStatus {
    /// The tag the command line named; None when it named none.
    pub tag: Option<String>,
    /// Why the share is not mounted; None when it is, or when none was named.
    pub error: Option<String>,
}

/// Mounts the virtio-fs share the kernel command line (the text of `cmdline`, /proc/cmdline)
/// names on [`SHARE_MOUNT`], creating the directory first. Reports what happened and logs it; a
/// failure is no reason to stop: the agent serves and GetGuestInfo tells the host.
pub fn mount_share(cmdline: &Path) -> ShareStatus {
    let text = match fs::read_to_string(cmdline) {
        Ok(text) => text,
        Err(e) => {
            let error = format!("Cannot read {}: {e}", cmdline.display());
            crate::error!("host share: {error}");
            return ShareStatus {
                tag: None,
                error: Some(error),
            };
        }
    };
    let tag = match share_tag(&text) {
        Ok(None) => return ShareStatus::default(),
        Ok(Some(tag)) => tag,
        Err(e) => {
            crate::error!("host share not mounted: {e}");
            let ShareError::InvalidTag(tag) = &e;
            return ShareStatus {
                tag: Some(tag.clone()),
                error: Some(e.to_string()),
            };
        }
    };
    let result = fs::create_dir_all(SHARE_MOUNT)
        .map_err(|e| format!("Cannot create {SHARE_MOUNT}: {e}"))
        .and_then(|()| {
            // No nosuid/nodev: container images keep their setuid binaries.
            mount(
                Some(tag.as_str()),
                SHARE_MOUNT,
                Some("virtiofs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| format!("Cannot mount virtio-fs tag {tag:?} on {SHARE_MOUNT}: {e}"))
        });
    match result {
        Ok(()) => {
            crate::info!("host share: virtio-fs {tag:?} mounted on {SHARE_MOUNT}");
            ShareStatus {
                tag: Some(tag),
                error: None,
            }
        }
        Err(error) => {
            crate::error!("host share not mounted, bundles stay on the guest's tmpfs: {error}");
            ShareStatus {
                tag: Some(tag),
                error: Some(error),
            }
        }
    }
}

/// statfs(2) magic numbers of the filesystems an initramfs root can be.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Where the new root is assembled; hidden under it once moved.
const NEW_ROOT: &str = "/.accordion-root";

fn root_move_err(step: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let step = step.into();
    move |source| InitError::RootMove { step, source }
}

/// Moves the initramfs root onto a tmpfs mount, as switch_root does: copy every file into a fresh
/// tmpfs, delete the originals (their memory is freed), `MS_MOVE` the tmpfs onto `/` and chroot
/// into it. Why: the initramfs root is the kernel's `rootfs` mount, which has no parent mount, and
/// pivot_root(2) refuses it (EINVAL); containers need pivot_root for a real root of their own.
///
/// Must run first thing in PID 1, while nothing else is mounted and no other thread exists.
/// Returns false (nothing done) when `/` is not a ramfs/tmpfs, or is already a tmpfs mount we made.
pub fn move_root_to_tmpfs() -> Result<bool, InitError> {
    let fs = nix::sys::statfs::statfs("/").map_err(|e| InitError::RootMove {
        step: "statfs /".into(),
        source: e.into(),
    })?;
    let magic = fs.filesystem_type().0 as i64;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return Ok(false);
    }
    let root_dev = fs::symlink_metadata("/")
        .map_err(root_move_err("stat /"))?
        .dev();
    fs::create_dir_all(NEW_ROOT).map_err(root_move_err(format!("mkdir {NEW_ROOT}")))?;
    mount(
        Some("rootfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| InitError::RootMove {
        step: format!("mount tmpfs on {NEW_ROOT}"),
        source: e.into(),
    })?;
    let skip = Path::new(NEW_ROOT);
    if let Err(e) = copy_tree(Path::new("/"), skip, root_dev) {
        // Keep the old root: the agent still serves, only containers' pivot_root will fail.
        let _ = nix::mount::umount(NEW_ROOT);
        return Err(e);
    }
    remove_tree_contents(Path::new("/"), skip, root_dev);
    let step = |what: &str| {
        let what = what.to_owned();
        move |e: nix::Error| InitError::RootMove {
            step: what,
            source: e.into(),
        }
    };
    nix::unistd::chdir(NEW_ROOT).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(step("MS_MOVE"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(true)
}

/// Copies the tree under `from` into `NEW_ROOT` (same relative paths), staying on device `dev`
/// and leaving out `skip`. Ownership, modes, symlinks and device nodes are kept.
fn copy_tree(from: &Path, skip: &Path, dev: u64) -> Result<(), InitError> {
    let entries = fs::read_dir(from).map_err(root_move_err(format!("read {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(root_move_err(format!("read {}", from.display())))?;
        let path = entry.path();
        if path == skip {
            continue;
        }
        let meta = fs::symlink_metadata(&path)
            .map_err(root_move_err(format!("stat {}", path.display())))?;
        if meta.dev() != dev {
            continue;
        }
        let rel = path.strip_prefix("/").unwrap_or(&path);
        let target = Path::new(NEW_ROOT).join(rel);
        let err = root_move_err(format!("copy {}", path.display()));
        let file_type = meta.file_type();
        if file_type.is_dir() {
            fs::create_dir(&target)
                .map_err(root_move_err(format!("mkdir {}", target.display())))?;
            copy_tree(&path, skip, dev)?;
        } else if file_type.is_symlink() {
            let link = fs::read_link(&path)
                .map_err(root_move_err(format!("readlink {}", path.display())))?;
            std::os::unix::fs::symlink(link, &target).map_err(err)?;
        } else if file_type.is_file() {
            fs::copy(&path, &target).map_err(err)?;
        } else {
            // Device nodes, fifos, sockets.
            nix::sys::stat::mknod(
                &target,
                nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT),
                nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(|e| InitError::RootMove {
                step: format!("mknod {}", target.display()),
                source: e.into(),
            })?;
        }
        // Ownership and the mode bits (fs::copy and mkdir apply the umask; setuid bits matter).
        let _ = std::os::unix::fs::lchown(&target, Some(meta.uid()), Some(meta.gid()));
        if !file_type.is_symlink() {
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777));
        }
    }
    Ok(())
}

/// Deletes what `copy_tree` copied, to give the old root's memory back. Best effort: whatever
/// stays is only wasted memory.
fn remove_tree_contents(dir: &Path, skip: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == skip {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree_contents(&path, skip, dev);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

/// One filesystem PID 1 mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    /// Source (the device name for pseudo filesystems).
    pub source: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options.
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);
const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// The filesystems, in dependency order (proc first: mountinfo is how the others are checked).
pub const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    // The kernel's DEVTMPFS_MOUNT is off in Debian's arm64 kernel: PID 1 mounts /dev itself.
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    // gid 5 is "tty" by convention; static glibc has no NSS, so it is numeric.
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0620,gid=5,ptmxmode=0666",
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
];

/// Mount points listed in a /proc/self/mountinfo text (field 5, with the kernel's octal escapes
/// left as they are: our targets contain no characters that need them).
pub fn mount_points(mountinfo: &str) -> Vec<&str> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .collect()
}

/// Mounts every filesystem of [`MOUNTS`] that is not mounted yet (a second run, or a kernel or
/// initramfs that did some of it, is fine). Returns the failures; the agent logs them and serves
/// anyway, since a missing /tmp is no reason to lose the VM.
pub fn mount_all() -> Vec<InitError> {
    let mut errors = Vec::new();
    for spec in MOUNTS {
        let mounted = if spec.target == "/proc" {
            Path::new("/proc/self/mountinfo").exists()
        } else {
            fs::read_to_string("/proc/self/mountinfo")
                .map(|info| mount_points(&info).contains(&spec.target))
                .unwrap_or(false)
        };
        if mounted {
            continue;
        }
        if let Err(source) = fs::create_dir_all(spec.target) {
            errors.push(InitError::MountPoint {
                target: spec.target,
                source,
            });
            continue;
        }
        let data = (!spec.data.is_empty()).then_some(spec.data);
        if let Err(source) = mount(
            Some(spec.source),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            data,
        ) {
            errors.push(InitError::Mount {
                fstype: spec.fstype,
                target: spec.target,
                source,
            });
        }
    }
    // devtmpfs lacks these; shells and tools expect them. Existing ones are left alone.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    errors
}

/// Makes fds 0–2 the console if the kernel could not (an initramfs without /dev/console starts
/// init with no fds at all). Call after /dev is mounted.
pub fn attach_console() -> Result<(), InitError> {
    // SAFETY: F_GETFD only queries descriptor flags; it has no memory effects.
    let stderr_open = unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0;
    if stderr_open {
        return Ok(());
    }
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(InitError::Console)?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto 0–2 replaces descriptors the process does not hold (they were closed,
        // checked above); `console` stays open for the call.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(InitError::Console(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Powers the VM off: every other process gets SIGTERM, then SIGKILL after `grace`; filesystems
/// are synced; reboot(2) with RB_POWER_OFF. Only PID 1 may do this — anywhere else (a host test
/// running as root) it would power off the machine, so the process just exits there.
pub fn power_off(reason: &str, grace: Duration) -> ! {
    crate::info!("powering off: {reason}");
    if std::process::id() != 1 {
        crate::warn!("not PID 1: exiting instead of powering off");
        std::process::exit(0);
    }
    // kill(-1) reaches every process but ourselves. The reaper thread collects the zombies.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    // ESRCH from a null signal to -1 means no other process is left.
    while Instant::now() < deadline && kill(Pid::from_raw(-1), None).is_ok() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_POWER_OFF).err();
    // Only reached if reboot(2) failed; PID 1 must not exit (the kernel would panic), so wait.
    crate::error!("reboot(RB_POWER_OFF) failed: {err:?}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mount_points_from_mountinfo() {
        let info = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                    23 22 0:22 / /sys rw shared:2 - sysfs sysfs rw\n";
        assert_eq!(mount_points(info), vec!["/proc", "/sys"]);
    }

    #[test]
    fn test_cmdline_params_split_like_the_kernel() {
        assert_eq!(
            cmdline_params("console=ttyS0  quiet foo=\"a b\" \"bar=c d\"\n"),
            vec!["console=ttyS0", "quiet", "foo=a b", "bar=c d"]
        );
        assert_eq!(cmdline_params("a -- b c"), vec!["a"]);
        assert_eq!(cmdline_params(""), Vec::<String>::new());
        assert_eq!(cmdline_params("x=\"\""), vec!["x="]);
    }

    #[test]
    fn test_share_tag_absent_is_none() {
        assert_eq!(share_tag("console=hvc0 quiet\n"), Ok(None));
        assert_eq!(share_tag("accordion.shared=x xaccordion.share=y"), Ok(None));
        assert_eq!(share_tag("accordion.share"), Ok(None));
    }

    #[test]
    fn test_share_tag_found_last_wins_quotes_removed() {
        assert_eq!(
            share_tag("quiet accordion.share=pod-1 panic=1\n"),
            Ok(Some("pod-1".into()))
        );
        assert_eq!(
            share_tag("accordion.share=a accordion.share=\"b\""),
            Ok(Some("b".into()))
        );
    }

    #[test]
    fn test_share_tag_after_double_dash_is_init_argument_not_ours() {
        assert_eq!(share_tag("quiet -- accordion.share=x"), Ok(None));
    }

    #[test]
    fn test_share_tag_invalid_is_error() {
        assert_eq!(
            share_tag("accordion.share="),
            Err(ShareError::InvalidTag(String::new()))
        );
        let long = "t".repeat(MAX_TAG_LEN + 1);
        assert_eq!(
            share_tag(&format!("accordion.share={long}")),
            Err(ShareError::InvalidTag(long))
        );
        assert!(share_tag(&format!("accordion.share={}", "t".repeat(MAX_TAG_LEN))).is_ok());
    }

    #[test]
    fn test_mount_share_without_parameter_mounts_nothing() {
        let file = std::env::temp_dir().join(format!("accordion-cmdline-{}", std::process::id()));
        fs::write(&file, "console=hvc0 quiet\n").expect("write");
        let status = mount_share(&file);
        fs::remove_file(&file).expect("cleanup");
        assert_eq!(status, ShareStatus::default());
    }

    #[test]
    fn test_mount_share_unreadable_cmdline_is_reported() {
        let status = mount_share(Path::new("/nonexistent/cmdline"));
        assert_eq!(status.tag, None);
        assert!(status
            .error
            .is_some_and(|e| e.contains("/nonexistent/cmdline")));
    }

    #[test]
    fn test_mounts_proc_first_and_parents_before_children() {
        assert_eq!(MOUNTS[0].target, "/proc");
        for (i, spec) in MOUNTS.iter().enumerate() {
            for later in &MOUNTS[i + 1..] {
                assert!(
                    !spec.target.starts_with(&format!("{}/", later.target)),
                    "{} before its parent {}",
                    spec.target,
                    later.target
                );
            }
        }
    }
}
