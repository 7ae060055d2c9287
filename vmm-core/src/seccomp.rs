//! Seccomp filters per thread kind: each vCPU, the device manager, each device back-end thread
//! and the VMM process's control thread allow only the system calls they make
//! (`vmm-core/seccomp/aarch64.json`, compiled by seccompiler when the first thread asks);
//! anything else kills the whole process (docs/security.md, "Seccomp").
//!
//! `ACCORDION_SECCOMP=log` turns every filter's kill into a kernel log line (audit type 1326,
//! naming the thread and the syscall) for development; `record` logs every call a confined
//! thread makes, allowed or not (how `seccomp/recorded-aarch64.txt` is made, see
//! docs/security.md); `off` installs none. CI sets none of them.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

/// The filters, as data (seccompiler's JSON format), for the architecture Accordion runs on.
pub const FILTERS_JSON: &str = include_str!("../seccomp/aarch64.json");

/// The filter every thread of a jailed VMM process runs under, below its thread kind's own: a
/// deny-list of what no VMM thread does (run a program, fork, trace, mount, change ids or
/// namespaces, BPF, io_uring, keyrings, modules…). An allow-list that must let a thread start
/// threads (clone) cannot tell a thread from a process; this one can.
pub const PROCESS_FILTER: &str = "vmm";

/// Installed with [`PROCESS_FILTER`]: clone3 fails with ENOSYS, so glibc starts threads with
/// clone, whose flags (unlike clone3's, which sit in memory) a filter can check.
pub const CLONE3_FILTER: &str = "vmm-clone3";

thread_local! {
    /// The kind whose filter this thread installed; threads it starts inherit that filter.
    static CONFINED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// A thread kind with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A vCPU (threads `vcpu<N>`): KVM_RUN, register access, eventfd writes, the console, and
    /// starting a sibling on PSCI CPU_ON.
    Vcpu,
    /// The device manager: activates devices, starts their back-end threads (whose filters it
    /// must therefore allow too), speaks vhost-user to virtiofsd.
    DeviceManager,
    /// The virtio-vsock back end.
    Vsock,
    /// The virtio-net back end.
    Net,
    /// The virtio-fs interrupt forwarder.
    FsIrq,
    /// The virtio-mem request thread.
    Mem,
    /// The VMM process's control thread and the thread reporting the VM's exit: the channel to
    /// the shim, resizes, shutdown.
    Control,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        Self::Vcpu,
        Self::DeviceManager,
        Self::Vsock,
        Self::Net,
        Self::FsIrq,
        Self::Mem,
        Self::Control,
    ];

    /// The device back ends, which the device manager starts.
    pub const DEVICES: [ThreadKind; 4] = [Self::Vsock, Self::Net, Self::FsIrq, Self::Mem];

    /// The filter's key in the JSON file (the device threads' name too).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::DeviceManager => "device-manager",
            Self::Vsock => "vsock",
            Self::Net => "virtio-net",
            Self::FsIrq => "virtio-fs-irq",
            Self::Mem => "virtio-mem",
            Self::Control => "vmm-control",
        }
    }
}

/// What a mismatch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process (the default).
    Kill,
    /// Allow a call the filter does not and log it (development only).
    Log,
    /// Allow every call and log it (recording what threads do; development only).
    Record,
    /// No filter.
    Off,
}

