//! Fault drills through containerd's CRI (`cargo xtask node-test --containerd`): a pod's guest
//! panics, its virtiofsd dies, its shim is killed in the middle of a resize, containerd restarts
//! under it, its guest floods the console. Each ends with the pod reported as kubelet needs it and
//! nothing left behind.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use accordion_tests::containerd::{
    containerd_ready, ctr, process_pids, restart_containerd, wait_for, RUNTIME, TEST_IMAGE,
};
use accordion_tests::cri_cli::{assert_no_leftovers, cri, cri_ok, write_json};
use accordion_tests::{accordion, can_run, one_vm, text};

/// How soon the shim must report every process of a dead pod exited.
const EXIT_REPORTED_WITHIN: Duration = Duration::from_secs(2);

/// A CRI pod with runtime `accordion`; removed (and checked clean) by `remove`, or at least
/// removed when a failed test drops it.
struct Pod {
    id: String,
    config: String,
    removed: bool,
}

impl Pod {
    fn run(name: &str) -> Pod {
        let config = write_json(
            &format!("fault-pod-{name}"),
            &serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-fault-{name}"), "attempt": 1},
                "log_directory": format!("/tmp/pods/fault-{name}"),
                "linux": {},
            }),
        );
        let id = cri_ok(&["runp", "--runtime", "accordion", &config]);
        Pod {
            id,
            config,
            removed: false,
        }
    }

    /// A container running `script`, limited to `cpus` CPUs; returns its id once started.
    fn container(&self, name: &str, cpus: i64, script: &str) -> String {
        let config = write_json(
            &format!("fault-ctr-{name}"),
            &serde_json::json!({
                "metadata": {"name": name},
                "image": {"image": TEST_IMAGE},
                "command": ["sh", "-c", script],
                "log_path": format!("{name}.log"),
                "linux": {"resources": {"cpu_quota": cpus * 100_000, "cpu_period": 100_000}},
            }),
        );
        let id = cri_ok(&["create", &self.id, &config, &self.config]);
        cri_ok(&["start", &id]);
        id
    }

    fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/accordion").join(&self.id)
    }

    fn remove(mut self) {
        self.removed = true;
        cri_ok(&["stopp", &self.id]);
        cri_ok(&["rmp", &self.id]);
        assert_no_leftovers(&format!("removing pod {}", self.id));
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if !self.removed {
            let _ = cri(&["stopp", &self.id]);
            let _ = cri(&["rmp", &self.id]);
        }
    }
}

/// A container's CRI state, exit time (ns since the epoch) and exit code.
fn container_state(id: &str) -> (String, i64, i64) {
    let v: serde_json::Value = serde_json::from_str(&cri_ok(&["inspect", id])).expect("json");
    let status = &v["status"];
    (
        status["state"].as_str().unwrap_or_default().to_string(),
        status["finishedAt"].as_i64().unwrap_or(0),
        status["exitCode"].as_i64().unwrap_or(-1),
    )
}

/// Waits for container `id` to be reported exited; returns when it exited and its code.
fn wait_exited(id: &str) -> (SystemTime, i64) {
    let (_, finished, code) = wait_for(Duration::from_secs(60), || {
        let s = container_state(id);
        (s.0 == "CONTAINER_EXITED").then_some(s.clone()).ok_or(s)
    })
    .unwrap_or_else(|s| panic!("container {id} was not reported exited: {s:?}"));
    let at = UNIX_EPOCH + Duration::from_nanos(u64::try_from(finished).expect("finishedAt"));
    (at, code)
}

