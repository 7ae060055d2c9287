//! accordion-share: the host side of a pod's virtio-fs share, made so that a hostile guest
//! cannot steer where the shim mounts (docs/architecture.md, "The pod's share").
//!
//! The guest is root in its VM and can write whatever virtiofsd lets it write. If the directory
//! virtiofsd exports were the one the shim builds containers in, the guest could swap a directory
//! the shim is about to mount on for a symlink and have a volume mounted over a host path, or a
//! host file truncated (the class of Kata Containers' CVE-2020-2026). So, in a pod's state
//! directory `<dir>` (root only):
//!
//! - `mounts/` is where the shim works: one `<container>/` each, with the root filesystem on
//!   `rootfs/` and every host bind on `mounts/N`. It is a bind mount of itself, taken out of any
//!   peer group (the state directory's mount may be shared, as `/` is under systemd) and made
//!   shared in a peer group of its own.
//! - `share/`, what virtiofsd exports, is a clone of `mounts/` made read-only (and nosuid, nodev)
//!   and a slave of that peer group before it is attached (on a private bind of `share/` itself,
//!   so that it stays a slave only). Every mount made under `mounts/` is
//!   propagated to it with its own flags (a root filesystem and a read-write volume stay
//!   writable), but the directories and files of `mounts/` itself are read-only there: the guest
//!   cannot create, rename or replace anything the shim resolves.
//! - `stage/` is a private bind mount of itself where a root filesystem is first mounted by
//!   containerd's mount code (which takes a path), then cloned into a detached tree and moved onto
//!   its target by descriptor.
//!
//! virtiofsd runs with `--sandbox namespace`: it copies this mount namespace, makes every mount a
//! slave, clones `share/` recursively and pivots into the clone. Copies of a slave are slaves of
//! the same master (mount_namespaces(7); Documentation/filesystems/sharedsubtree.rst), so its root
//! is a slave of `mounts/`' peer group too, and containers mounted after virtiofsd started reach
//! it, while nothing it does propagates back.
//!
//! Every path under `<dir>` is resolved with openat2(2) from a directory descriptor, with
//! RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV: the kernel checks every component in
//! one call (no symlink, not even the last; no ".."; no mount crossed, so never through a
//! container's root filesystem or volume), where a hand-written O_NOFOLLOW walk would take a
//! syscall per component and its own checks for "..". Mounts are made between descriptors
//! (open_tree(OPEN_TREE_CLONE | AT_RECURSIVE), mount_setattr, move_mount), read-only (the bind's
//! top mount, or every mount of it when recursive) is set on the detached tree before it becomes
//! visible, files are
//! created O_CREAT | O_EXCL | O_NOFOLLOW, and a failed Create unmounts exactly the mounts it made
//! through their descriptors. These calls need Linux 5.12; production hosts run ≥ 6.4.

mod mountinfo;
mod sys;

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

pub use mountinfo::{mounts_under, remove_dir_unless_mounted, unmount_all_under};
use sys::Propagation;

/// Where the shim mounts containers, in a pod's state directory.
pub const MOUNTS_DIR: &str = "mounts";
/// The read-only view of [`MOUNTS_DIR`] that virtiofsd exports.
pub const SHARE_DIR: &str = "share";
/// Where root filesystems are mounted before they are moved into a container's directory.
pub const STAGE_DIR: &str = "stage";
/// Longest container id: it names a directory.
const MAX_ID_LEN: usize = 255;
/// Deepest bind target below a container's directory (`mounts/N` is two).
const MAX_TARGET_DEPTH: usize = 4;
/// Most mounts a stage directory may have stacked on it before it is given up.
const MAX_STACKED: usize = 16;

