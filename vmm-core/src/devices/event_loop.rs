//! What every device thread shares (the device manager's, vsock's, virtio-net's): an epoll set
//! that always holds the thread's stop eventfd, and a thread start that names the thread and
//! reports a panic in it instead of letting the device die silently.
//!
//! vmm-sys-util's `Epoll` does the system calls; event-manager's subscriber model would make each
//! device an `Arc<Mutex<…>>` subscriber shared with the manager, which the back ends (one owner,
//! one thread each) do not need.

use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, ThreadKind};

/// A device thread's kind, for its name and its seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Confined by the kind's seccomp filter.
    Seccomp(ThreadKind),
    /// The named thread has no filter of its own (it inherits its creator's, if any).
    None(&'static str),
}

impl Filter {
    fn thread_name(self) -> &'static str {
        match self {
            Self::Seccomp(kind) => kind.name(),
            Self::None(name) => name,
        }
    }
}

/// The stop eventfd's token; no other registration may use it.
const STOP_TOKEN: u64 = u64::MAX;

/// An epoll set with the thread's stop eventfd in it.
pub struct EventLoop {
    epoll: Epoll,
}

/// What a wait returned.
#[derive(Debug)]
pub enum Woken<'e> {
    /// The stop eventfd was signalled: the thread ends.
    Stop,
    /// These events (possibly none: a timeout or a signal).
    Events(&'e [EpollEvent]),
}

impl EventLoop {
    /// A set holding `stop`; a write to it makes [`EventLoop::wait`] return [`Woken::Stop`].
    pub fn new(stop: &EventFd) -> io::Result<Self> {
        let this = Self {
            epoll: Epoll::new()?,
        };
        this.ctl(ControlOperation::Add, stop, EventSet::IN, STOP_TOKEN)?;
        Ok(this)
    }

    /// Watches `fd` for `events`, reported with `token` (anything but `u64::MAX`).
    pub fn add(&self, fd: &impl AsRawFd, events: EventSet, token: u64) -> io::Result<()> {
        debug_assert_ne!(token, STOP_TOKEN);
        self.ctl(ControlOperation::Add, fd, events, token)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: &impl AsRawFd, events: EventSet, token: u64) -> io::Result<()> {
        debug_assert_ne!(token, STOP_TOKEN);
        self.ctl(ControlOperation::Modify, fd, events, token)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.ctl(ControlOperation::Delete, fd, EventSet::empty(), 0)
    }

    fn ctl(
        &self,
        op: ControlOperation,
        fd: &impl AsRawFd,
        events: EventSet,
        token: u64,
    ) -> io::Result<()> {
        self.epoll
            .ctl(op, fd.as_raw_fd(), EpollEvent::new(events, token))
    }

    /// Waits up to `timeout_ms` (-1: forever) for events, into `events`. A signal is an empty
    /// round, not an error; the stop eventfd wins over anything else that is ready with it.
    pub fn wait<'e>(&self, timeout_ms: i32, events: &'e mut [EpollEvent]) -> io::Result<Woken<'e>> {
        let n = match self.epoll.wait(timeout_ms, events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let ready = &events[..n];
        if ready.iter().any(|e| e.data() == STOP_TOKEN) {
            return Ok(Woken::Stop);
        }
        Ok(Woken::Events(ready))
    }
}

/// Starts a device thread running `body`, named for its kind, under the kind's seccomp filter
/// (`seccomp::confine`; [`Filter::None`] for a thread without a filter of its own). Should the
/// filter not install, or `body` panic, that is logged with the thread's name and `on_failure`
/// runs (a device flags DEVICE_NEEDS_RESET, the device manager stops the VM), so the guest and
/// the host see a failed device, never a silent one. Release builds abort on panic (Cargo.toml):
/// there the whole VMM stops and its supervisor reports it.
pub fn spawn(
    filter: Filter,
    body: impl FnOnce() + Send + 'static,
    on_failure: impl FnOnce(String) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let thread_name = filter.thread_name();
    std::thread::Builder::new()
        .name(thread_name.to_string())
        .spawn(move || {
            if let Filter::Seccomp(kind) = filter {
                if let Err(e) = block_signals() {
                    log::error!("{thread_name} thread does not start: cannot block signals: {e}");
                    on_failure(format!("cannot block signals: {e}"));
                    return;
                }
                if let Err(e) = seccomp::confine(kind) {
                    let why = crate::error_chain(&e);
                    log::error!("{thread_name} thread does not start: {why}");
                    on_failure(why);
                    return;
                }
                seccomp::test_violation_hook(kind);
            }
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                log::error!("{thread_name} thread panicked: {what}");
                on_failure(what);
            }
        })
}

/// Blocks every signal on the calling thread, so a process-directed one (SIGCHLD, SIGTERM) is
/// handled on a thread whose filter allows what the handler does, never on a confined device
/// thread. (Faults such as SIGSEGV still reach it: the kernel does not let them be blocked.)
fn block_signals() -> io::Result<()> {
    // SAFETY: `set` is initialised by sigfillset before use; pthread_sigmask only changes the
    // calling thread's mask and writes nothing through the null old-mask pointer.
    let rc = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn test_events_are_reported_with_their_tokens_and_stop_wins() {
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let ev = EventLoop::new(&stop).unwrap();
        ev.add(&kick, EventSet::IN, 7).unwrap();
        let mut events = vec![EpollEvent::default(); 4];

        assert!(matches!(
            ev.wait(0, &mut events).unwrap(),
            Woken::Events([])
        ));
        kick.write(1).unwrap();
        match ev.wait(0, &mut events).unwrap() {
            Woken::Events(ready) => {
                assert_eq!(ready.len(), 1);
                assert_eq!(ready[0].data(), 7);
            }
            other => panic!("{other:?}"),
        }
        stop.write(1).unwrap();
        assert!(matches!(ev.wait(0, &mut events).unwrap(), Woken::Stop));
        ev.remove(&kick).unwrap();
    }

    #[test]
    fn test_a_confined_device_thread_blocks_every_signal() {
        let (tx, rx) = mpsc::channel();
        let thread = spawn(
            Filter::Seccomp(ThreadKind::Vsock),
            move || {
                let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                let blocked = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigBlk:"))
                    .unwrap()
                    .trim()
                    .to_string();
                tx.send(blocked).unwrap();
            },
            |why| panic!("{why}"),
        )
        .unwrap();
        let blocked = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        thread.join().unwrap();
        // Every signal but the two the kernel never blocks (SIGKILL, SIGSTOP); glibc keeps its
        // two internal ones (32, 33) out as well.
        let mask = u64::from_str_radix(&blocked, 16).unwrap();
        for signal in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGRTMIN() + 2,
        ] {
            assert_ne!(
                mask & (1 << (signal - 1)),
                0,
                "signal {signal} not blocked: {blocked}"
            );
        }
    }

    #[test]
    fn test_a_panicking_thread_is_reported_and_ends() {
        let (tx, rx) = mpsc::channel();
        let thread = spawn(
            Filter::None("test-device"),
            || panic!("bad ring"),
            move |what| tx.send(what).unwrap(),
        )
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "bad ring");
        thread.join().expect("the panic stayed inside the thread");
    }
}
