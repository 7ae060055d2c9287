//! Process file descriptors (pidfd_open(2), pidfd_send_signal(2)): a handle on one process that
//! a recycled pid can never redirect. Hand-written: nix 0.31 has no pidfd API, and these are two
//! system calls.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd. It becomes readable (POLLIN) when the process exits.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd for the process that has `pid` now.
    pub fn open(pid: u32) -> io::Result<Self> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "fd out of range"))?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `signal` to the process (ESRCH once it has exited, whatever has its pid since).
    pub fn send_signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal reads only its arguments (info is null, flags 0).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Whether the process has exited (a poll of the fd, without waiting).
    pub fn exited(&self) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives for the duration of the call; timeout 0.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// The fd, for an event loop (tokio's `AsyncFd`).
    pub fn into_owned(self) -> OwnedFd {
        self.0
    }
}

impl PidFd {
    /// Reaps the process once it has exited and says how it ended ("exited with status 0",
    /// "killed by SIGSYS"). ECHILD: it is not this process's child, or was reaped already;
    /// WouldBlock: it still runs.
    pub fn reap(&self) -> io::Result<String> {
        /// waitid's idtype for a pidfd (Linux 5.4).
        const P_PIDFD: libc::idtype_t = 3;
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t, which lives for the call.
        let rc = unsafe {
            libc::waitid(
                P_PIDFD,
                self.0.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled a SIGCHLD siginfo (or left the zeroes: nothing exited yet).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(match info.si_code {
            libc::CLD_EXITED => format!("exited with status {status}"),
            libc::CLD_KILLED | libc::CLD_DUMPED => match nix::sys::signal::Signal::try_from(status)
            {
                Ok(signal) => format!("killed by {}", signal.as_str()),
                Err(_) => format!("killed by signal {status}"),
            },
            _ => "ended".into(),
        })
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pidfd_open is missing under qemu-user (the aarch64 unit tests): nothing to test there.
    fn supported() -> bool {
        !matches!(PidFd::open(std::process::id()), Err(e) if e.raw_os_error() == Some(libc::ENOSYS))
    }

    #[test]
    fn test_pidfd_sees_its_process_exit_and_is_not_redirected_by_the_pid() {
        if !supported() {
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id()).unwrap();
        let alive = fd.exited().unwrap();
        fd.send_signal(nix::sys::signal::Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(!alive);
        assert!(fd.exited().unwrap());
        let again = fd.send_signal(nix::sys::signal::Signal::SIGKILL);
        assert_eq!(again.unwrap_err().raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn test_reap_says_how_a_child_ended() {
        if !supported() {
            return;
        }
        // Reaped through the pidfd, which is what is tested.
        #[allow(clippy::zombie_processes)]
        let killed = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = PidFd::open(killed.id()).unwrap();
        assert_eq!(fd.reap().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        fd.send_signal(nix::sys::signal::Signal::SIGKILL).unwrap();
        while !fd.exited().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(fd.reap().unwrap(), "killed by SIGKILL");
        assert_eq!(fd.reap().unwrap_err().raw_os_error(), Some(libc::ECHILD));
        #[allow(clippy::zombie_processes)]
        let exited = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let fd = PidFd::open(exited.id()).unwrap();
        while !fd.exited().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(fd.reap().unwrap(), "exited with status 3");
    }
}