/// Errors of the share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("invalid container id {0:?}: it names a directory, so it must be a plain file name")]
    Id(String),
    #[error("bind target {0:?} is not a relative path of at most {MAX_TARGET_DEPTH} plain names")]
    Target(PathBuf),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("{0} is not set up (no mount there)")]
    NotSetUp(PathBuf),
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot open {0} without following a symlink or crossing a mount")]
    Open(PathBuf, #[source] io::Error),
    #[error("cannot take the mounts of {0}")]
    Clone(PathBuf, #[source] io::Error),
    #[error("cannot set the mount attributes of {0}")]
    Attributes(PathBuf, #[source] io::Error),
    #[error("cannot mount {what} on {target}")]
    Attach {
        what: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount the root filesystem on {target}: {message}")]
    Rootfs { target: PathBuf, message: String },
    #[error("the root filesystem mount left nothing mounted on {0}")]
    NotMounted(PathBuf),
    #[error("cannot read the mount of {0}")]
    MountId(PathBuf, #[source] io::Error),
}

/// A host file or directory bind-mounted into a container's directory for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host file or directory (a path containerd or the kubelet named; symlinks in it are
    /// followed, as runc does).
    pub source: PathBuf,
    /// Where it is mounted, relative to the container's directory (`mounts/N`).
    pub target: PathBuf,
    pub is_dir: bool,
    /// Read-only: the bind itself (OCI `ro`, as runc makes it), its submounts keeping their own
    /// flags ...
    pub readonly: bool,
    /// ... unless this is set too (OCI `rro`, Kubernetes' recursiveReadOnly): every submount
    /// read-only as well.
    pub recursive_readonly: bool,
}

/// A container's root filesystem.
pub enum Rootfs<'a> {
    /// A host directory bound recursively (the bundle's rootfs, for `ctr run --rootfs`).
    Bind(&'a Path),
    /// A filesystem mounted by this function on the (empty, root-only) directory it is given:
    /// containerd's snapshot mount.
    Mount(&'a dyn Fn(&Path) -> Result<(), String>),
}

/// The share of the pod whose state directory is `dir`.
#[derive(Debug, Clone)]
pub struct PodShare {
    dir: PathBuf,
}

impl PodShare {
    /// The share in state directory `dir`, set up by [`PodShare::create`] (possibly by a shim
    /// that has died since).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Sets up `mounts/`, `share/` and `stage/` in `dir`, a new state directory (see the crate's
    /// documentation). On failure whatever was mounted is unmounted again.
    pub fn create(dir: &Path) -> Result<Self, ShareError> {
        let share = Self::at(dir);
        let state = sys::open_path(dir).map_err(|e| ShareError::Open(dir.to_owned(), e))?;
        for (name, mode) in [(MOUNTS_DIR, 0o711), (SHARE_DIR, 0o711), (STAGE_DIR, 0o700)] {
            sys::make_dir(&state, Path::new(name), mode)
                .map_err(|e| create_error(dir.join(name), e))?;
        }
        let made = share.mount_skeleton(&state);
        if made.is_err() {
            share.unmount_all();
        }
        made.map(|()| share)
    }

    fn mount_skeleton(&self, state: &OwnedFd) -> Result<(), ShareError> {
        let mounts = self.bind_onto_itself(state, MOUNTS_DIR)?;
        let path = self.dir.join(MOUNTS_DIR);
        // Private first: leave the peer group of the state directory's mount (whose other
        // members, in other namespaces, would otherwise receive every container mount), then a
        // peer group of its own for the view and virtiofsd to be slaves of.
        for propagation in [Propagation::Private, Propagation::Shared] {
            sys::set_attributes(mounts.as_fd(), 0, propagation, false)
                .map_err(|e| ShareError::Attributes(path.clone(), e))?;
        }
        // Nothing is mounted under mounts/ yet: later mounts reach the view by propagation.
        let view =
            sys::clone_mount(mounts.as_fd(), false).map_err(|e| ShareError::Clone(path, e))?;
        let target = self.dir.join(SHARE_DIR);
        sys::set_attributes(
            view.as_fd(),
            libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
            Propagation::Slave,
            false,
        )
        .map_err(|e| ShareError::Attributes(target.clone(), e))?;
        // On a private bind of share/ rather than on the state directory's mount: attached below
        // a shared mount, the view would become shared itself and copied to that mount's peers.
        let at = self.bind_onto_itself(state, SHARE_DIR)?;
        sys::set_attributes(at.as_fd(), 0, Propagation::Private, false)
            .map_err(|e| ShareError::Attributes(target.clone(), e))?;
        sys::attach(view.as_fd(), at.as_fd()).map_err(|source| ShareError::Attach {
            what: self.dir.join(MOUNTS_DIR),
            target: target.clone(),
            source,
        })?;
        let stage = self.bind_onto_itself(state, STAGE_DIR)?;
        sys::set_attributes(stage.as_fd(), 0, Propagation::Private, false)
            .map_err(|e| ShareError::Attributes(self.dir.join(STAGE_DIR), e))
    }

    /// Binds directory `name` of the state directory onto itself; returns the new mount's root.
    fn bind_onto_itself(&self, state: &OwnedFd, name: &str) -> Result<OwnedFd, ShareError> {
        let path = self.dir.join(name);
        let dir =
            sys::open_dir(state, Path::new(name)).map_err(|e| ShareError::Open(path.clone(), e))?;
        let tree =
            sys::clone_mount(dir.as_fd(), false).map_err(|e| ShareError::Clone(path.clone(), e))?;
        sys::attach(tree.as_fd(), dir.as_fd()).map_err(|source| ShareError::Attach {
            what: path.clone(),
            target: path,
            source,
        })?;
        Ok(tree)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory virtiofsd exports (read-only: see the crate's documentation).
    pub fn exported(&self) -> PathBuf {
        self.dir.join(SHARE_DIR)
    }

    /// Container `id`'s directory, where the shim mounts (the guest sees it as `<share>/<id>`).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(MOUNTS_DIR).join(id)
    }

    /// Creates container `id`'s directory and mounts its root filesystem on `rootfs/` and each
    /// bind on its target. Either all of it is mounted, or an error says what failed and
    /// nothing this call mounted is left mounted (the directory is the caller's to remove).
    pub fn mount_container(
        &self,
        id: &str,
        rootfs: Rootfs<'_>,
        binds: &[HostBind],
    ) -> Result<(), ShareError> {
        validate_id(id)?;
        for b in binds {
            target_components(&b.target)?;
        }
        let mounts = self.open_mounts()?;
        let path = self.container_dir(id);
        sys::make_dir(&mounts, Path::new(id), 0o755).map_err(|e| create_error(path.clone(), e))?;
        let dir =
            sys::open_dir(&mounts, Path::new(id)).map_err(|e| ShareError::Open(path.clone(), e))?;
        let mut made = Vec::new();
        let result = self.mount_into(&dir, &path, id, rootfs, binds, &mut made);
        if result.is_err() {
            for mount in made.iter().rev() {
                if let Err(e) = sys::detach(mount.as_fd()) {
                    log::warn!("cannot unmount a mount of {} again: {e}", path.display());
                }
            }
        }
        result
    }

    fn mount_into(
        &self,
        dir: &OwnedFd,
        path: &Path,
        id: &str,
        rootfs: Rootfs<'_>,
        binds: &[HostBind],
        made: &mut Vec<OwnedFd>,
    ) -> Result<(), ShareError> {
        let target = path.join("rootfs");
        sys::make_dir(dir, Path::new("rootfs"), 0o755)
            .map_err(|e| create_error(target.clone(), e))?;
        let at = sys::open_dir(dir, Path::new("rootfs"))
            .map_err(|e| ShareError::Open(target.clone(), e))?;
        let (tree, what) = match rootfs {
            Rootfs::Bind(source) => (clone_source(source, false, false)?, source.to_owned()),
            Rootfs::Mount(mount) => (self.staged(id, mount)?, self.dir.join(STAGE_DIR).join(id)),
        };
        sys::attach(tree.as_fd(), at.as_fd()).map_err(|source| ShareError::Attach {
            what,
            target,
            source,
        })?;
        made.push(tree);
        for b in binds {
            made.push(bind(dir, path, b)?);
        }
        Ok(())
    }

    /// Mounts a root filesystem with `mount` on `stage/<id>`, and returns a detached clone of it
    /// (the staged mount itself is gone again, whatever happened).
    fn staged(
        &self,
        id: &str,
        mount: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<OwnedFd, ShareError> {
        let stage_path = self.dir.join(STAGE_DIR);
        let state = sys::open_path(&self.dir).map_err(|e| ShareError::Open(self.dir.clone(), e))?;
        let stage = sys::open_mounted(&state, Path::new(STAGE_DIR))
            .map_err(|e| ShareError::Open(stage_path.clone(), e))?;
        let name = Path::new(id);
        let path = stage_path.join(id);
        unstage(&stage, name, &path);
        sys::make_dir(&stage, name, 0o700).map_err(|e| create_error(path.clone(), e))?;
        let result = staged_clone(&stage, name, &path, mount);
        unstage(&stage, name, &path);
        result
    }

    /// `mounts/`, which must be the mount [`PodShare::create`] made.
    fn open_mounts(&self) -> Result<OwnedFd, ShareError> {
        let path = self.dir.join(MOUNTS_DIR);
        let state = sys::open_path(&self.dir).map_err(|e| ShareError::Open(self.dir.clone(), e))?;
        let mounts = sys::open_mounted(&state, Path::new(MOUNTS_DIR))
            .map_err(|e| ShareError::Open(path.clone(), e))?;
        if mount_id(&state, &self.dir)? == mount_id(&mounts, &path)? {
            return Err(ShareError::NotSetUp(path));
        }
        Ok(mounts)
    }

    /// Unmounts container `id`'s mounts and removes its directory; returns whether it is gone.
    /// A directory that still has a mount under it (or under its view in `share/`) is left in
    /// place, and logged.
    pub fn remove_container(&self, id: &str) -> bool {
        if validate_id(id).is_err() {
            return false;
        }
        let dir = self.container_dir(id);
        let view = self.exported().join(id);
        unmount_all_under(&dir);
        // Gone already with the unmounts above (they propagate to the view); checked anyway.
        unmount_all_under(&view);
        match mounts_under(&view) {
            Ok(left) if left.is_empty() => remove_dir_unless_mounted(&dir),
            Ok(left) => {
                log::warn!(
                    "{} left in place: {} is still mounted",
                    dir.display(),
                    left[left.len() - 1].display()
                );
                false
            }
            Err(e) => {
                log::warn!("{} left in place: {e}", dir.display());
                false
            }
        }
    }

    /// Unmounts everything in the state directory: containers, `share/`, `mounts/`, `stage/`.
    pub fn unmount_all(&self) {
        unmount_all_under(&self.dir);
    }
}

/// Binds `b.source` on `b.target` below container directory `dir` (at `path`); returns the
/// attached mount.
fn bind(dir: &OwnedFd, path: &Path, b: &HostBind) -> Result<OwnedFd, ShareError> {
    let (parents, name) = target_components(&b.target)?;
    // The source first: a missing one fails before anything is created.
    let tree = clone_source(&b.source, b.readonly, b.recursive_readonly)?;
    let mut at_path = path.to_owned();
    let mut parent: Option<OwnedFd> = None;
    for p in parents {
        at_path.push(p);
        let here = parent.as_ref().unwrap_or(dir);
        match sys::make_dir(here, Path::new(p), 0o755) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(ShareError::Create(at_path, e)),
        }
        let next =
            sys::open_dir(here, Path::new(p)).map_err(|e| ShareError::Open(at_path.clone(), e))?;
        parent = Some(next);
    }
    let here = parent.as_ref().unwrap_or(dir);
    let target = at_path.join(name);
    let at = if b.is_dir {
        sys::make_dir(here, Path::new(name), 0o755).map_err(|e| create_error(target.clone(), e))?;
        sys::open_dir(here, Path::new(name)).map_err(|e| ShareError::Open(target.clone(), e))?
    } else {
        sys::create_file(here, Path::new(name)).map_err(|e| create_error(target.clone(), e))?
    };
    sys::attach(tree.as_fd(), at.as_fd()).map_err(|source| ShareError::Attach {
        what: b.source.clone(),
        target,
        source,
    })?;
    Ok(tree)
}

/// A detached recursive copy of the mounts at host path `source`, private (a mount made under
/// the source later does not reach it, so it cannot bring a writable submount into a read-only
/// bind); when `readonly`, its top mount is read-only, and with `recursive` every mount of it.
fn clone_source(source: &Path, readonly: bool, recursive: bool) -> Result<OwnedFd, ShareError> {
    let tree = sys::clone_path(source).map_err(|e| ShareError::Clone(source.to_owned(), e))?;
    let attributes = |attr, recursive| {
        sys::set_attributes(tree.as_fd(), attr, Propagation::Private, recursive)
            .map_err(|e| ShareError::Attributes(source.to_owned(), e))
    };
    attributes(0, true)?;
    if readonly {
        attributes(libc::MOUNT_ATTR_RDONLY, recursive)?;
    }
    Ok(tree)
}

/// Mounts strictly below `dir` (e.g. a bind's target in a container's directory), shallowest
/// first, relative to it, with whether each is read-only: what the guest must bind itself, since
/// a virtio-fs submount it mounts later takes the read-only flag of the mount it appears under.
pub fn submounts(dir: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
    mountinfo::submounts(dir)
}

/// Runs `mount` on `path` (`stage/<name>`) and clones what it mounted there.
fn staged_clone(
    stage: &OwnedFd,
    name: &Path,
    path: &Path,
    mount: &dyn Fn(&Path) -> Result<(), String>,
) -> Result<OwnedFd, ShareError> {
    let below = sys::open_dir(stage, name).map_err(|e| ShareError::Open(path.to_owned(), e))?;
    mount(path).map_err(|message| ShareError::Rootfs {
        target: path.to_owned(),
        message,
    })?;
    let top = sys::open_mounted(stage, name).map_err(|e| ShareError::Open(path.to_owned(), e))?;
    if mount_id(&top, path)? == mount_id(&below, path)? {
        return Err(ShareError::NotMounted(path.to_owned()));
    }
    let tree =
        sys::clone_mount(top.as_fd(), true).map_err(|e| ShareError::Clone(path.to_owned(), e))?;
    sys::set_attributes(tree.as_fd(), 0, Propagation::Private, true)
        .map_err(|e| ShareError::Attributes(path.to_owned(), e))?;
    Ok(tree)
}

/// Unmounts whatever is stacked on `stage/<name>` and removes it, if it exists.
fn unstage(stage: &OwnedFd, name: &Path, path: &Path) {
    let Ok(stage_id) = sys::mount_id(stage.as_fd()) else {
        return;
    };
    for _ in 0..MAX_STACKED {
        let Ok(top) = sys::open_mounted(stage, name) else {
            break;
        };
        if sys::mount_id(top.as_fd()).map_or(true, |id| id == stage_id) {
            break;
        }
        if let Err(e) = sys::detach(top.as_fd()) {
            log::warn!("cannot unmount {}: {e}", path.display());
            break;
        }
    }
    match sys::remove_dir(stage, name) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
    }
}

fn mount_id(fd: &OwnedFd, path: &Path) -> Result<u64, ShareError> {
    sys::mount_id(fd.as_fd()).map_err(|e| ShareError::MountId(path.to_owned(), e))
}

fn create_error(path: PathBuf, e: io::Error) -> ShareError {
    if e.raw_os_error() == Some(libc::EEXIST) {
        ShareError::Exists(path)
    } else {
        ShareError::Create(path, e)
    }
}

/// A container id names a directory: one plain path component.
fn validate_id(id: &str) -> Result<(), ShareError> {
    let plain = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && !id.contains(['/', '\0']);
    if plain {
        Ok(())
    } else {
        Err(ShareError::Id(id.chars().take(MAX_ID_LEN).collect()))
    }
}

/// A bind target's directories and final name: plain names only, at most
/// [`MAX_TARGET_DEPTH`] of them.
fn target_components(target: &Path) -> Result<(Vec<&OsStr>, &OsStr), ShareError> {
    let bad = || ShareError::Target(target.to_owned());
    let mut names = Vec::new();
    for c in target.components() {
        match c {
            Component::Normal(n) if !n.as_encoded_bytes().contains(&0) => names.push(n),
            _ => return Err(bad()),
        }
    }
    if names.len() > MAX_TARGET_DEPTH {
        return Err(bad());
    }
    let name = names.pop().ok_or_else(bad)?;
    Ok((names, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_id_accepts_plain_names_only() {
        assert!(validate_id("c1").is_ok());
        assert!(validate_id("a.b-c_d").is_ok());
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0", &"x".repeat(256)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_target_components_split_plain_relative_paths() {
        let (parents, name) = target_components(Path::new("mounts/3")).expect("valid");
        assert_eq!(parents, vec![OsStr::new("mounts")]);
        assert_eq!(name, OsStr::new("3"));
        let (parents, name) = target_components(Path::new("f")).expect("valid");
        assert!(parents.is_empty());
        assert_eq!(name, OsStr::new("f"));
    }

    #[test]
    fn test_target_components_refuse_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "mounts/../../x",
            "./x",
            "a/b/c/d/e",
        ] {
            assert!(
                matches!(
                    target_components(Path::new(bad)),
                    Err(ShareError::Target(_))
                ),
                "{bad:?} accepted"
            );
        }
    }
}
