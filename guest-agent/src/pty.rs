//! The master side of a pseudo-terminal, as async reads and writes.
//!
//! tokio's pipe types refuse a pty (it is a character device, not a FIFO), so the master is
//! registered with the reactor directly (`AsyncFd`) and read/written with plain syscalls.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use tokio::io::unix::AsyncFd;

/// Errors of pty setup and I/O.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// openpty(3) failed.
    #[error("Cannot open a pseudo-terminal")]
    Open(#[source] nix::Error),
    /// Setting descriptor flags failed.
    #[error("Cannot configure the pseudo-terminal")]
    Configure(#[source] nix::Error),
    /// Registering with the reactor failed.
    #[error("Cannot register the pseudo-terminal")]
    Register(#[source] io::Error),
}

/// A freshly opened pty pair.
#[derive(Debug)]
pub struct Pty {
    /// The agent's side.
    pub master: PtyMaster,
    /// The process's side (its stdin, stdout and stderr).
    pub slave: OwnedFd,
}

/// The master side, shared by the output pump (reads) and the stdin writer (writes).
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), PtyError> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(PtyError::Configure)?;
    Ok(())
}

impl Pty {
    /// Opens a pty. Both ends are close-on-exec, so concurrent execs never inherit each other's
    /// terminals (the slave reaches its own process through dup2, which clears the flag).
    pub fn open() -> Result<Self, PtyError> {
        let pair = openpty(None, None).map_err(PtyError::Open)?;
        set_cloexec(&pair.master)?;
        set_cloexec(&pair.slave)?;
        let flags =
            fcntl(pair.master.as_raw_fd(), FcntlArg::F_GETFL).map_err(PtyError::Configure)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(pair.master.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(PtyError::Configure)?;
        // SAFETY: `pair.master` is an OwnedFd: open, and owned by the AsyncFd from here on, so it
        // stays the same descriptor until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(pair.master) }
            .map_err(|e| PtyError::Register(e.into_parts().1))?;
        Ok(Pty {
            master: PtyMaster { fd },
            slave: pair.slave,
        })
    }
}

impl PtyMaster {
    /// A master opened elsewhere (a container's init sends it over its console socket), made
    /// close-on-exec and non-blocking like [`Pty::open`]'s.
    pub fn from_owned(master: OwnedFd) -> Result<Self, PtyError> {
        set_cloexec(&master)?;
        let flags = fcntl(master.as_raw_fd(), FcntlArg::F_GETFL).map_err(PtyError::Configure)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(master.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(PtyError::Configure)?;
        // SAFETY: `master` is an OwnedFd: open, and owned by the AsyncFd from here on.
        let fd = unsafe { AsyncFd::register(master) }
            .map_err(|e| PtyError::Register(e.into_parts().1))?;
        Ok(PtyMaster { fd })
    }

    /// Reads what the process wrote to its terminal. Returns 0 at end: once no process holds the
    /// slave open, Linux reports EIO on the master, which means exactly that.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(io::Error::from)
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` to the process's terminal input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Sets the terminal size (TIOCSWINSZ); the kernel sends SIGWINCH to the foreground group.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points to a live,
        // properly initialised `Winsize` (nix's alias of libc::winsize) for the whole call.
        let rc = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_master_reads_what_slave_writes() {
        let pty = Pty::open().expect("pty");
        nix::unistd::write(pty.slave.as_fd(), b"hi").expect("write");
        let mut buf = [0u8; 16];
        let n = pty.master.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hi");
    }

    #[tokio::test]
    async fn test_master_read_after_slave_closed_is_eof() {
        let pty = Pty::open().expect("pty");
        drop(pty.slave);
        let mut buf = [0u8; 16];
        assert_eq!(pty.master.read(&mut buf).await.expect("read"), 0);
    }

    #[tokio::test]
    async fn test_resize_visible_on_slave() {
        let pty = Pty::open().expect("pty");
        pty.master.resize(40, 132).expect("resize");
        let mut size = Winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer, which points to a
        // live `Winsize` we own for the whole call.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_row, size.ws_col), (40, 132));
    }
}
