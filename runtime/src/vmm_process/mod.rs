//! The VMM as a process of its own (docs/architecture.md, "What runs where"): the shim clones
//! itself into new namespaces and re-executes as `__accordion-vmm <sandbox>` (child.rs), hands it
//! every input as a descriptor over a socketpair (channel.rs), lets it jail itself (jail.rs), and
//! from then on only talks to it: set the vCPU target, read the vCPU states and the boot time,
//! shut down, and learn why it stopped. There is still one binary and no external VMM: the
//! process runs accordion-vmm, our own KVM core.
//!
//! The channel's far end is what a guest that broke out of a device would hold, so everything
//! read from it is bounded (channel.rs) and a malformed message kills the process.

pub mod channel;
pub mod child;
pub mod jail;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use accordion_vmm::exit::ExitLatch;
use accordion_vmm::ratelimit::RateLimiter;
use accordion_vmm::{ExitReason, ExitWatch, HotplugRequest, VcpuState, VmMemory};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::pidfd::PidFd;
use channel::{
    bounded, Channel, ChannelError, Envelope, Message, Reply, Request, SetVcpusRefusal, StartSpec,
};
pub use child::main_if_vmm;
use child::{CHANNEL_FD, VMM_ARG};
pub use jail::{IdLease, JailError};

