//! vCPU hotplug as an operator drives it: `accordion resize` on a running sandbox, with both guest
//! kernels (our minimal 6.12 and Debian's stock 6.12), checked against what the guest itself
//! reports. Runs in the emulated ARM64 node (or on an ARM64 KVM host); fails instead of skipping
//! when ACCORDION_REQUIRE_KVM=1 and KVM or the guest assets are missing.

use std::time::{Duration, Instant};

use accordion_tests::{
    accordion, assert_code, can_run, one_vm, sandbox_status, start_sandbox, text,
};

/// The guest's own online list.
fn guest_online(name: &str) -> String {
    let out = accordion(&["exec", name, "--", "cat", "/sys/devices/system/cpu/online"]);
    assert_code(&out, 0);
    text(&out.stdout).trim().to_string()
}

/// Resizes and checks the command's answer and the guest's own view.
fn resize_to(name: &str, vcpus: u32, expect_online: &str) {
    let out = accordion(&["resize", name, "--vcpus", &vcpus.to_string()]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains(&format!("(CPUs {expect_online})")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(guest_online(name), expect_online, "after resize to {vcpus}");
}

fn stop(name: &str) {
    assert_code(&accordion(&["stop", name]), 0);
}

/// What the issue asks of both kernels, in one sandbox.
fn resize_sequence(kernel: &str) {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let name = format!("rs-{}", kernel.to_lowercase());
    start_sandbox(&name, kernel);
    assert_eq!(guest_online(&name), "0");

    resize_to(&name, 4, "0-3");
    resize_to(&name, 2, "0-1");

    // Out of range: refused with a clear message, nothing changed.
    for bad in ["9", "0"] {
        let out = accordion(&["resize", &name, "--vcpus", bad]);
        assert_code(&out, 1);
        let err = text(&out.stderr);
        assert!(
            err.contains("InvalidArgument") && err.contains("1 to 8"),
            "{err}"
        );
    }
    assert_eq!(guest_online(&name), "0-1");

    // The rest of 1→4→2→8→1, then unplug and re-plug the same vCPU.
    resize_to(&name, 8, "0-7");
    resize_to(&name, 1, "0");
    resize_to(&name, 2, "0-1");
    resize_to(&name, 1, "0");
    resize_to(&name, 2, "0-1");

    // The same target again is a no-op.
    let out = accordion(&["resize", &name, "--vcpus", "2"]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("already 2 vCPUs"),
        "{}",
        text(&out.stdout)
    );

    // The guest cannot bring up an unplugged vCPU by itself (PSCI CPU_ON is denied), and the VM
    // carries on.
    let out = accordion(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "echo 1 > /sys/devices/system/cpu/cpu5/online",
    ]);
    assert_ne!(out.status.code(), Some(0), "cpu5 came online unplugged");
    assert_eq!(guest_online(&name), "0-1");

    let s = sandbox_status(&name);
    assert_eq!(s["state"], "running");
    assert!(
        s["vcpus"].starts_with("2 online in the guest, 2 plugged, 2 running, 8 possible"),
        "{s:?}"
    );
    assert_eq!(s["vcpus plugged"], "0-1");

    let out = accordion(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "dmesg | grep -iE 'ACPI Error|ACPI BIOS Error|FW_BUG|Firmware Bug'; true",
    ]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout), "", "guest dmesg shows ACPI errors");
    stop(&name);
}

#[test]
fn test_resize_sequence_minimal_kernel() {
    resize_sequence("Image");
}

#[test]
fn test_resize_sequence_debian_kernel() {
    resize_sequence("Image-debian");
}

/// (threads, fds) once they stop changing: the CLI calls just made may still be closing.
fn settled_counts(counts: impl Fn() -> (usize, usize)) -> (usize, usize) {
    let mut last = counts();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = counts();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn test_fifty_plug_unplug_cycles_leak_no_threads_or_fds() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("cycles", "Image");
    let pid = sandbox_status("cycles")["pid"].clone();
    // One cycle first, so lazily created resources exist before counting.
    resize_to("cycles", 2, "0-1");
    resize_to("cycles", 1, "0");
    let tasks = format!("/proc/{pid}/task");
    let fds = format!("/proc/{pid}/fd");
    let counts = || (count_entries(&tasks), count_entries(&fds));
    let before = settled_counts(counts);
    for _ in 0..50 {
        assert_code(&accordion(&["resize", "cycles", "--vcpus", "2"]), 0);
        assert_code(&accordion(&["resize", "cycles", "--vcpus", "1"]), 0);
    }
    assert_eq!(guest_online("cycles"), "0");
    // A leak grows with the 100 resizes; a connection the server is still closing does not.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = counts();
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = counts();
    }
    assert_eq!(after, before, "(threads, fds) of the sandbox process grew");
    stop("cycles");
}

