//! The system calls the share is made of: lookups that never follow a symlink or leave the
//! directory they start from, and the mount API that works on file descriptors (open_tree,
//! mount_setattr, move_mount; nix wraps none of the three, so they go through libc here).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Opens directory `dir` (a host path the shim chose, e.g. a pod's state directory) as an O_PATH
/// descriptor, refusing a symlink as its last component.
pub(crate) fn open_path(dir: &Path) -> io::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    Ok(nix::fcntl::open(dir, flags, Mode::empty())?)
}

/// Opens directory `name` below `dir` as an O_PATH descriptor: no symlink anywhere (the last
/// component included), no "..", no absolute path, and no mount crossed: what is found is a plain
/// directory of the same mount as `dir`.
pub(crate) fn open_dir(dir: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    lookup(dir, name, ResolveFlag::RESOLVE_NO_XDEV)
}

/// Like [`open_dir`], but onto whatever is mounted on `name` (the root of the top mount there).
pub(crate) fn open_mounted(dir: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    lookup(dir, name, ResolveFlag::empty())
}

fn lookup(dir: impl AsFd, name: &Path, extra: ResolveFlag) -> io::Result<OwnedFd> {
    // No O_NOFOLLOW: with O_PATH it would open a trailing symlink itself; RESOLVE_NO_SYMLINKS
    // refuses it (ELOOP) like any other.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | extra);
    Ok(openat2(dir, name, how)?)
}

/// Creates the empty file `name` in `dir`: it must not exist (O_EXCL, so a symlink planted there
/// is never followed and nothing is truncated).
pub(crate) fn create_file(dir: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(
            OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        )
        .mode(Mode::from_bits_truncate(0o644))
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    Ok(openat2(dir, name, how)?)
}

/// Creates directory `name` (one component: mkdirat never follows the last one) in `dir`.
pub(crate) fn make_dir(dir: impl AsFd, name: &Path, mode: u32) -> io::Result<()> {
    Ok(nix::sys::stat::mkdirat(
        dir,
        name,
        Mode::from_bits_truncate(mode),
    )?)
}

/// Removes the empty directory `name` (one component) from `dir`.
pub(crate) fn remove_dir(dir: impl AsFd, name: &Path) -> io::Result<()> {
    Ok(unlinkat(dir, name, UnlinkatFlags::RemoveDir)?)
}

/// A detached copy of the mount tree at host path `path` (recursive: its submounts come along).
pub(crate) fn clone_path(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | attr_flag(libc::AT_RECURSIVE);
    open_tree(libc::AT_FDCWD, &path, flags)
}

/// A detached copy of the mount whose root `mount` is, with its submounts when `recursive`.
pub(crate) fn clone_mount(mount: BorrowedFd<'_>, recursive: bool) -> io::Result<OwnedFd> {
    let mut flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | attr_flag(libc::AT_EMPTY_PATH);
    if recursive {
        flags |= attr_flag(libc::AT_RECURSIVE);
    }
    open_tree(mount.as_raw_fd(), c"", flags)
}

fn open_tree(dir: RawFd, path: &std::ffi::CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: open_tree reads the NUL-terminated `path` and returns a new descriptor or -1; it
    // writes no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, dir, path.as_ptr(), flags) };
    owned_fd(fd)
}

/// The AT_* flags are `c_int` in libc but open_tree takes them in a `c_uint`; all are positive.
fn attr_flag(flag: libc::c_int) -> libc::c_uint {
    libc::c_uint::try_from(flag).unwrap_or(0)
}

/// Mount propagation types for [`set_attributes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagation {
    Private,
    Shared,
    Slave,
}

/// mount_setattr(2) on the mount tree whose root is `mount` (detached or attached): sets
/// `attr_set` (MOUNT_ATTR_*) and the propagation type, on every mount of the tree when
/// `recursive`.
pub(crate) fn set_attributes(
    mount: BorrowedFd<'_>,
    attr_set: u64,
    propagation: Propagation,
    recursive: bool,
) -> io::Result<()> {
    let propagation: u64 = match propagation {
        Propagation::Private => libc::MS_PRIVATE,
        Propagation::Shared => libc::MS_SHARED,
        Propagation::Slave => libc::MS_SLAVE,
    };
    let mut attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr reads `attr` (whose size is passed along) and the empty path, and
    // writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &mut attr as *mut libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches the detached tree `tree` onto `target` (move_mount(2) between two descriptors: no
/// path is looked up). Afterwards `tree` names the attached mount.
pub(crate) fn attach(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: move_mount reads the two empty paths and the two descriptors; it writes no memory
    // of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lazily unmounts the mount whose root `mount` is, wherever its mount point is now: the
/// /proc/self/fd magic link leads to this descriptor's mount and nowhere else, so it is followed
/// (UMOUNT_NOFOLLOW would refuse the link itself).
pub(crate) fn detach(mount: BorrowedFd<'_>) -> io::Result<()> {
    let link = format!("/proc/self/fd/{}", mount.as_raw_fd());
    Ok(umount2(link.as_str(), MntFlags::MNT_DETACH)?)
}

/// Lazily unmounts the top mount on `point`, an absolute path from /proc/self/mountinfo, without
/// following a symlink in its last component.
pub(crate) fn unmount_path(point: &Path) -> io::Result<()> {
    Ok(umount2(
        point,
        MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
    )?)
}

/// The id of the mount `fd` is on (/proc/self/fdinfo's `mnt_id`).
pub(crate) fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no mnt_id in fdinfo"))
}

fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
