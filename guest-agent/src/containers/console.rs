//! The console socket of OCI runtimes: for a process with a terminal, libcontainer's init opens
//! the pty inside the container and sends the master over a Unix socket that we listen on.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// How long the master may take to arrive once libcontainer has returned (it is sent before
/// the container reports ready, so it is normally queued already).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the console socket.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The socket could not be set up.
    #[error("Cannot listen on the console socket {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The master did not arrive.
    #[error("Cannot receive the terminal from the container")]
    Receive(#[source] io::Error),
}

/// A listening console socket; the file goes away on drop.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens on `path` (a stale file there is replaced).
    pub fn bind(path: &Path) -> Result<Self, ConsoleError> {
        let err = |source| ConsoleError::Listen {
            path: path.to_owned(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket's path, for libcontainer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the container's connection and takes the pty master it sends.
    pub fn receive_master(&self) -> Result<OwnedFd, ConsoleError> {
        self.listener
            .set_nonblocking(true)
            .map_err(ConsoleError::Receive)?;
        let deadline = std::time::Instant::now() + RECEIVE_TIMEOUT;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(ConsoleError::Receive(io::ErrorKind::TimedOut.into()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(ConsoleError::Receive(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(RECEIVE_TIMEOUT)))
            .map_err(ConsoleError::Receive)?;
        // The payload is the pty's name; only the descriptor matters.
        let mut name = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| ConsoleError::Receive(e.into()))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| ConsoleError::Receive(e.into()))? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                fds.extend(received);
            }
        }
        let mut owned = fds.into_iter().map(|fd| {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process for us; nothing
            // else owns them.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        // Extra descriptors (not expected) are closed as `owned` drops.
        owned.next().ok_or_else(|| {
            ConsoleError::Receive(io::Error::other("no descriptor in the console message"))
        })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;
    use std::os::unix::net::UnixStream;

    #[test]
    fn test_receive_master_takes_the_sent_descriptor() {
        let path = std::env::temp_dir().join(format!("accordion-console-{}", std::process::id()));
        let socket = ConsoleSocket::bind(&path).expect("bind");
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let client = UnixStream::connect(socket.path()).expect("connect");
        let fds = [r.as_raw_fd()];
        sendmsg::<UnixAddr>(
            client.as_raw_fd(),
            &[IoSlice::new(b"/dev/pts/0")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let got = socket.receive_master().expect("receive");
        assert!(got.as_raw_fd() >= 0);
        drop(socket);
        assert!(!path.exists());
    }
}