#[test]
fn test_concurrent_resizes_latest_target_wins() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("race", "Image");
    let first = std::thread::spawn(|| accordion(&["resize", "race", "--vcpus", "8"]));
    // The second request goes out once the first has reached the VMM (its vCPUs are plugged at
    // once, before the guest acknowledges anything).
    let deadline = Instant::now() + Duration::from_secs(60);
    while sandbox_status("race")["vcpus plugged"] == "0" {
        assert!(Instant::now() < deadline, "the first resize never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = accordion(&["resize", "race", "--vcpus", "3"]);
    let first = first.join().expect("first resize");
    assert_code(&second, 0);
    // The first either finished before the second arrived or was superseded by it.
    if first.status.code() != Some(0) {
        assert!(
            text(&first.stderr).contains("Superseded"),
            "{}",
            text(&first.stderr)
        );
    }
    assert_eq!(guest_online("race"), "0-2");
    stop("race");
}

#[test]
fn test_guest_dying_during_resize_is_an_error_within_the_timeout() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("dies", "Image");
    let started = Instant::now();
    let resize =
        std::thread::spawn(|| accordion(&["resize", "dies", "--vcpus", "8", "--timeout", "30"]));
    std::thread::sleep(Duration::from_millis(100));
    let _ = accordion(&["exec", "dies", "--", "sh", "-c", "poweroff -f"]);
    let out = resize.join().expect("resize");
    // It may have finished before the guest went down; if not, it must say what happened.
    if out.status.code() != Some(0) {
        let err = text(&out.stderr);
        assert!(
            err.contains("not running") || err.contains("Lost the guest agent"),
            "{err}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(40), "resize hung");
    let s = sandbox_status("dies");
    assert_eq!(s["state"], "dead", "{s:?}");
    stop("dies");
}

/// One sample of `accordion metrics` text: the value of the series written exactly as `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `GET /metrics` from `accordion metrics --listen` on 127.0.0.1:`port`, once it answers.
fn fetch_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n")
                .expect("send the request");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .expect("read the response");
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "accordion metrics --listen never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_metrics_agree_with_status_and_count_each_resize() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    let name = "metrics";
    start_sandbox(name, "Image");
    resize_to(name, 3, "0-2");
    resize_to(name, 2, "0-1");
    // A refused target is not a resize: it is not counted.
    assert_code(&accordion(&["resize", name, "--vcpus", "9"]), 1);

    let out = accordion(&["metrics"]);
    assert_code(&out, 0);
    let m = text(&out.stdout);
    let status = sandbox_status(name);
    let s = |series: &str| format!("{series}{{sandbox=\"{name}\"");
    assert_eq!(
        metric(&m, &format!("{},state=\"online\"}}", s("accordion_vcpus"))),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            &format!("{},state=\"possible\"}}", s("accordion_vcpus"))
        ),
        Some(8.0)
    );
    assert!(
        status["vcpus"].starts_with("2 online in the guest, 2 plugged, 2 running, 8 possible"),
        "{}",
        status["vcpus"]
    );
    let configured = metric(
        &m,
        &format!("{},state=\"configured\"}}", s("accordion_memory_bytes")),
    )
    .expect("configured memory");
    let status_mib: f64 = status["memory"]
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("status memory");
    assert_eq!(configured, status_mib * 1048576.0);
    assert_eq!(
        metric(&m, &format!("{}}}", s("accordion_sandbox_up"))),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, &format!("{}}}", s("accordion_sandbox_running"))),
        Some(1.0)
    );
    let resizes = |direction: &str| {
        metric(
            &m,
            &format!(
                "{},kind=\"vcpus\",direction=\"{direction}\",outcome=\"ok\"}}",
                s("accordion_resize_duration_seconds_count")
            ),
        )
    };
    assert_eq!(
        (resizes("grow"), resizes("shrink")),
        (Some(1.0), Some(1.0)),
        "{m}"
    );
    assert!(
        metric(&m, &format!("{}}}", s("accordion_agent_rtt_seconds"))).is_some_and(|v| v > 0.0)
    );
    assert!(metric(
        &m,
        &format!(
            "{},phase=\"agent_ready\"}}",
            s("accordion_boot_phase_seconds")
        )
    )
    .is_some_and(|v| v > 0.0));
    // The VMM's guest RAM is shared memory; the guest has touched some of it.
    let vmm_shmem = format!(
        "{},process=\"vmm\",kind=\"shmem\"}}",
        s("accordion_process_resident_memory_bytes")
    );
    assert!(metric(&m, &vmm_shmem).is_some_and(|v| v > 0.0), "{m}");

    // Served over HTTP, the same families.
    let port = 19464;
    let mut server = std::process::Command::new("accordion")
        .args(["metrics", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start accordion metrics --listen");
    let response = fetch_metrics(port);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    assert!(response.contains("text/plain; version=0.0.4"), "{response}");
    assert!(
        response.contains(&format!("{},state=\"online\"}} 2", s("accordion_vcpus"))),
        "{response}"
    );
    stop(name);
    // A stopped sandbox is gone from the scrape.
    let out = accordion(&["metrics"]);
    assert!(!text(&out.stdout).contains(&format!("sandbox=\"{name}\"")));
}