/// How long one request may wait for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the VMM may take to enter its user namespace.
const JAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `shutdown` waits for the VMM to stop before it kills it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Environment the VMM process keeps: its development switches, nothing else of the shim's.
const KEPT_ENV: [&str; 4] = [
    "ACCORDION_SECCOMP",
    "ACCORDION_TEST_SECCOMP_VIOLATION",
    "RUST_BACKTRACE",
    "RUST_LOG",
];

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start the vmm process")]
    Spawn(#[source] nix::Error),
    #[error("cannot watch the vmm process")]
    Watch(#[source] io::Error),
    #[error("cannot jail the vmm process")]
    Jail(#[from] JailError),
    #[error("cannot talk to the vmm process")]
    Channel(#[from] ChannelError),
    #[error("cannot place the vmm process in its host cgroup")]
    Cgroup(#[from] crate::host_cgroup::HostCgroupError),
    #[error("{0}")]
    Refused(String),
    #[error("the vmm process did not answer {0} within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the vmm process ended ({0})")]
    Ended(String),
    #[error("the vmm process answered {0} with something else")]
    Unexpected(&'static str),
}

/// What the VMM is started with, as open files (it can open nothing itself).
#[derive(Debug)]
pub struct StartFds {
    /// /dev/kvm.
    pub kvm: File,
    pub kernel: File,
    pub initrd: Option<File>,
    /// The console log's current and older halves (CappedLog::into_files).
    pub console: (File, File),
    /// The bound, listening hybrid-vsock socket.
    pub vsock: UnixListener,
    /// One connected vhost-user socket per virtio-fs device.
    pub fs: Vec<UnixStream>,
    /// One tap per virtio-net device.
    pub taps: Vec<OwnedFd>,
}

impl StartFds {
    /// In the order child.rs's `Inputs` takes them.
    fn raw(&self) -> Vec<RawFd> {
        let mut fds = vec![self.kvm.as_raw_fd(), self.kernel.as_raw_fd()];
        fds.extend(self.initrd.as_ref().map(AsRawFd::as_raw_fd));
        fds.extend([self.console.0.as_raw_fd(), self.console.1.as_raw_fd()]);
        fds.push(self.vsock.as_raw_fd());
        fds.extend(self.fs.iter().map(AsRawFd::as_raw_fd));
        fds.extend(self.taps.iter().map(AsRawFd::as_raw_fd));
        fds
    }
}

/// A running VMM process. Dropping it stops the VM and reaps the process.
pub struct VmProcess {
    pid: u32,
    pidfd: Arc<PidFd>,
    channel: Arc<Channel>,
    /// Answers, read by the reader thread; one caller at a time takes them.
    replies: Mutex<Receiver<(u64, Reply)>>,
    next_id: AtomicU64,
    exit: Arc<ExitLatch>,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// Bumped at every `Message::Changed` (a vCPU's state or the memory changed).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    max_vcpus: u32,
    /// Boot and maximum guest memory in bytes, what every memory reply is checked against.
    memory_bounds: (u64, u64),
    jail_setup: Option<Duration>,
    _lease: Option<IdLease>,
}

impl std::fmt::Debug for VmProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmProcess").field("pid", &self.pid).finish()
    }
}

impl VmProcess {
    /// Starts a VMM process for `spec` with `fds`, jailed as `spec.jail` says (with the host id
    /// `lease` holds), in `cgroup`, and waits up to `timeout` for its VM to run.
    pub fn start(
        spec: StartSpec,
        fds: StartFds,
        lease: Option<IdLease>,
        cgroup: Option<&crate::host_cgroup::HostCgroup>,
        timeout: Duration,
    ) -> Result<VmProcess, VmmError> {
        let (ours, theirs) = Channel::pair().map_err(VmmError::Spawn)?;
        let jail = spec.jail.clone();
        let cloning = Instant::now();
        let pid = clone_vmm(&spec.name, &theirs, jail.is_some())?;
        let cloned = cloning.elapsed();
        drop(theirs);
        // The process cannot have been reaped yet: it has not read its first message.
        let pidfd = Arc::new(PidFd::open(pid).map_err(VmmError::Watch)?);
        let channel = Arc::new(ours);
        let exit = Arc::new(ExitLatch::default());
        let (tx, rx) = mpsc::channel();
        let changes = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let reader = {
            let (channel, exit, pidfd) =
                (Arc::clone(&channel), Arc::clone(&exit), Arc::clone(&pidfd));
            let name = spec.name.clone();
            let changes = Arc::clone(&changes);
            std::thread::Builder::new()
                .name("vmm-channel".into())
                .spawn(move || {
                    let to = Receivers {
                        replies: &tx,
                        exit: &exit,
                        changes: &changes,
                    };
                    read_messages(&name, &channel, &to, &pidfd)
                })
        };
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                let _ = pidfd.send_signal(Signal::SIGKILL);
                return Err(VmmError::Watch(e));
            }
        };
        let mut vmm = VmProcess {
            pid,
            pidfd,
            channel,
            replies: Mutex::new(rx),
            next_id: AtomicU64::new(1),
            exit,
            reader: Mutex::new(Some(reader)),
            changes,
            max_vcpus: spec.max_vcpus,
            memory_bounds: memory_bounds(&spec),
            jail_setup: None,
            _lease: lease,
        };
        // From here, an error drops `vmm`, which kills and reaps the process.
        // Placed explicitly, not by inheritance: a process running several sandboxes (a test)
        // may have joined another one's cgroup meanwhile. It waits for Start before it runs.
        if let Some(cgroup) = cgroup {
            cgroup.add(pid)?;
        }
        let raw = fds.raw();
        let first_wait = if jail.is_some() {
            JAIL_TIMEOUT
        } else {
            timeout
        };
        let reply = vmm.call_with(Request::Start(Box::new(spec)), &raw, first_wait, "Start")?;
        drop(fds);
        let reply = match (jail, reply) {
            (Some(j), Reply::UserNamespaceReady) => {
                jail::write_id_maps(pid, j.uid, j.gid)?;
                vmm.call_with(Request::IdsMapped, &[], timeout, "IdsMapped")?
            }
            (_, reply) => reply,
        };
        match reply {
            Reply::Started(jailed) => {
                // Cloning into the namespaces is the jail's too (the kernel builds them there).
                // The figure comes from the far end of the channel: saturate, never overflow.
                vmm.jail_setup = jailed.map(|d| d.saturating_add(cloned));
                Ok(vmm)
            }
            Reply::Failed(message) => Err(VmmError::Refused(message)),
            _ => Err(VmmError::Unexpected("Start")),
        }
    }

    /// How long jailing the process took (creating its namespaces, its empty root, the id maps,
    /// dropping capabilities, rlimits); None when it runs unjailed.
    pub fn jail_setup(&self) -> Option<Duration> {
        self.jail_setup
    }

    /// The process's pid (in the host's pid namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Why the VM stopped, waiting up to `timeout`; None while it runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.exit.wait_timeout(timeout)
    }

    /// A handle that waits for the VM to stop.
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch::new(Arc::clone(&self.exit))
    }

    /// A receiver that sees a new value whenever a vCPU's state or the VM's memory changed
    /// (what a resize waits on); its sender goes when the process's channel closes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Each possible vCPU's state; empty when the VMM cannot say (it stopped, or answered
    /// something that does not fit the VM).
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        match self.call(Request::VcpuStates, "VcpuStates") {
            Ok(Reply::VcpuStates(states)) if states.len() == self.max_vcpus as usize => states,
            _ => Vec::new(),
        }
    }

    /// Asks for `target` plugged vCPUs (Vm::set_vcpus in the VMM process).
    pub fn set_vcpus(&self, target: u32) -> Result<HotplugRequest, SetVcpusError> {
        match self.call(Request::SetVcpus(target), "SetVcpus")? {
            Reply::SetVcpus(Ok(request)) => {
                let max = self.max_vcpus;
                let fits = |v: &[u32]| v.len() <= max as usize && v.iter().all(|&i| i < max);
                if fits(&request.plugging) && fits(&request.unplugging) && fits(&request.cancelled)
                {
                    Ok(request)
                } else {
                    Err(VmmError::Unexpected("SetVcpus").into())
                }
            }
            Reply::SetVcpus(Err(refusal)) => Err(SetVcpusError::Refused(refusal)),
            Reply::Failed(message) => Err(VmmError::Refused(message).into()),
            _ => Err(VmmError::Unexpected("SetVcpus").into()),
        }
    }

    /// Asks for `bytes` of guest memory (Vm::set_memory in the VMM process); returns the sizes
    /// right after the request. Waiting for the guest is the caller's (`memory`).
    pub fn set_memory(&self, bytes: u64) -> Result<VmMemory, SetMemoryError> {
        match self.call(Request::SetMemory(bytes), "SetMemory")? {
            Reply::SetMemory(Ok(memory)) => self.checked(memory, "SetMemory").map_err(Into::into),
            Reply::SetMemory(Err(refusal)) => Err(SetMemoryError::Refused(refusal)),
            Reply::Failed(message) => Err(VmmError::Refused(message).into()),
            _ => Err(VmmError::Unexpected("SetMemory").into()),
        }
    }

    /// The VM's memory sizes now.
    pub fn memory(&self) -> Result<VmMemory, VmmError> {
        match self.call(Request::Memory, "Memory")? {
            Reply::Memory(memory) => self.checked(memory, "Memory"),
            _ => Err(VmmError::Unexpected("Memory")),
        }
    }

    /// `memory` if it is one this VM can have: its own boot and maximum, plugged and requested
    /// within the region (the VMM process is untrusted).
    fn checked(&self, memory: VmMemory, what: &'static str) -> Result<VmMemory, VmmError> {
        let (boot, max) = self.memory_bounds;
        let region = max - boot;
        if memory.boot == boot
            && memory.max == max
            && memory.plugged <= region
            && memory.requested <= region
        {
            Ok(memory)
        } else {
            Err(VmmError::Unexpected(what))
        }
    }

    /// Time from the VM's start to the guest's init writing the boot timer, if it did.
    pub fn boot_time(&self) -> Option<Duration> {
        match self.call(Request::BootTime, "BootTime") {
            Ok(Reply::BootTime(time)) => time,
            _ => None,
        }
    }

    /// Stops the VM: asks, waits up to [`SHUTDOWN_GRACE`], then kills the process. Returns why
    /// it stopped.
    pub fn shutdown(&self) -> ExitReason {
        if let Some(reason) = self.exit.wait_timeout(Duration::ZERO) {
            return reason;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let asked = self.channel.send(
            &Envelope {
                id,
                request: Request::Shutdown,
            },
            &[],
        );
        if asked.is_ok() {
            if let Some(reason) = self.exit.wait_timeout(SHUTDOWN_GRACE) {
                return reason;
            }
            log::warn!(
                "vmm process {}: no exit after {SHUTDOWN_GRACE:?}; killing it",
                self.pid
            );
        }
        let _ = self.pidfd.send_signal(Signal::SIGKILL);
        self.exit
            .wait_timeout(SHUTDOWN_GRACE)
            .unwrap_or_else(|| ExitReason::ProcessEnded {
                status: "did not end after SIGKILL".into(),
            })
    }

    fn call(&self, request: Request, what: &'static str) -> Result<Reply, VmmError> {
        self.call_with(request, &[], CALL_TIMEOUT, what)
    }

    fn call_with(
        &self,
        request: Request,
        fds: &[RawFd],
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, VmmError> {
        let replies = self.replies.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reason) = self.exit.wait_timeout(Duration::ZERO) {
            return Err(VmmError::Ended(format!("{reason:?}")));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.channel.send(&Envelope { id, request }, fds)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(left) {
                Ok((rid, reply)) if rid == id => return Ok(reply),
                // A late answer to a request that timed out.
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(VmmError::Timeout(what, timeout)),
                Err(RecvTimeoutError::Disconnected) => {
                    let reason = self.exit.wait_timeout(Duration::ZERO);
                    return Err(VmmError::Ended(
                        reason.map_or_else(|| "its channel closed".into(), |r| format!("{r:?}")),
                    ));
                }
            }
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.shutdown();
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(reader) = reader {
            // Ends at the channel's EOF, once the process is gone (killed above at the latest).
            let _ = reader.join();
        }
    }
}

/// Boot and maximum guest memory of `spec` in bytes (the maximum is the boot size when memory
/// is fixed).
fn memory_bounds(spec: &StartSpec) -> (u64, u64) {
    let boot = spec.memory_mib.saturating_mul(1 << 20);
    let max = spec
        .max_memory_mib
        .map_or(boot, |mib| mib.saturating_mul(1 << 20))
        .max(boot);
    (boot, max)
}

/// Why a memory target was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SetMemoryError {
    #[error(transparent)]
    Refused(accordion_vmm::MemoryResizeError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// Why a vCPU target was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SetVcpusError {
    #[error(transparent)]
    Refused(SetVcpusRefusal),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// Where the reader puts what the VMM process says.
struct Receivers<'a> {
    replies: &'a Sender<(u64, Reply)>,
    exit: &'a ExitLatch,
    changes: &'a tokio::sync::watch::Sender<u64>,
}

/// The reader: answers to their callers, log lines to the shim's log, the exit reason to the
/// latch, changes to the watchers; at EOF, waits for the process to end and, if it never said
/// why, records how it ended.
fn read_messages(name: &str, channel: &Channel, to: &Receivers<'_>, pidfd: &PidFd) {
    let Receivers {
        replies,
        exit,
        changes,
    } = to;
    // The VMM already limits what a guest can make it log; this limits a VMM that does not.
    let limiter = RateLimiter::per_minute(120);
    loop {
        match channel.receive::<Message>() {
            Ok(Some((message, _fds))) => match message {
                Message::Reply { id, reply } => {
                    let _ = replies.send((id, reply));
                }
                Message::Exit(reason) => {
                    exit.trip(reason);
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Message::Changed => {
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Message::Log(level, line) => {
                    if let Some(dropped) = limiter.admit() {
                        let level = log_level(level);
                        if dropped > 0 {
                            log::log!(level, "vmm {name}: {dropped} lines suppressed");
                        }
                        log::log!(level, "vmm {name}: {}", bounded(line));
                    }
                }
            },
            Ok(None) => break,
            Err(e) => {
                log::error!(
                    "sandbox {name}: killing its vmm process, which broke the channel's rules: {}",
                    accordion_vmm::error_chain(&e)
                );
                let _ = pidfd.send_signal(Signal::SIGKILL);
                break;
            }
        }
    }
    let status = wait_end(pidfd);
    if exit.trip(ExitReason::ProcessEnded {
        status: status.clone(),
    }) {
        log::warn!("sandbox {name}: its vmm process {status}");
    }
    // Whoever waits for a change learns that the VM is gone.
    changes.send_modify(|n| *n = n.wrapping_add(1));
}

fn log_level(level: usize) -> log::Level {
    log::Level::iter()
        .nth(level.saturating_sub(1))
        .unwrap_or(log::Level::Trace)
}

/// Waits for the process to end (killing it if it lingers without its channel), reaps it when
/// it is still ours to reap, and says how it ended.
fn wait_end(pidfd: &PidFd) -> String {
    let lingering = Instant::now() + Duration::from_secs(2);
    while !pidfd.exited().unwrap_or(true) {
        if Instant::now() > lingering {
            let _ = pidfd.send_signal(Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match pidfd.reap() {
        Ok(status) => status,
        // The shim's reaper (containerd-shim's) got there first.
        Err(_) => "ended".into(),
    }
}

/// The binary the VMM process runs: this one when it is Accordion's (the shim and the CLI both
/// become a VMM on `__accordion-vmm`). A program that only links this library (its integration
/// tests) uses the `accordion` binary beside it or on PATH instead.
fn vmm_executable() -> std::path::PathBuf {
    let this = std::path::PathBuf::from("/proc/self/exe");
    let Ok(exe) = std::env::current_exe() else {
        return this;
    };
    let ours = ["accordion", "containerd-shim-accordion-v2"];
    if exe
        .file_name()
        .is_some_and(|n| ours.iter().any(|o| n == *o))
    {
        return this;
    }
    let beside = exe.parent().map(|d| d.join("accordion"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("accordion"));
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or(this)
}

/// Clones this process into the VMM's namespaces (none if `jailed` is false) and executes this
/// binary there as `__accordion-vmm <name>`, with `channel` as fd 3 and no other descriptor
/// beyond stdio.
fn clone_vmm(name: &str, channel: &Channel, jailed: bool) -> Result<u32, VmmError> {
    let cstring = |s: &str| CString::new(s).map_err(|_| VmmError::Spawn(nix::Error::EINVAL));
    let exe = CString::new(vmm_executable().into_os_string().into_encoded_bytes())
        .map_err(|_| VmmError::Spawn(nix::Error::EINVAL))?;
    let args = [cstring("accordion-vmm")?, cstring(VMM_ARG)?, cstring(name)?];
    let mut env = Vec::new();
    for key in KEPT_ENV {
        if let Ok(value) = std::env::var(key) {
            env.push(cstring(&format!("{key}={value}"))?);
        }
    }
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let fd = channel.as_raw_fd();
    let flags = if jailed {
        jail::clone_flags()
    } else {
        CloneFlags::empty()
    };
    let mut stack = vec![0u8; 64 * 1024];
    // The child is a copy of a multi-threaded process: until execve it may only make
    // async-signal-safe calls (no allocation, no locks), which is all this does.
    let child = Box::new(|| -> isize {
        // SAFETY: plain system calls on integers and on the pointers prepared above, which the
        // child's copy of this memory still holds; `_exit` if any fails.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut all);
            libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            if libc::dup2(fd, CHANNEL_FD) < 0 || libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) < 0 {
                libc::_exit(126);
            }
            libc::syscall(libc::SYS_close_range, CHANNEL_FD + 1, u32::MAX, 0);
            libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127)
        }
    });
    // SAFETY: the child runs only the closure above on `stack` (64 KiB, far more than a few
    // system calls need) and then executes a new program or exits.
    let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(VmmError::Spawn)?;
    u32::try_from(pid.as_raw()).map_err(|_| VmmError::Spawn(nix::Error::ESRCH))
}
