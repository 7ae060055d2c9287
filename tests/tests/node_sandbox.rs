//! Detached sandboxes as an operator drives them: `accordion run -d`, `exec`, `status`, `ps`,
//! `stop`, in the emulated ARM64 node (or on an ARM64 KVM host). Fails instead of skipping when
//! ACCORDION_REQUIRE_KVM=1 and KVM or the guest assets are missing.

use std::time::{Duration, Instant};

use accordion_tests::{
    accordion, accordion_pids, accordion_with_stdin, assert_code, assert_vmm_jailed, can_run,
    one_vm, run_dir_entries, sandbox_status, start_sandbox, text, vmm_pid,
};

/// Stops `name` and checks nothing of it is left: no state directory, and its process (which
/// held the VM, its vCPU threads and sockets) gone.
fn stop_and_check_clean(name: &str) {
    let pid: u32 = sandbox_status(name)["pid"].parse().expect("pid");
    let out = accordion(&["stop", name]);
    assert_code(&out, 0);
    assert!(
        !run_dir_entries().contains(&name.to_string()),
        "state directory left: {:?}",
        run_dir_entries()
    );
    assert!(
        !accordion_pids().contains(&pid),
        "sandbox process {pid} still runs"
    );
}

#[test]
fn test_detached_run_exec_status_ps_stop_leave_nothing() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("b1", "Image");

    let out = accordion(&["exec", "b1", "--", "nproc"]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout), "1\n");

    let out = accordion(&[
        "exec",
        "b1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_code(&out, 5);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let out = accordion(&["exec", "b1", "--", "sh", "-c", "kill -9 $$"]);
    assert_code(&out, 137);

    let input: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let out = accordion_with_stdin(&["exec", "b1", "--", "cat"], Some(&input));
    assert_code(&out, 0);
    assert!(out.stdout == input, "stdin did not come back intact");

    let out = accordion(&[
        "exec",
        "b1",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $GREETING $PWD",
    ]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout), "hi /tmp\n");

    let s = sandbox_status("b1");
    assert_eq!(s["state"], "running", "{s:?}");
    assert!(
        s["vcpus"].starts_with("1 online in the guest, 1 plugged, 1 running, 8 possible"),
        "{s:?}"
    );
    assert_eq!(s["guest cpus online"], "0");
    assert!(!s["agent version"].is_empty(), "{s:?}");
    assert!(s["boot"].contains("agent ready"), "{s:?}");
    assert!(
        !s["boot"].contains("guest init n/a"),
        "no boot-timer write: {s:?}"
    );

    let out = accordion(&["ps"]);
    assert_code(&out, 0);
    let ps = text(&out.stdout);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("b1 ") && l.contains("running") && l.contains("1/8")),
        "{ps}"
    );

    // The same name again is refused and does not disturb the first.
    let out = accordion(&["run", "-d", "--name", "b1"]);
    assert_code(&out, 125);
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(sandbox_status("b1")["state"], "running");

    stop_and_check_clean("b1");
}

#[test]
fn test_stop_and_exec_of_unknown_name_are_clear_errors() {
    let _vm = one_vm();
    let out = accordion(&["stop", "nosuch"]);
    assert_code(&out, 1);
    assert!(
        text(&out.stderr).contains("No sandbox named \"nosuch\""),
        "{}",
        text(&out.stderr)
    );
    let out = accordion(&["exec", "nosuch", "--", "true"]);
    assert_code(&out, 125);
    assert!(
        text(&out.stderr).contains("No sandbox named"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn test_guest_that_dies_is_reported_dead_then_stop_cleans_up() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("dying", "Image");
    // The guest goes away under the agent (reboot(2) straight from a command, no agent involved).
    let _ = accordion(&["exec", "dying", "--", "sh", "-c", "poweroff -f"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = sandbox_status("dying");
        if s["state"] == "dead" {
            assert!(s.contains_key("exit reason"), "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still not dead: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = accordion(&["exec", "dying", "--", "true"]);
    assert_code(&out, 125);
    assert!(text(&out.stderr).contains("dead"), "{}", text(&out.stderr));
    stop_and_check_clean("dying");
}

#[test]
fn test_killed_sandbox_process_leaves_state_that_stop_and_run_clean() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("orphan", "Image");
    let pid = sandbox_status("orphan")["pid"].parse::<i32>().expect("pid");
    // SIGKILL: the owner cannot clean up; its state directory stays behind.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(500));
    let out = accordion(&["ps"]);
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("orphan ") && l.contains("stale")),
        "{}",
        text(&out.stdout)
    );
    // A new sandbox of that name replaces the stale state.
    start_sandbox("orphan", "Image");
    assert_eq!(sandbox_status("orphan")["state"], "running");
    stop_and_check_clean("orphan");
}

/// Open descriptors and threads of process `pid`.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |dir: String| std::fs::read_dir(dir).map_or(0, |d| d.count());
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

#[test]
fn test_the_vmm_runs_jailed_resizes_leak_nothing_and_its_death_is_reported() {
    if !can_run() {
        return;
    }
    let _vm = one_vm();
    start_sandbox("jailed", "Image");
    let owner: u32 = sandbox_status("jailed")["pid"].parse().expect("pid");
    let vmm = vmm_pid("jailed");
    assert_ne!(owner, vmm);
    assert_vmm_jailed(vmm);
    // The jail's own cost is reported, and is part of creating the VM.
    let boot = sandbox_status("jailed")["boot"].clone();
    let number_after = |key: &str| -> f64 {
        let rest = boot
            .split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("{key} in {boot:?}"));
        rest.split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{boot:?}"))
    };
    let (created, jail) = (number_after("VM created "), number_after("(jail "));
    assert!(jail > 0.0 && jail < created, "{boot:?}");
    let cgroup = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert_eq!(
        cgroup(vmm),
        cgroup(owner),
        "the vmm is charged where its owner is"
    );

    let resize = |n: &str| {
        let out = accordion(&["resize", "jailed", "--vcpus", n]);
        assert_code(&out, 0);
    };
    // One cycle first: threads and descriptors that live from the first resize on are not leaks.
    resize("2");
    resize("1");
    let before = (fds_and_threads(owner), fds_and_threads(vmm));
    for _ in 0..50 {
        resize("2");
        resize("1");
    }
    let after = (fds_and_threads(owner), fds_and_threads(vmm));
    assert_eq!(
        before, after,
        "(owner, vmm) (fds, threads) before and after 50 resize cycles"
    );

    // A VMM killed from outside: the sandbox is dead, says why, and stops cleanly.
    let killed = std::process::Command::new("kill")
        .args(["-9", &vmm.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = sandbox_status("jailed");
        if s["state"] == "dead" {
            let reason = s.get("exit reason").cloned().unwrap_or_default();
            assert!(reason.contains("SIGKILL"), "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still not dead: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!std::path::Path::new(&format!("/proc/{vmm}")).exists());
    stop_and_check_clean("jailed");
}