fn seconds_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The pod's console (current and rotated file), as text.
fn console(pod: &Pod) -> String {
    let mut all = String::new();
    for name in ["console.log.1", "console.log"] {
        if let Ok(bytes) = std::fs::read(pod.state_dir().join(name)) {
            all.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    all
}

/// containerd's log, where the shim's log lines end up.
fn containerd_log() -> String {
    std::fs::read_to_string("/var/log/containerd.log").unwrap_or_default()
}

/// The host cgroup directory process `pid` runs in (for a shim: its pod's, containerd's
/// `linux.cgroupsPath` of the sandbox, `/k8s.io/<pod>` without a cgroup parent).
fn host_cgroup(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    PathBuf::from("/sys/fs/cgroup").join(relative.trim_start_matches('/'))
}

/// The parent pid of `pid` (/proc/<pid>/stat, after the command's closing parenthesis).
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// How many vCPU threads (`vcpu<N>`) process `pid` runs.
fn vcpu_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("vcpu"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn test_guest_kernel_panic_reports_every_process_exited_within_2s_and_the_pod_is_removable() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let pod = Pod::run("panic");
    let c = pod.container("main", 1, "exec sleep 3600");
    let cgroup = host_cgroup(process_pids("containerd-shim-accordion-v2")[0]);

    // Guest root makes its kernel panic: panic on OOM, then one allocation of all its memory.
    let trigger = std::thread::spawn({
        let id = pod.id.clone();
        move || {
            accordion(&[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "echo 1 > /proc/sys/vm/panic_on_oom; \
                 dd if=/dev/zero of=/dev/null bs=$(awk '/MemTotal/{print $2}' /proc/meminfo)k count=1",
            ])
        }
    });
    let panicked_at = wait_for(Duration::from_secs(120), || {
        console(&pod)
            .contains("Kernel panic")
            .then(SystemTime::now)
            .ok_or(())
    })
    .expect("the guest kernel panicked");
    let (exited_at, code) = wait_exited(&c);
    let _ = trigger.join();

    let delay = seconds_between(panicked_at, exited_at);
    assert!(
        delay < EXIT_REPORTED_WITHIN.as_secs_f64(),
        "exit reported {delay:.2} s after the panic"
    );
    assert_eq!(code, 255);
    let log = containerd_log();
    assert!(
        log.lines().any(|l| l.contains(&pod.id)
            && l.contains("its VM stopped")
            && l.contains("reported exited")),
        "no reason in the shim's log"
    );
    println!("guest panic: exit reported {delay:.2} s after the panic line");
    pod.remove();
    assert!(!cgroup.exists(), "host cgroup {cgroup:?} left");
}

#[test]
fn test_the_vmm_process_killed_reports_every_process_exited_within_2s_and_the_pod_is_removable() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let pod = Pod::run("vmmkill");
    let c = pod.container("main", 1, "exec sleep 3600");
    let shims = process_pids("containerd-shim-accordion-v2");
    let cgroup = host_cgroup(shims[0]);
    let vmms = accordion_tests::vmm_pids();
    assert_eq!(vmms.len(), 1, "one vmm: {vmms:?}");
    assert_eq!(
        host_cgroup(vmms[0]),
        cgroup,
        "the vmm runs in the pod's cgroup"
    );

    let killed_at = SystemTime::now();
    let out = std::process::Command::new("kill")
        .args(["-9", &vmms[0].to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (exited_at, code) = wait_exited(&c);
    let delay = seconds_between(killed_at, exited_at);
    assert!(
        delay < EXIT_REPORTED_WITHIN.as_secs_f64(),
        "exit reported {delay:.2} s after the kill"
    );
    assert_eq!(code, 255);
    assert!(
        containerd_log()
            .lines()
            .any(|l| l.contains(&pod.id) && l.contains("its VMM process")),
        "no reason in the shim's log"
    );
    // The shim outlives its VMM: containerd deletes the dead sandbox's task through it, and the
    // pod is removed as usual, leaving nothing.
    pod.remove();
    assert!(!cgroup.exists(), "host cgroup {cgroup:?} left");
}

#[test]
fn test_virtiofsd_killed_under_a_running_container_reports_it_exited_not_hung() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let pod = Pod::run("virtiofsd");
    let c = pod.container(
        "main",
        1,
        "while :; do cat /etc/accordion-test >/dev/null; sleep 0.1; done",
    );
    // virtiofsd's namespace sandbox is a waiting parent and the server, its child: the server
    // is what dies when virtiofsd crashes.
    let virtiofsd = process_pids("virtiofsd");
    assert_eq!(
        virtiofsd.len(),
        2,
        "virtiofsd and its server: {virtiofsd:?}"
    );
    let server = *virtiofsd
        .iter()
        .find(|pid| virtiofsd.contains(&parent_of(**pid)))
        .expect("virtiofsd's server");
    let cgroup = host_cgroup(server);
    assert!(
        cgroup.ends_with(&pod.id),
        "virtiofsd in the pod's cgroup: {cgroup:?}"
    );

    let killed_at = SystemTime::now();
    let out = std::process::Command::new("kill")
        .args(["-9", &server.to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (exited_at, code) = wait_exited(&c);

    let delay = seconds_between(killed_at, exited_at);
    assert!(
        delay < EXIT_REPORTED_WITHIN.as_secs_f64(),
        "exit reported {delay:.2} s after virtiofsd died"
    );
    assert_eq!(code, 255);
    assert!(
        containerd_log()
            .lines()
            .any(|l| l.contains(&pod.id) && l.contains("virtiofsd") && l.contains("exited")),
        "no reason in the shim's log"
    );
    // The dead pod answers at once, with the reason.
    let started = Instant::now();
    let out = cri(&["exec", &c, "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(30));
    println!("virtiofsd killed: exit reported {delay:.2} s later");
    pod.remove();
    assert!(!cgroup.exists(), "host cgroup {cgroup:?} left");
}

#[test]
fn test_shim_killed_during_a_resize_then_pod_removal_leaves_nothing() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let pod = Pod::run("shimkill");
    let c = pod.container("main", 1, "exec sleep 3600");
    let shims = process_pids("containerd-shim-accordion-v2");
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    let cgroup = host_cgroup(shims[0]);
    assert!(
        cgroup.ends_with(&pod.id) && cgroup.is_dir(),
        "the pod's host cgroup {cgroup:?}"
    );

    let resize = std::thread::spawn({
        let c = c.clone();
        move || {
            cri(&[
                "update",
                "--cpu-quota",
                "400000",
                "--cpu-period",
                "100000",
                &c,
            ])
        }
    });
    // In flight: the guest has turned a new vCPU on (its thread, `vcpu1`…, runs in the shim's
    // VMM process), and the resize to four is not acknowledged until all four are online.
    let vmms = accordion_tests::vmm_pids();
    assert_eq!(vmms.len(), 1, "one vmm: {vmms:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while vcpu_threads(vmms[0]) < 2 {
        assert!(Instant::now() < deadline, "the resize never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = std::process::Command::new("kill")
        .args(["-9", &shims[0].to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let update = resize.join().expect("update thread");
    assert_ne!(update.status.code(), Some(0), "the resize cannot succeed");
    // containerd notices the dead shim, runs its cleanup (`shim delete`) and reports the
    // container exited, as kubelet then sees it; kubelet stops and removes the pod after that.
    let (_, code) = wait_exited(&c);
    assert_eq!(code, 255);

    pod.remove();
    assert!(!cgroup.exists(), "host cgroup {cgroup:?} left");
}

#[test]
fn test_containerd_restart_keeps_the_pod_working_and_resizable() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let pod = Pod::run("restart");
    let c = pod.container("main", 1, "exec sleep 3600");
    let shims = process_pids("containerd-shim-accordion-v2");

    restart_containerd();

    assert_eq!(process_pids("containerd-shim-accordion-v2"), shims);
    let out = cri(&["exec", &c, "--", "sh", "-c", "echo still-here"]);
    assert_eq!(text(&out.stdout), "still-here\n", "{}", text(&out.stderr));
    cri_ok(&[
        "update",
        "--cpu-quota",
        "200000",
        "--cpu-period",
        "100000",
        &c,
    ]);
    let out = cri(&["exec", &c, "--", "cat", "/sys/devices/system/cpu/online"]);
    assert_eq!(text(&out.stdout).trim(), "0-1", "{}", text(&out.stderr));
    pod.remove();
}

#[test]
fn test_a_guest_flooding_its_console_stays_within_the_cap_and_the_pod_keeps_working() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // The node's configuration with the smallest console cap.
    const CAP: u64 = 64 * 1024;
    let config = std::fs::read_to_string("/etc/accordion/config.toml").expect("node config");
    let flood_config = "/tmp/accordion-flood.toml";
    std::fs::write(
        flood_config,
        format!("{config}\n[console]\nmax_kib = {}\n", CAP / 1024),
    )
    .expect("write config");
    let id = "flood";
    let out = ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        flood_config,
        TEST_IMAGE,
        id,
        "sleep",
        "3600",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let state = PathBuf::from("/run/accordion").join(id);

    // Guest root writes four times the cap to its serial console, numbered lines, then a marker.
    let flood = accordion(&[
        "exec",
        id,
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 4096 ]; do echo \"flood $i 0123456789012345678901234567890123456789012345678\"; \
         i=$((i+1)); done > /dev/ttyS0; echo flood-end > /dev/ttyS0",
    ]);
    assert_eq!(flood.status.code(), Some(0), "{}", text(&flood.stderr));
    let on_disk: u64 = ["console.log", "console.log.1"]
        .iter()
        .filter_map(|f| std::fs::metadata(state.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let newest = std::fs::read_to_string(state.join("console.log")).unwrap_or_default();
    // The pod still answers.
    let out = ctr(&["task", "exec", "--exec-id", "after", id, "echo", "alive"]);

    assert!(
        on_disk <= CAP,
        "{on_disk} bytes of console on /run (cap {CAP})"
    );
    assert!(newest.contains("flood-end"), "the newest lines are kept");
    assert_eq!(text(&out.stdout), "alive\n", "{}", text(&out.stderr));
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for(Duration::from_secs(60), || {
        let out = ctr(&["task", "delete", id]);
        out.status.success().then_some(()).ok_or(text(&out.stderr))
    })
    .expect("task deleted");
    let out = ctr(&["container", "rm", id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_no_leftovers("removing the flooding container");
}
