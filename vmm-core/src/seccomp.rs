//! Seccomp filters per thread kind: each device back-end thread allows only the system calls it
//! makes (`vmm-core/seccomp/aarch64.json`, compiled by seccompiler when the first thread asks);
//! anything else kills the whole process (docs/security.md, "Seccomp").
//!
//! `ACCORDION_SECCOMP=log` turns every filter's kill into a kernel log line (audit type 1326,
//! naming the thread and the syscall) for development; `record` logs every call a confined
//! thread makes, allowed or not (how `seccomp/recorded-aarch64.txt` is made, see
//! docs/security.md); `off` installs none. CI sets none of them.

use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

/// The filters, as data (seccompiler's JSON format), for the architecture Accordion runs on.
pub const FILTERS_JSON: &str = include_str!("../seccomp/aarch64.json");

/// The filter every thread of a jailed VMM process runs under, below its thread kind's own: a
/// deny-list of what no VMM thread does (run a program, trace, mount, change ids or namespaces,
/// BPF, io_uring, keyrings, modules…), so a thread without an allow-list of its own yet (the
/// vCPUs, the device manager) still cannot make them.
pub const PROCESS_FILTER: &str = "vmm";

/// A thread kind with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The virtio-vsock back end.
    Vsock,
    /// The virtio-net back end.
    Net,
    /// The virtio-fs interrupt forwarder.
    FsIrq,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 3] = [Self::Vsock, Self::Net, Self::FsIrq];

    /// The filter's key in the JSON file (also the thread's name).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vsock => "vsock",
            Self::Net => "virtio-net",
            Self::FsIrq => "virtio-fs-irq",
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
        // behalf): seccompiler wants distinct match and mismatch actions.
        Mode::Record => {
            let filters: Vec<String> = ThreadKind::ALL
                .iter()
                .map(|kind| {
                    format!(
                        "\"{}\": {{\"mismatch_action\": \"log\", \"match_action\": \"allow\", \
                         \"filter\": [{{\"syscall\": \"restart_syscall\"}}]}}",
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
    install(kind.name())
}

/// Installs [`PROCESS_FILTER`] on the calling thread, which every thread it starts inherits: the
/// jailed VMM process calls it once, before it starts the VM. Not in `record` mode, which
/// records what the device threads call.
pub fn confine_process() -> Result<(), SeccompError> {
    install(PROCESS_FILTER)
}

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
    if *mode == Mode::Off || (*mode == Mode::Record && name == PROCESS_FILTER) {
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

    /// The syscalls `kind`'s filter allows, from the JSON.
    fn allowed(kind: ThreadKind) -> Vec<String> {
        let json: serde_json::Value = serde_json::from_str(FILTERS_JSON).expect("json");
        json[kind.name()]["filter"]
            .as_array()
            .expect("a filter list")
            .iter()
            .map(|rule| {
                rule["syscall"]
                    .as_str()
                    .expect("a syscall name")
                    .to_string()
            })
            .collect()
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
            assert!(
                allowed(kind).iter().any(|a| a == syscall),
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
    fn test_every_device_thread_may_write_its_log_lines() {
        // A jailed VMM's log lines go to the shim with write(2) on its channel (the runtime's
        // vmm_process); a thread that could not would die at its first warning.
        for kind in ThreadKind::ALL {
            assert!(allowed(kind).iter().any(|a| a == "write"), "{kind:?}");
        }
    }

    #[test]
    fn test_the_vsock_thread_may_ioctl_only_fionbio() {
        let json: serde_json::Value = serde_json::from_str(FILTERS_JSON).expect("json");
        let rules: Vec<&serde_json::Value> = json["vsock"]["filter"]
            .as_array()
            .expect("a filter list")
            .iter()
            .filter(|rule| rule["syscall"] == "ioctl")
            .collect();
        assert_eq!(rules.len(), 1);
        let args = rules[0]["args"]
            .as_array()
            .expect("ioctl has argument rules");
        assert_eq!(args.len(), 1);
        assert_eq!(args[0]["index"], 1);
        assert_eq!(args[0]["op"], "eq");
        assert_eq!(args[0]["val"], u64::from(libc::FIONBIO as u32));
    }

    #[test]
    fn test_no_filter_allows_what_no_device_thread_needs() {
        // What would turn a compromised back end into more than a broken device.
        for kind in ThreadKind::ALL {
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
        // What the VMM's threads do (start threads, kick vCPUs, name themselves, confine).
        for needed in [
            "clone", "clone3", "tgkill", "prctl", "seccomp", "ioctl", "mmap",
        ] {
            assert!(!denied.contains(&needed), "the vmm filter kills {needed}");
        }
        let compiled = compile(TargetArch::aarch64, Mode::Kill).expect("compiles");
        assert!(compiled.contains_key(PROCESS_FILTER));
        let logged = compile(TargetArch::aarch64, Mode::Log).expect("compiles");
        assert!(logged.contains_key(PROCESS_FILTER));
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
