//! The VMM's jail (docs/security.md, "The VMM's jail"). The shim clones the VMM process into new
//! mount, pid, ipc, uts, net and cgroup namespaces; the VMM then, before it reads a byte the guest
//! wrote: makes every mount private, mounts an empty tmpfs over its state directory and pivots
//! into it (the host's tree is detached), enters a user namespace whose root is an unprivileged
//! host id leased for this sandbox, drops every capability, sets no_new_privs, turns off
//! dumpability and sets rlimits. Its inputs arrived as descriptors, so it needs no host path.
//! Hand-written: these are a dozen system calls in a fixed order, which no crate packages without
//! also wanting to start the process its own way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{chdir, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

/// The default first host uid (and gid) leased to a VMM, and how many there are: one per running
/// sandbox (`host.vmm_id_base`, `host.vmm_ids`). Above the ranges distributions hand out to users
/// and to systemd's dynamic and container users (docs/security.md).
pub const ID_BASE: u32 = 2_000_000_000;
pub const ID_COUNT: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot make the mounts private")]
    Private(#[source] nix::Error),
    #[error("cannot mount the empty root on {0}")]
    MountRoot(PathBuf, #[source] nix::Error),
    #[error("cannot pivot into the empty root")]
    Pivot(#[source] nix::Error),
    #[error("cannot detach the host's tree")]
    Detach(#[source] nix::Error),
    #[error("cannot make the root read-only")]
    ReadOnly(#[source] nix::Error),
    #[error("cannot clear the supplementary groups")]
    Groups(#[source] nix::Error),
    #[error("cannot enter a user namespace")]
    UserNamespace(#[source] nix::Error),
    #[error("cannot take the mapped ids")]
    Ids(#[source] nix::Error),
    #[error("cannot drop capabilities")]
    Capabilities(#[source] io::Error),
    #[error("cannot set {0}")]
    Prctl(&'static str, #[source] io::Error),
    #[error("cannot set {0:?}")]
    Rlimit(Resource, #[source] nix::Error),
    #[error("cannot write the vmm's {0}")]
    IdMap(&'static str, #[source] io::Error),
    #[error("no free vmm id in {0}..{1} (one per running sandbox; host.vmm_ids)")]
    NoFreeId(u32, u64),
    #[error("cannot lease a vmm id in {0}")]
    Lease(PathBuf, #[source] io::Error),
}

/// The namespaces the shim clones the VMM into (the user namespace comes later, from the VMM
/// itself, once it has mounted its root: a mount namespace owned by the host's user namespace
/// cannot be changed from a new one).
pub fn clone_flags() -> CloneFlags {
    CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWCGROUP
}

/// A host id held for one VMM: an exclusive flock on `<dir>/<id>.lock` (`/run/accordion-ids`),
/// released when the lease (the shim's file) is dropped or the shim dies, never by a pid check.
/// The lock files stay (empty, at most [`ID_COUNT`]): removing one could hand its id to two.
#[derive(Debug)]
pub struct IdLease {
    pub id: u32,
    _lock: File,
}

impl IdLease {
    /// The first free id of `base..base + count`, with its lock in `dir`.
    pub fn take(dir: &Path, base: u32, count: u32) -> Result<IdLease, JailError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| JailError::Lease(dir.to_owned(), e))?;
        for n in 0..count {
            let Some(id) = base.checked_add(n) else {
                break;
            };
            let path = dir.join(format!("{id}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| JailError::Lease(path.clone(), e))?;
            // SAFETY: flock on an fd we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(IdLease { id, _lock: file });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(JailError::Lease(path, e));
            }
        }
        Err(JailError::NoFreeId(
            base,
            u64::from(base) + u64::from(count),
        ))
    }
}

/// Shim side: maps root of the VMM's user namespace to `uid`/`gid` on the host.
pub fn write_id_maps(pid: u32, uid: u32, gid: u32) -> Result<(), JailError> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("uid_map"), format!("0 {uid} 1\n"))
        .map_err(|e| JailError::IdMap("uid_map", e))?;
    std::fs::write(proc.join("gid_map"), format!("0 {gid} 1\n"))
        .map_err(|e| JailError::IdMap("gid_map", e))
}

/// VMM side, first half (still root of the host's user namespace, in its own mount namespace):
/// an empty read-only root instead of the host's tree, no supplementary groups, then a user
/// namespace of its own. The shim writes its id maps next.
pub fn enter(root: &Path) -> Result<(), JailError> {
    // Nothing below may propagate back to the host (or in from it).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(JailError::Private)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("accordion-vmm"),
        root,
        Some("tmpfs"),
        flags,
        Some("size=16k,nr_inodes=16,mode=0755"),
    )
    .map_err(|e| JailError::MountRoot(root.to_owned(), e))?;
    chdir(root).map_err(|e| JailError::MountRoot(root.to_owned(), e))?;
    std::fs::create_dir(".old")
        .map_err(|e| JailError::MountRoot(root.to_owned(), nix::Error::from_raw(errno(&e))))?;
    match pivot_root(".", ".old") {
        Ok(()) => {
            chdir("/").map_err(JailError::Pivot)?;
            umount2("/.old", MntFlags::MNT_DETACH).map_err(JailError::Detach)?;
            std::fs::remove_dir("/.old")
                .map_err(|e| JailError::Detach(nix::Error::from_raw(errno(&e))))?;
        }
        // The host's / is the initial rootfs, which cannot be pivoted away from: move the new
        // root over it and chroot (what switch_root does). Without CAP_SYS_CHROOT, which the VMM
        // drops below, a chroot cannot be left.
        Err(nix::Error::EINVAL) => {
            std::fs::remove_dir(".old")
                .map_err(|e| JailError::Pivot(nix::Error::from_raw(errno(&e))))?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(JailError::Pivot)?;
            nix::unistd::chroot(".").map_err(JailError::Pivot)?;
            chdir("/").map_err(JailError::Pivot)?;
        }
        Err(e) => return Err(JailError::Pivot(e)),
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
        None::<&str>,
    )
    .map_err(JailError::ReadOnly)?;
    setgroups(&[]).map_err(JailError::Groups)?;
    unshare(CloneFlags::CLONE_NEWUSER).map_err(JailError::UserNamespace)
}

/// VMM side, second half (after the shim mapped its ids): becomes its user namespace's root (an
/// unprivileged id on the host), keeps no capability in any set, can never gain one
/// (no_new_privs), cannot be ptraced or dumped by its uid, and gets rlimits.
pub fn confine(nofile: u64, nproc: u64, fsize: u64) -> Result<(), JailError> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).map_err(JailError::Ids)?;
    setresuid(root_uid, root_uid, root_uid).map_err(JailError::Ids)?;
    drop_capabilities()?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")?;
    prctl(libc::PR_SET_DUMPABLE, 0, "dumpable")?;
    for (resource, limit) in [
        (Resource::RLIMIT_NOFILE, nofile),
        (Resource::RLIMIT_NPROC, nproc),
        (Resource::RLIMIT_FSIZE, fsize),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(resource, limit, limit).map_err(|e| JailError::Rlimit(resource, e))?;
    }
    Ok(())
}

/// Empties the bounding, ambient, inheritable, permitted and effective sets.
fn drop_capabilities() -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        // EINVAL: a capability this kernel does not know; the loop goes past the last one.
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Capabilities(io::Error::last_os_error()));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(JailError::Capabilities(io::Error::last_os_error()));
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and two data structs (version 3), which live for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(JailError::Capabilities(io::Error::last_os_error()));
    }
    Ok(())
}

fn prctl(option: libc::c_int, value: libc::c_ulong, what: &'static str) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, value, 0, 0, 0) } != 0 {
        return Err(JailError::Prctl(what, io::Error::last_os_error()));
    }
    Ok(())
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_leases_are_distinct_while_held_and_reused_after() {
        let dir = std::env::temp_dir().join(format!("accordion-ids-{}", std::process::id()));
        let take = || IdLease::take(&dir, ID_BASE, 2);
        let a = take().unwrap();
        let b = take().unwrap();
        assert_eq!(a.id, ID_BASE);
        assert_eq!(b.id, ID_BASE + 1);
        assert!(matches!(take(), Err(JailError::NoFreeId(..))));
        drop(a);
        let c = take().unwrap();
        assert_eq!(c.id, ID_BASE);
        drop((b, c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_symlink_planted_as_a_lease_file_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("accordion-ids-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        std::os::unix::fs::symlink(&target, dir.join(format!("{ID_BASE}.lock"))).unwrap();
        assert!(matches!(
            IdLease::take(&dir, ID_BASE, ID_COUNT),
            Err(JailError::Lease(..))
        ));
        assert!(!target.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
