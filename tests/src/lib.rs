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

/// Pids of running `accordion` processes (sandbox owners and CLIs).
pub fn accordion_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/exe"))
                        .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "accordion"))
                })
                .collect()
        })
        .unwrap_or_default()
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

/// (resident KiB outside memfd mappings, resident KiB of memfd mappings) from /proc/PID/smaps.
/// Accordion's guest RAM is a memfd; binaries on the node's initramfs are shmem too, so the status
/// file's RssShmem cannot tell them apart, smaps can.
pub fn smaps_kb(pid: u32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (0, 0);
    };
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
