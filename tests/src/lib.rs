//! Helpers shared by the end-to-end tests in `tests/tests/`: they drive the `accordion` binary as a
//! user would, in the emulated ARM64 node (or on an ARM64 KVM host). [`cri`] is the library behind
//! `accordion-cri`, the CRI v1 client the containerd tests drive.

// Test helpers: a failure here is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cri;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};

pub mod bench_cri;
pub mod bench_net;
pub mod containerd;
pub mod cri_cli;

/// Where guest assets are installed.
pub fn share() -> PathBuf {
    std::env::var_os("ACCORDION_SHARE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/accordion/share"))
}

/// Whether this machine can run sandboxes; panics under ACCORDION_REQUIRE_KVM=1 when not.
pub fn can_run() -> bool {
    let missing = if !std::path::Path::new("/dev/kvm").exists() {
        Some("/dev/kvm is missing".to_string())
    } else if !share().join("guest/agent-initrd.cpio").exists() {
        Some(format!("no guest assets in {}", share().display()))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("ACCORDION_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("ACCORDION_REQUIRE_KVM=1 but {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

static ONE_VM: Mutex<()> = Mutex::new(());

/// One microVM at a time: the node has two CPUs and nested guests are slow. Hold it for a test.
pub fn one_vm() -> MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `accordion args…` with stdin from /dev/null and returns what it did.
pub fn accordion(args: &[&str]) -> Output {
    accordion_with_stdin(args, None)
}

/// Runs `accordion args…` feeding it `stdin`.
pub fn accordion_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child = Command::new("accordion")
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run accordion (is it on PATH?)");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    child.wait_with_output().expect("wait for accordion")
}

/// Bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Names under /run/accordion.
pub fn run_dir_entries() -> Vec<String> {
    std::fs::read_dir("/run/accordion")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of running `accordion` processes (sandbox owners and CLIs; VMM processes aside).
pub fn accordion_pids() -> Vec<u32> {
    pids_of_executable("accordion")
        .into_iter()
        .filter(|&pid| !is_vmm(pid))
        .collect()
}

/// Pids of running processes whose executable is named `name`.
pub fn pids_of_executable(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/exe"))
                        .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == name))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is a VMM process: the shim's or the CLI's binary run as `__accordion-vmm`.
pub fn is_vmm(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).nth(1) == Some(b"__accordion-vmm".as_slice()))
}

/// Pids of running VMM processes.
pub fn vmm_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = ["accordion", "containerd-shim-accordion-v2"]
        .into_iter()
        .flat_map(pids_of_executable)
        .filter(|&pid| is_vmm(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// Asserts `out` exited with `code`, showing its output when it did not.
pub fn assert_code(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Starts a detached sandbox `name` with 1 of 8 vCPUs on `kernel` (a file in the guest assets).
pub fn start_sandbox(name: &str, kernel: &str) {
    let kernel = share().join("guest").join(kernel);
    let out = accordion(&[
        "run",
        "-d",
        "--name",
        name,
        "--vcpus",
        "1",
        "--max-vcpus",
        "8",
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
    ]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout), format!("{name}\n"));
}

/// MemTotal of a /proc/meminfo text, bytes; panics when it has none.
pub fn meminfo_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no MemTotal in {meminfo}"))
}

/// `accordion exec NAME -- sh -c SCRIPT` in the sandbox's VM (outside every container), which
/// must exit 0: its stdout.
pub fn guest_sh(name: &str, script: &str) -> String {
    let out = accordion(&["exec", name, "--", "sh", "-c", script]);
    assert_code(&out, 0);
    text(&out.stdout)
}

/// `accordion status NAME` as key → value.
pub fn sandbox_status(name: &str) -> HashMap<String, String> {
    let out = accordion(&["status", name]);
    assert_code(&out, 0);
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Records a failed benchmark sample as `FAIL label reason` on one line of a sample file, where
/// `accordion-bench report` counts it beside the label's median.
pub fn record_failure(
    file: &mut impl std::io::Write,
    label: &str,
    reason: &str,
) -> Result<(), String> {
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    writeln!(file, "FAIL {label} {reason}").map_err(|e| e.to_string())
}

/// A benchmark's target for one figure.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

/// The line every benchmark ends with, one per goal it measures, for scripts:
/// `goal <name> <measured> <target> met|unmet` (docs/BENCHMARKS.md). A figure that could not be
/// measured (NaN) is unmet.
pub fn goal_line(name: &str, measured: f64, target: Target) -> String {
    let (target, met) = match target {
        Target::AtLeast(t) => (format!(">={t}"), measured >= t),
        Target::AtMost(t) => (format!("<={t}"), measured <= t),
    };
    let met = if met { "met" } else { "unmet" };
    format!("goal {name} {measured:.2} {target} {met}")
}

/// The guest's online CPU count in `accordion status`'s "vcpus: N online in the guest, …".
pub fn guest_online(status: &str) -> Option<u32> {
    status.lines().find_map(|l| {
        l.strip_prefix("vcpus: ")?
            .split_once(" online in the guest")?
            .0
            .parse()
            .ok()
    })
}

/// (resident KiB outside memfd mappings, resident KiB of memfd mappings) from /proc/PID/smaps.
/// Accordion's guest RAM is a memfd; binaries on the node's initramfs are shmem too, so the status
/// file's RssShmem cannot tell them apart, smaps can. None when the process is gone (its smaps
/// unreadable): a sample of nothing, not 0 KiB.
pub fn smaps_kb(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(smaps_text_kb(&text))
}

/// [`smaps_kb`] of a smaps text.
pub fn smaps_text_kb(text: &str) -> (u64, u64) {
    let (mut other, mut guest, mut in_memfd) = (0, 0, false);
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_memfd = line.contains("/memfd:");
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kb: u64 = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if in_memfd {
                guest += kb;
            } else {
                other += kb;
            }
        }
    }
    (other, guest)
}

/// The pid of sandbox `name`'s VMM process, from `accordion status`.
pub fn vmm_pid(name: &str) -> u32 {
    let status = sandbox_status(name);
    status
        .get("vmm process")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no vmm process in the status of {name}: {status:?}"))
}

/// `Key:` of /proc/PID/status (or of a task's), split on whitespace.
pub fn proc_status_field(status: &str, key: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {status}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Asserts what the kernel says of VMM process `pid`: no capability, no_new_privs, a non-root
/// host uid and gid, every namespace its own, a root holding nothing of the host, and every thread
/// under seccomp (docs/security.md, "The VMM's jail").
pub fn assert_vmm_jailed(pid: u32) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status")).expect("vmm status");
    assert_eq!(
        proc_status_field(&status, "CapEff:"),
        ["0000000000000000"],
        "{status}"
    );
    assert_eq!(
        proc_status_field(&status, "CapPrm:"),
        ["0000000000000000"],
        "{status}"
    );
    assert_eq!(
        proc_status_field(&status, "CapBnd:"),
        ["0000000000000000"],
        "{status}"
    );
    assert_eq!(proc_status_field(&status, "NoNewPrivs:"), ["1"], "{status}");
    for key in ["Uid:", "Gid:"] {
        for id in proc_status_field(&status, key) {
            let id: u32 = id.parse().expect("numeric id");
            assert!(
                id >= 2_000_000_000,
                "{key} {id}: not the leased id; {status}"
            );
        }
    }
    for ns in ["mnt", "pid", "net", "user", "ipc", "uts", "cgroup"] {
        let host = std::fs::read_link(format!("/proc/1/ns/{ns}")).expect("host ns");
        let vmm = std::fs::read_link(proc.join("ns").join(ns)).expect("vmm ns");
        assert_ne!(host, vmm, "the vmm shares the host's {ns} namespace");
    }
    let root: Vec<_> = std::fs::read_dir(proc.join("root"))
        .expect("vmm root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(root.is_empty(), "the vmm's root holds {root:?}");
    let mut confined = Vec::new();
    for task in std::fs::read_dir(proc.join("task"))
        .expect("vmm threads")
        .flatten()
    {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let comm = comm.trim().to_string();
        assert_eq!(
            proc_status_field(&status, "CapEff:"),
            ["0000000000000000"],
            "{comm}"
        );
        assert_eq!(proc_status_field(&status, "NoNewPrivs:"), ["1"], "{comm}");
        if ["vsock", "virtio-net", "virtio-fs-irq"].contains(&comm.as_str()) {
            assert_eq!(proc_status_field(&status, "Seccomp:"), ["2"], "{comm}");
            confined.push(comm);
        }
    }
    assert!(
        confined.iter().any(|c| c == "vsock"),
        "no vsock thread in {confined:?}"
    );
}

#[cfg(test)]
mod smaps_tests {
    use super::{goal_line, smaps_kb, smaps_text_kb, Target};

    #[test]
    fn test_goal_lines_have_one_fixed_form() {
        assert_eq!(
            goal_line("net-throughput-vs-runc", 0.843, Target::AtLeast(0.8)),
            "goal net-throughput-vs-runc 0.84 >=0.8 met"
        );
        assert_eq!(
            goal_line("pod-start-vs-runc", 2.31, Target::AtMost(2.0)),
            "goal pod-start-vs-runc 2.31 <=2 unmet"
        );
        assert_eq!(
            goal_line("boot-vs-qemu", f64::NAN, Target::AtLeast(2.0)),
            "goal boot-vs-qemu NaN >=2 unmet"
        );
    }

    #[test]
    fn test_guest_ram_is_told_apart_and_a_gone_process_is_no_sample() {
        let text = "\
aaaac0000000-aaaac0200000 r-xp 00000000 00:02 12 /usr/bin/containerd-shim-accordion-v2
Size:               2048 kB
Rss:                1536 kB
ffff40000000-ffff60000000 rw-s 00000000 00:01 7 /memfd:accordion-guest-ram (deleted)
Size:             524288 kB
Rss:               65536 kB
ffff70000000-ffff70100000 rw-p 00000000 00:00 0
Rss:                 512 kB
";
        assert_eq!(smaps_text_kb(text), (2048, 65536));
        assert_eq!(smaps_kb(u32::MAX), None);
        assert!(smaps_kb(std::process::id()).is_some_and(|(kb, _)| kb > 0));
    }
}
