//! Helpers for tests that drive containerd in the node (`cargo xtask node-test --containerd`).

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::text;

/// containerd's runtime_type of Accordion's shim.
pub const RUNTIME: &str = "io.containerd.accordion.v2";
/// The locally built test image the node imports.
pub const TEST_IMAGE: &str = "localhost/accordion-test:latest";
const SOCKET: &str = "/run/containerd/containerd.sock";

/// Whether containerd runs here; panics under ACCORDION_REQUIRE_KVM=1 when not.
pub fn containerd_ready() -> bool {
    if std::path::Path::new(SOCKET).exists() {
        return true;
    }
    if std::env::var("ACCORDION_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("ACCORDION_REQUIRE_KVM=1 but containerd is not running ({SOCKET} is missing)");
    }
    eprintln!("SKIPPED: containerd is not running ({SOCKET} is missing)");
    false
}

/// containerd's own version, from the server half of `ctr version` (e.g. `2.1.9+unknown`).
pub fn server_version() -> Option<String> {
    let out = ctr(&["version"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let server = text.split("Server:").nth(1)?;
    server
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().trim_start_matches('v').to_string())
}

fn ctr_command(args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.args(args);
    c
}

/// Runs `ctr args…` (stdin from /dev/null).
pub fn ctr(args: &[&str]) -> Output {
    ctr_command(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ctr (is containerd installed?)")
}

/// Runs `ctr args…` feeding it `stdin`.
pub fn ctr_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = ctr_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ctr");
    let mut pipe = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    child.wait_with_output().expect("wait for ctr")
}

/// Starts `ctr args…` in the background, output captured.
pub fn spawn_ctr(args: &[&str]) -> Child {
    ctr_command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ctr")
}

/// Polls `check` every 200 ms until it returns Ok, or returns its last Err after `limit`.
pub fn wait_for<T, E>(limit: Duration, mut check: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Pids of running processes whose executable is named `name`, VMM processes (the same binary
/// run as `__accordion-vmm`) aside: see [`crate::vmm_pids`].
pub fn process_pids(name: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = crate::pids_of_executable(name)
        .into_iter()
        .filter(|&pid| !crate::is_vmm(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// What Accordion left behind: shims, virtiofsd, state directories, mounts under /run/accordion,
/// host cgroups of sandboxes without a cgroup parent (`/sys/fs/cgroup/accordion/<name>`).
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for name in ["containerd-shim-accordion-v2", "virtiofsd"] {
        for pid in process_pids(name) {
            left.push(format!("{name} process {pid}"));
        }
    }
    for pid in crate::vmm_pids() {
        left.push(format!("vmm process {pid}"));
    }
    for entry in crate::run_dir_entries() {
        left.push(format!("/run/accordion/{entry}"));
    }
    if let Ok(cgroups) = std::fs::read_dir("/sys/fs/cgroup/accordion") {
        for entry in cgroups.flatten().filter(|e| e.path().is_dir()) {
            left.push(format!("cgroup {}", entry.path().display()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        if let Some(point) = line.split(' ').nth(4) {
            if point.starts_with("/run/accordion") {
                left.push(format!("mount {point}"));
            }
        }
    }
    left
}

/// What a test failure needs to explain leftovers: the state and threads of every shim and
/// virtiofsd still running, and the end of containerd's log (where the shims log).
pub fn diagnose_leftovers() -> String {
    let mut out = String::new();
    for name in ["containerd-shim-accordion-v2", "virtiofsd"] {
        for pid in process_pids(name) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let state = status
                .lines()
                .filter(|l| l.starts_with("State") || l.starts_with("PPid"))
                .collect::<Vec<_>>()
                .join(", ");
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            out.push_str(&format!("{name} {pid}: {state}; cgroup {}", cgroup.trim()));
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for task in tasks.flatten() {
                    let read = |f: &str| {
                        std::fs::read_to_string(task.path().join(f))
                            .unwrap_or_default()
                            .trim()
                            .to_string()
                    };
                    out.push_str(&format!(
                        "\n  thread {} {} wchan {}",
                        read("comm"),
                        task.file_name().to_string_lossy(),
                        read("wchan")
                    ));
                }
            }
            out.push('\n');
        }
    }
    let log = std::fs::read_to_string("/var/log/containerd.log").unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    out.push_str("containerd.log (end):\n");
    out.push_str(&lines[lines.len().saturating_sub(80)..].join("\n"));
    out
}

/// Restarts containerd (the node's /accordion/containerd.sh), waiting until it answers.
pub fn restart_containerd() {
    let run = |arg: &str| {
        let out = Command::new("/accordion/containerd.sh")
            .arg(arg)
            .env("ACCORDION_NODE_QUIET", "1")
            .output()
            .expect("run /accordion/containerd.sh");
        assert!(
            out.status.success(),
            "containerd.sh {arg}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    };
    run("stop");
    run("start");
}
