//! Who owns a sandbox's state directory: the process that holds an exclusive flock on its `lock`
//! file for as long as it lives. Cleanup asks the lock, never a pid file or a process name: a pid
//! can be recycled by any program, a lock dies with its holder.
//!
//! The lock is taken on a fresh file under a temporary name and only then linked as `lock`, so a
//! `lock` file that nobody holds always means its owner is gone (never "not locked yet").

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use crate::pidfd::PidFd;

const LOCK: &str = "lock";
const LOCK_NEW: &str = ".lock.new";
/// The owner's pid, for people (`accordion ps`) and for signalling it through a pidfd.
pub(crate) const PID_FILE: &str = "pid";

/// What the state directory says about its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Its lock is held: the owner runs.
    Alive,
    /// Its lock is free: the owner exited, crashed or was killed.
    Gone,
    /// No lock yet: the owner is still creating the directory.
    Starting,
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct OwnerLock(#[allow(dead_code)] Flock<File>);

impl OwnerLock {
    /// Takes ownership of the (new, empty) state directory `dir` and records our pid.
    pub fn acquire(dir: &Path) -> io::Result<Self> {
        let new = dir.join(LOCK_NEW);
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&new)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        // link(2), not rename(2): it fails if the directory already has an owner's lock.
        let linked = std::fs::hard_link(&new, dir.join(LOCK));
        let _ = std::fs::remove_file(&new);
        linked?;
        std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id()))?;
        Ok(Self(lock))
    }
}

/// Whether the owner of `dir` is alive.
pub fn owner(dir: &Path) -> Owner {
    let file = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(LOCK))
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Owner::Starting,
        // Anything else (not a regular file we can open): treat as held, never remove it.
        Err(_) => return Owner::Alive,
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_released_on_drop) => Owner::Gone,
        Err(_) => Owner::Alive,
    }
}

/// The pid the owner recorded.
pub fn recorded_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A pidfd on the owner of `dir`, if it is alive. The pidfd is opened before the lock is checked:
/// if the lock is still held afterwards, the recorded pid was the owner's when the pidfd was made,
/// so signals through it reach the owner and nothing else.
pub fn owner_pidfd(dir: &Path) -> Option<PidFd> {
    let pid = recorded_pid(dir)?;
    let pidfd = PidFd::open(pid).ok()?;
    (owner(dir) == Owner::Alive).then_some(pidfd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("accordion-owner-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_owner_is_alive_while_the_lock_is_held_and_gone_after() {
        let dir = scratch("held");
        let lock = OwnerLock::acquire(&dir).unwrap();
        let while_held = owner(&dir);
        drop(lock);
        assert_eq!(while_held, Owner::Alive);
        assert_eq!(owner(&dir), Owner::Gone);
        assert_eq!(recorded_pid(&dir), Some(std::process::id()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_owner_of_a_directory_without_lock_is_starting() {
        let dir = scratch("starting");
        assert_eq!(owner(&dir), Owner::Starting);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_recycled_pid_in_the_pid_file_does_not_make_a_dead_owner_alive() {
        // The owner is gone, and its pid now belongs to a live process running the very same
        // executable (this test): the old "is the pid ours" check would have said alive.
        let dir = scratch("recycled");
        drop(OwnerLock::acquire(&dir).unwrap());
        std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(owner(&dir), Owner::Gone);
        assert!(owner_pidfd(&dir).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_second_owner_cannot_take_a_held_directory() {
        let dir = scratch("twice");
        let _lock = OwnerLock::acquire(&dir).unwrap();
        let second = OwnerLock::acquire(&dir);
        assert_eq!(second.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(owner(&dir), Owner::Alive);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
