//! Kicking a vCPU thread out of KVM_RUN: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit` (Firecracker's scheme). Setting the flag closes the race where the
//! signal lands just before the thread enters KVM_RUN: KVM then returns EINTR at once.

use std::cell::Cell;
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};

thread_local! {
    /// The running vCPU's kvm_run, or null on threads that are not running a vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Errors from setting up kicks.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// sigaction failed.
    #[error("Cannot install the vCPU kick signal handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// The signal used: the first real-time signal.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Only async-signal-safe work here: read a const-initialised thread local, store one byte.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` was set by `arm` on this very thread to its vCPU's kvm_run mapping, which
        // stays mapped while armed (the guard is dropped before the VcpuFd can go away).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the handler once per process.
pub fn install() -> Result<(), KickError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    (*INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)))
    .map_err(KickError::Handler)
}

/// While alive, kicks of this thread set `immediate_exit` in `run`.
pub struct Armed(());

impl Drop for Armed {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Arms kicks for the current thread and makes sure the signal is not blocked here.
pub fn arm(run: *mut kvm_run) -> Armed {
    KVM_RUN.with(|c| c.set(run));
    // SAFETY: sigset is a plain C struct initialised by sigemptyset before use; pthread_sigmask
    // only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Armed(())
}

/// Sends the kick to `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` comes from a JoinHandle that has not been joined, so it names a thread
    // (possibly already finished, which pthread_kill tolerates).
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 && rc != libc::ESRCH {
        log::warn!(
            "Cannot kick vCPU thread: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}
