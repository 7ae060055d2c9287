//! Waiting for cgroup v2 event files to change, with inotify on tokio: the kernel raises IN_MODIFY
//! on `cgroup.events` when `populated` or `frozen` flips and on `memory.events` when a counter
//! grows, so a waiting task sleeps until then instead of polling.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

use super::cgroup;

/// Even with inotify, a wait re-reads its file this often: a safety net should a notification
/// ever be missed, cheap over the few seconds a wait lasts.
const RECHECK: Duration = Duration::from_millis(250);

/// The inotify descriptor as tokio's reactor needs it.
#[derive(Debug)]
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify instance whose events are awaited on the tokio reactor.
#[derive(Debug)]
pub struct Watcher {
    fd: AsyncFd<InotifyFd>,
}

impl Watcher {
    /// A new instance with no watches. Must run inside a tokio runtime.
    pub fn new() -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the descriptor is owned by the Inotify moved into the AsyncFd, so it stays open,
        // and the same description, until the AsyncFd drops it; as_raw_fd always returns it.
        let fd =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }?;
        Ok(Self { fd })
    }

    /// Watches `path` for modifications.
    pub fn add(&self, path: &Path) -> io::Result<WatchDescriptor> {
        Ok(self
            .fd
            .get_ref()
            .0
            .add_watch(path, AddWatchFlags::IN_MODIFY)?)
    }

    /// Stops watching; a watch the kernel already removed (its file is gone) is not an error.
    pub fn remove(&self, wd: WatchDescriptor) {
        let _ = self.fd.get_ref().0.rm_watch(wd);
    }

    /// Waits for the next events (at least one).
    pub async fn next(&self) -> io::Result<Vec<InotifyEvent>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                fd.get_ref()
                    .0
                    .read_events()
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))
            }) {
                Ok(Ok(events)) if !events.is_empty() => return Ok(events),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => {}
                Ok(Err(e)) => return Err(e),
                // Spurious readiness: try_io cleared it; wait again.
                Err(_would_block) => {}
            }
        }
    }
}

/// Waits until the flat-keyed file `file` (cgroup.events) shows `key` with value `want`, or
/// `timeout` passes. Returns whether it did. Reading the file fails the wait; without inotify (no
/// instance could be made) the file is re-read every [`RECHECK`].
pub async fn wait_keyed(file: &Path, key: &str, want: u64, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    // Watch first, then read: a change between the two still wakes the wait.
    let watcher = Watcher::new().and_then(|w| w.add(file).map(|_| w));
    if let Err(e) = &watcher {
        crate::warn!(
            "cannot watch {} ({e}); re-reading it every {RECHECK:?}",
            file.display()
        );
    }
    loop {
        // A cgroup file read is a short in-kernel copy: no blocking thread needed.
        let text = std::fs::read_to_string(file)?;
        if cgroup::keyed(&text, key) == Some(want) {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let pause = (deadline - now).min(RECHECK);
        match &watcher {
            Ok(watcher) => {
                // Either way the file is read again; an inotify error leaves the re-reads.
                let _ = tokio::time::timeout(pause, watcher.next()).await;
            }
            Err(_) => tokio::time::sleep(pause).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("accordion-events-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[tokio::test]
    async fn test_wait_keyed_wakes_on_modification() {
        let file = temp_file("wake", "populated 1\nfrozen 0\n");
        let writer = {
            let file = file.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::fs::write(&file, "populated 1\nfrozen 1\n").expect("write");
            })
        };
        let reached = wait_keyed(&file, "frozen", 1, Duration::from_secs(10))
            .await
            .expect("wait");
        writer.await.expect("writer");
        std::fs::remove_file(&file).expect("cleanup");
        assert!(reached);
    }

    #[tokio::test]
    async fn test_wait_keyed_times_out_when_value_never_comes() {
        let file = temp_file("timeout", "frozen 0\n");
        let reached = wait_keyed(&file, "frozen", 1, Duration::from_millis(100))
            .await
            .expect("wait");
        std::fs::remove_file(&file).expect("cleanup");
        assert!(!reached);
    }

    #[tokio::test]
    async fn test_wait_keyed_missing_file_is_error() {
        let missing = Path::new("/nonexistent/accordion/cgroup.events");
        assert!(wait_keyed(missing, "frozen", 1, Duration::from_millis(100))
            .await
            .is_err());
    }
}