impl Mode {
    /// From `ACCORDION_SECCOMP` (`kill`, the default, `log` or `off`); anything else is refused.
    pub fn from_env() -> Result<Self, SeccompError> {
        match std::env::var("ACCORDION_SECCOMP").as_deref() {
            Err(_) | Ok("") | Ok("kill") => Ok(Self::Kill),
            Ok("log") => Ok(Self::Log),
            Ok("record") => Ok(Self::Record),
            Ok("off") => Ok(Self::Off),
            Ok(other) => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// ACCORDION_SECCOMP has a value it does not know.
    #[error("ACCORDION_SECCOMP={0:?}: expected kill, log, record or off")]
    Mode(String),
    /// The filter file does not compile (a bug in the repository's data).
    #[error("cannot compile the seccomp filters")]
    Compile(#[source] seccompiler::Error),
    /// The file has no filter for a thread kind.
    #[error("no seccomp filter for {0} threads")]
    Missing(&'static str),
    /// The filters could not be set up (the mode, the architecture or the data).
    #[error("cannot set up seccomp: {0}")]
    Setup(String),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of a {0} thread")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// Compiles the filters for `arch`, every kill turned into `mode`'s action.
pub fn compile(arch: TargetArch, mode: Mode) -> Result<HashMap<String, BpfProgram>, SeccompError> {
    let json = match mode {
        Mode::Log => FILTERS_JSON.replace("\"kill_process\"", "\"log\""),
        // Logs everything but restart_syscall (which only the kernel makes on a thread's
        // behalf; seccompiler wants distinct match and mismatch actions) and a vCPU's KVM_RUN and
        // write, one per exit and one per console byte: logging those would flood the kernel log
        // and lose the rare calls.
        Mode::Record => {
            let filters: Vec<String> = ThreadKind::ALL
                .iter()
                .map(|kind| {
                    let quiet = match kind {
                        ThreadKind::Vcpu => format!(
                            ", {{\"syscall\": \"write\"}}, {{\"syscall\": \"ioctl\", \"args\": \
                             [{{\"index\": 1, \"type\": \"dword\", \"op\": \"eq\", \"val\": {KVM_RUN}}}]}}"
                        ),
                        _ => String::new(),
                    };
                    format!(
                        "\"{}\": {{\"mismatch_action\": \"log\", \"match_action\": \"allow\", \
                         \"filter\": [{{\"syscall\": \"restart_syscall\"}}{quiet}]}}",
                        kind.name()
                    )
                })
                .collect();
            format!("{{{}}}", filters.join(", "))
        }
        Mode::Kill | Mode::Off => FILTERS_JSON.to_string(),
    };
    seccompiler::compile_from_json(json.as_bytes(), arch)
        .map(|map| map.into_iter().collect())
        .map_err(SeccompError::Compile)
}

/// Installs `kind`'s filter on the calling thread (and the threads it will start). A no-op
/// where VMs do not run (hosts other than aarch64) and in this crate's unit tests, which run
/// under qemu-user on x86_64 (qemu refuses seccomp there); the node tests run the real thing.
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    install(kind.name())?;
    inherited(kind);
    Ok(())
}

/// The kind whose filter the calling thread runs under ([`confine`] or [`inherited`]), if any: a
/// thread it starts runs under that filter already (filters stack, so installing it again would
/// only lengthen every system call's path, and the filter need not allow installing one).
pub fn confined_as() -> Option<ThreadKind> {
    CONFINED.with(Cell::get)
}

/// Records that the calling thread runs under `kind`'s filter (installed, or inherited from its
/// creator), so that the threads it starts know it too.
pub fn inherited(kind: ThreadKind) {
    CONFINED.with(|c| c.set(Some(kind)));
}

/// Installs [`PROCESS_FILTER`] and [`CLONE3_FILTER`] on the calling thread, which every thread
/// it starts inherits: the jailed VMM process calls it once, before it starts the VM. Not in
/// `record` mode, which records what the confined threads call.
pub fn confine_process() -> Result<(), SeccompError> {
    install(PROCESS_FILTER)?;
    install(CLONE3_FILTER)
}

/// KVM_RUN's ioctl number (`_IO(KVMIO, 0x80)`), the one call a vCPU makes on every exit.
const KVM_RUN: u64 = 0xae80;

fn install(name: &'static str) -> Result<(), SeccompError> {
    if cfg!(test) || host_arch().is_none() {
        return Ok(());
    }
    type Compiled = Result<(Mode, HashMap<String, BpfProgram>), String>;
    static FILTERS: OnceLock<Compiled> = OnceLock::new();
    let compiled = FILTERS.get_or_init(|| {
        let mode = Mode::from_env().map_err(|e| e.to_string())?;
        compile(TargetArch::aarch64, mode)
            .map(|filters| (mode, filters))
            .map_err(|e| crate::error_chain(&e))
    });
    let (mode, filters) = compiled
        .as_ref()
        .map_err(|why| SeccompError::Setup(why.clone()))?;
    let process_wide = name == PROCESS_FILTER || name == CLONE3_FILTER;
    if *mode == Mode::Off || (*mode == Mode::Record && process_wide) {
        return Ok(());
    }
    let filter = filters.get(name).ok_or(SeccompError::Missing(name))?;
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install(name, e))
}

/// For the node test that a forbidden call kills the VMM: with
/// `ACCORDION_TEST_SECCOMP_VIOLATION=<kind>` set, a thread of that kind makes a call its filter
/// does not allow (getppid) right after it is confined.
pub fn test_violation_hook(kind: ThreadKind) {
    if std::env::var("ACCORDION_TEST_SECCOMP_VIOLATION").as_deref() == Ok(kind.name()) {
        log::warn!(
            "{}: making a forbidden system call (test hook)",
            kind.name()
        );
        // SAFETY: getppid has no arguments and no side effects.
        let _ = unsafe { libc::getppid() };
    }
}

fn host_arch() -> Option<TargetArch> {
    cfg!(target_arch = "aarch64").then_some(TargetArch::aarch64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each thread kind was seen calling in a node run (scripts/seccomp-record.sh).
    const RECORDED: &str = include_str!("../seccomp/recorded-aarch64.txt");

    /// The rules of `kind`'s filter, as written in the JSON.
    fn filter_rules(kind: ThreadKind) -> Vec<serde_json::Value> {
        let json: serde_json::Value = serde_json::from_str(FILTERS_JSON).expect("json");
        json[kind.name()]["filter"]
            .as_array()
            .expect("a filter list")
            .clone()
    }

    /// The syscalls `kind`'s filter allows, from the JSON.
    fn allowed(kind: ThreadKind) -> Vec<String> {
        filter_rules(kind)
            .iter()
            .map(|rule| {
                rule["syscall"]
                    .as_str()
                    .expect("a syscall name")
                    .to_string()
            })
            .collect()
    }

    /// What a thread does between its start and its own filter: glibc's and std's thread
    /// start-up, and installing the filter. The kernel logs those under the new thread's name
    /// (or its creator's, before it is named), while its creator's filter is the one in force.
    const THREAD_START: [&str; 13] = [
        "clone",
        "clone3",
        "set_robust_list",
        "rseq",
        "sched_getaffinity",
        "gettid",
        "prctl",
        "sigaltstack",
        "mmap",
        "mprotect",
        "munmap",
        "rt_sigprocmask",
        "seccomp",
    ];

    /// The kind whose filter a thread of `kind` starts under (none: the process filter only).
    fn creator(kind: ThreadKind) -> Option<ThreadKind> {
        match kind {
            ThreadKind::Vsock | ThreadKind::Net | ThreadKind::FsIrq | ThreadKind::Mem => {
                Some(ThreadKind::DeviceManager)
            }
            ThreadKind::Vcpu | ThreadKind::DeviceManager | ThreadKind::Control => None,
        }
    }

    #[test]
    fn test_every_call_recorded_in_a_node_run_is_allowed_for_its_thread_kind() {
        let mut seen = std::collections::HashSet::new();
        for line in RECORDED.lines().filter(|l| !l.trim().is_empty()) {
            let (thread, syscall) = line.split_once(' ').expect("`<thread> <syscall>`");
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == thread)
                .unwrap_or_else(|| panic!("no thread kind {thread:?}"));
            let own = allowed(kind).iter().any(|a| a == syscall);
            // Not in its own list: only a start-up call, which its creator's filter allows.
            let at_start = THREAD_START.contains(&syscall)
                && creator(kind).is_none_or(|c| allowed(c).iter().any(|a| a == syscall));
            assert!(
                own || at_start,
                "{thread} threads call {syscall} in a normal run; their filter kills that"
            );
            seen.insert(kind);
        }
        for kind in ThreadKind::ALL {
            assert!(
                seen.contains(&kind),
                "nothing recorded for {kind:?} threads"
            );
        }
    }

    #[test]
    fn test_a_thread_that_starts_threads_allows_their_start_up() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::DeviceManager,
            ThreadKind::Control,
        ] {
            let allowed = allowed(kind);
            for call in THREAD_START.iter().filter(|c| **c != "seccomp") {
                assert!(allowed.iter().any(|a| a == call), "{kind:?} lacks {call}");
            }
        }
        // Device threads install their own filter under the device manager's: seccompiler
        // sets no_new_privs, then calls seccomp.
        assert!(allowed(ThreadKind::DeviceManager)
            .iter()
            .any(|a| a == "seccomp"));
        let mut prctl = arg_values(ThreadKind::DeviceManager, "prctl", 0);
        prctl.sort_unstable();
        assert_eq!(
            prctl,
            vec![libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64]
        );
    }

    #[test]
    fn test_every_thread_kind_may_write_its_log_lines() {
        // A jailed VMM's log lines go to the shim with write(2) on its channel (the runtime's
        // vmm_process); a thread that could not would die at its first warning.
        for kind in ThreadKind::ALL {
            assert!(allowed(kind).iter().any(|a| a == "write"), "{kind:?}");
        }
    }

    #[test]
    fn test_the_vsock_thread_may_ioctl_only_fionbio() {
        assert_eq!(
            arg_values(ThreadKind::Vsock, "ioctl", 1),
            vec![u64::from(libc::FIONBIO as u32)]
        );
    }

    /// `kind`'s rules as JSON values (syscall and arguments), for comparing filters.
    fn rules(kind: ThreadKind) -> Vec<serde_json::Value> {
        filter_rules(kind)
            .iter()
            .map(|rule| serde_json::json!([rule["syscall"], strip_comments(&rule["args"])]))
            .collect()
    }

    fn strip_comments(args: &serde_json::Value) -> serde_json::Value {
        match args.as_array() {
            None => serde_json::Value::Null,
            Some(args) => args
                .iter()
                .map(|a| serde_json::json!([a["index"], a["type"], a["op"], a["val"]]))
                .collect(),
        }
    }

    /// The `val`s of `kind`'s rules for `syscall` on argument `index`.
    fn arg_values(kind: ThreadKind, syscall: &str, index: u64) -> Vec<u64> {
        filter_rules(kind)
            .iter()
            .filter(|rule| rule["syscall"] == syscall)
            .map(|rule| {
                let args = rule["args"].as_array().expect("argument rules");
                assert_eq!(args.len(), 1, "{syscall}: one condition per rule");
                assert_eq!(args[0]["index"], index);
                assert_eq!(args[0]["op"], "eq");
                args[0]["val"].as_u64().expect("a number")
            })
            .collect()
    }

    #[test]
    fn test_the_device_manager_allows_what_every_thread_it_starts_needs() {
        // A device thread inherits the device manager's filter and adds its own: a call is
        // allowed only if both allow it.
        let manager = rules(ThreadKind::DeviceManager);
        for kind in ThreadKind::DEVICES {
            for rule in rules(kind) {
                assert!(manager.contains(&rule), "{kind:?} needs {rule}");
            }
        }
    }

    #[test]
    fn test_a_vcpu_may_ioctl_only_its_own_kvm_calls() {
        // _IOC(dir, KVMIO, nr, size) with asm-generic's encoding (arm64's).
        let ioc = |dir: u64, nr: u64, size: u64| (dir << 30) | (size << 16) | (0xae << 8) | nr;
        let (write, one_reg, vcpu_init, mp_state) = (1, 16, 32, 4);
        #[cfg(target_arch = "aarch64")]
        {
            use std::mem::size_of;
            assert_eq!(one_reg, size_of::<kvm_bindings::kvm_one_reg>() as u64);
            assert_eq!(vcpu_init, size_of::<kvm_bindings::kvm_vcpu_init>() as u64);
            assert_eq!(mp_state, size_of::<kvm_bindings::kvm_mp_state>() as u64);
        }
        let mut expected = vec![
            ioc(0, 0x80, 0),             // KVM_RUN
            ioc(write, 0xab, one_reg),   // KVM_GET_ONE_REG (an _IOW in KVM's own header)
            ioc(write, 0xac, one_reg),   // KVM_SET_ONE_REG
            ioc(write, 0xae, vcpu_init), // KVM_ARM_VCPU_INIT
            ioc(write, 0x99, mp_state),  // KVM_SET_MP_STATE
        ];
        assert_eq!(expected[0], KVM_RUN);
        let mut allowed = arg_values(ThreadKind::Vcpu, "ioctl", 1);
        expected.sort_unstable();
        allowed.sort_unstable();
        assert_eq!(allowed, expected);
    }

    #[test]
    fn test_threads_that_signal_send_only_the_kick_and_abort() {
        let kick = vmm_sys_util::signal::SIGRTMIN() as u64;
        for kind in [ThreadKind::Vcpu, ThreadKind::Control] {
            let mut signals = arg_values(kind, "tgkill", 2);
            signals.sort_unstable();
            assert_eq!(signals, vec![libc::SIGABRT as u64, kick], "{kind:?}");
        }
        for kind in [
            ThreadKind::DeviceManager,
            ThreadKind::Vsock,
            ThreadKind::Net,
        ] {
            assert!(!allowed(kind).iter().any(|a| a == "tgkill"), "{kind:?}");
        }
    }

    #[test]
    fn test_vcpu_and_control_threads_open_and_reach_nothing() {
        // A compromised vCPU (MMIO emulation) or control thread gains no file or socket.
        for kind in [ThreadKind::Vcpu, ThreadKind::Control] {
            let allowed = allowed(kind);
            for forbidden in [
                "openat",
                "open_tree",
                "socket",
                "connect",
                "accept4",
                "bind",
                "execve",
                "ptrace",
                "mount",
                "bpf",
                "kill",
                "unshare",
                "setns",
                "setuid",
                "getppid",
                "memfd_create",
                "eventfd2",
                "epoll_create1",
            ] {
                assert!(
                    !allowed.iter().any(|a| a == forbidden),
                    "{kind:?} allows {forbidden}"
                );
            }
        }
    }

    #[test]
    fn test_no_filter_allows_what_no_device_thread_needs() {
        // What would turn a compromised back end into more than a broken device.
        for kind in ThreadKind::DEVICES {
            let allowed = allowed(kind);
            for forbidden in [
                "execve", "execveat", "clone", "clone3", "openat", "ptrace", "mount", "bpf",
                "setuid", "unshare", "kill", "tgkill", "getppid",
            ] {
                assert!(
                    !allowed.iter().any(|a| a == forbidden),
                    "{kind:?} allows {forbidden}"
                );
            }
        }
    }

    #[test]
    fn test_the_process_filter_kills_the_escape_calls_and_keeps_what_threads_need() {
        let json: serde_json::Value = serde_json::from_str(FILTERS_JSON).expect("json");
        let filter = &json[PROCESS_FILTER];
        assert_eq!(filter["mismatch_action"], "allow");
        assert_eq!(filter["match_action"], "kill_process");
        let denied: Vec<&str> = filter["filter"]
            .as_array()
            .expect("a filter list")
            .iter()
            .map(|rule| rule["syscall"].as_str().expect("a syscall name"))
            .collect();
        for escape in [
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "pivot_root",
            "unshare",
            "setns",
            "setuid",
            "setresuid",
            "capset",
            "bpf",
            "userfaultfd",
            "io_uring_setup",
            "init_module",
            "open_by_handle_at",
            "process_vm_writev",
            "pidfd_getfd",
        ] {
            assert!(denied.contains(&escape), "the vmm filter allows {escape}");
        }
        // What the VMM's threads do (kick vCPUs, name themselves, confine).
        for needed in ["clone3", "tgkill", "prctl", "seccomp", "ioctl", "mmap"] {
            assert!(!denied.contains(&needed), "the vmm filter kills {needed}");
        }
        // clone only with conditions (a fork, a namespace), never outright: threads use it.
        for rule in filter["filter"].as_array().expect("a filter list") {
            if rule["syscall"] == "clone" {
                assert!(rule["args"].is_array(), "{rule}");
            }
        }
        let compiled = compile(TargetArch::aarch64, Mode::Kill).expect("compiles");
        assert!(compiled.contains_key(PROCESS_FILTER));
        let logged = compile(TargetArch::aarch64, Mode::Log).expect("compiles");
        assert!(logged.contains_key(PROCESS_FILTER));
    }

    /// How a child ended: `Ok(exit code)` or `Err(signal)`.
    #[cfg(target_arch = "x86_64")]
    type Ended = Result<i32, i32>;

    /// Runs `attempt` in a child process under the VMM's process-wide filters (compiled for this
    /// host) and returns how the child ended.
    #[cfg(target_arch = "x86_64")]
    fn under_process_filters(attempt: fn() -> i32) -> Ended {
        let filters = compile(TargetArch::x86_64, Mode::Kill).expect("compiles for x86_64");
        let (vmm, clone3) = (&filters[PROCESS_FILTER], &filters[CLONE3_FILTER]);
        // SAFETY: the child only installs the two (already compiled) filters, makes raw system
        // calls and _exits; nothing it does needs a lock another thread could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match seccompiler::apply_filter(vmm)
                .and_then(|()| seccompiler::apply_filter(clone3))
            {
                Ok(()) => attempt(),
                Err(_) => 90,
            };
            exit_now(code);
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing its status into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }

    /// `_exit(code)`: a child an attempt let through ends at once.
    #[cfg(target_arch = "x86_64")]
    fn exit_now(code: i32) -> ! {
        // SAFETY: ends the calling (forked) process without touching shared state.
        unsafe { libc::_exit(code) }
    }

    /// clone(2) with `flags` and no stack (a copy-on-write child, when the call goes through).
    #[cfg(target_arch = "x86_64")]
    fn raw_clone(flags: libc::c_int) -> libc::c_long {
        // SAFETY: without CLONE_VM the child gets its own copy of the address space; every
        // caller makes such a child _exit at once.
        unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0, 0, 0, 0) }
    }

    #[cfg(target_arch = "x86_64")]
    fn fork_attempt() -> i32 {
        match raw_clone(libc::SIGCHLD) {
            0 => exit_now(0),
            _ => 1,
        }
    }

    /// The flags are invalid for the kernel (CLONE_THREAD without CLONE_VM): only the filter can
    /// stop the call before it fails.
    #[cfg(target_arch = "x86_64")]
    fn new_user_namespace_attempt() -> i32 {
        match raw_clone(libc::CLONE_THREAD | libc::CLONE_NEWUSER) {
            0 => exit_now(0),
            _ => 1,
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn clone3_attempt() -> i32 {
        let mut args = [0u64; 8];
        args[4] = libc::SIGCHLD as u64; // exit_signal
                                        // SAFETY: `args` is a valid, zeroed clone_args of the size passed (a plain fork, whose
                                        // child _exits at once, should the call go through).
        let rc = unsafe { libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 64usize) };
        match rc {
            0 => exit_now(3),
            -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => 0,
            _ => 2,
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn test_under_the_process_filters_a_fork_or_a_new_namespace_kills_and_clone3_is_enosys() {
        assert_eq!(
            under_process_filters(fork_attempt),
            Err(libc::SIGSYS),
            "a fork"
        );
        assert_eq!(
            under_process_filters(new_user_namespace_attempt),
            Err(libc::SIGSYS),
            "a new user namespace"
        );
        assert_eq!(
            under_process_filters(clone3_attempt),
            Ok(0),
            "clone3 → ENOSYS"
        );
    }

    #[test]
    fn test_every_thread_kind_has_a_filter_that_compiles_in_each_mode() {
        for mode in [Mode::Kill, Mode::Log, Mode::Record] {
            let filters = compile(TargetArch::aarch64, mode).expect("compiles");
            for kind in ThreadKind::ALL {
                assert!(filters.contains_key(kind.name()), "{kind:?}");
            }
        }
    }
}
