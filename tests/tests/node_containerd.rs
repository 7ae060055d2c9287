//! containerd runs containers through containerd-shim-accordion-v2, driven with `ctr` as a user
//! would, in the emulated ARM64 node started with containerd (`cargo xtask node-test
//! --containerd`). Every test checks that nothing is left behind: no shim, no virtiofsd, no
//! state directory, no mount.

use std::process::Output;
use std::time::Duration;

use accordion_tests::containerd::{
    containerd_ready, ctr, leftovers, process_pids, restart_containerd, server_version, wait_for,
    RUNTIME, TEST_IMAGE,
};
use accordion_tests::{accordion, assert_code, can_run, one_vm, run_dir_entries, text};

/// `ctr run --rm` with our runtime.
fn ctr_run(id: &str, extra: &[&str], cmd: &[&str]) -> Output {
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.push(TEST_IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    ctr(&args)
}

/// `ctr task ls` as (task, status) pairs.
fn task_states() -> Vec<(String, String)> {
    let out = ctr(&["task", "ls"]);
    text(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.last()?.to_string()))
        })
        .collect()
}

/// Waits up to 120 s for task `id` to be RUNNING.
fn wait_running(id: &str) {
    wait_for(Duration::from_secs(120), || {
        let states = task_states();
        states
            .iter()
            .any(|(t, s)| t == id && s == "RUNNING")
            .then_some(())
            .ok_or(states)
    })
    .unwrap_or_else(|states| panic!("{id} not running: {states:?}"));
}

fn assert_clean() {
    let left = wait_for(Duration::from_secs(30), || {
        let l = leftovers();
        l.is_empty().then_some(()).ok_or(l)
    });
    if let Err(left) = left {
        panic!("left behind: {left:?}");
    }
}

/// The node's containerd is the one the run asked for (`--containerd=1.7|2.1` sets
/// ACCORDION_CONTAINERD), so a test run cannot claim a version it did not use.
#[test]
fn test_the_node_runs_the_containerd_version_it_was_asked_for() {
    if !containerd_ready() {
        return;
    }
    let Ok(wanted) = std::env::var("ACCORDION_CONTAINERD") else {
        // Only a containerd started by hand lacks it; xtask's node always sets it.
        assert_ne!(
            std::env::var("ACCORDION_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "ACCORDION_CONTAINERD is not set: which containerd was this node asked for?"
        );
        return;
    };
    let version = server_version().expect("ctr version names the server's version");
    assert!(
        version.starts_with(&format!("{wanted}.")),
        "asked for containerd {wanted}, the node runs {version}"
    );
}

#[test]
fn test_a_container_ends_with_its_init_even_when_children_hold_its_stdout() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // `sleep` outlives `sh` and holds the container's stdout: the container still ends (exit 3,
    // not after `sleep`'s 1000 s), as it does under runc with a PID namespace of its own.
    let started = std::time::Instant::now();
    let mut child = accordion_tests::containerd::spawn_ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "orphan",
        "sh",
        "-c",
        "sleep 1000 & echo parent; exit 3",
    ]);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ctr") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(120) {
            // What was stuck, before anything is torn down: the shim's and virtiofsd's threads,
            // the sandbox as the CLI sees it, the task, and containerd's last words.
            eprintln!(
                "ctr run did not return in 120 s:\n{}\n{}{}\n{}",
                accordion_tests::containerd::diagnose_leftovers(),
                text(&accordion(&["ps"]).stdout),
                text(&ctr(&["task", "ls"]).stdout),
                std::fs::read_to_string("/var/log/containerd.log")
                    .map(|log| {
                        let lines: Vec<&str> = log.lines().collect();
                        lines[lines.len().saturating_sub(40)..].join("\n")
                    })
                    .unwrap_or_default()
            );
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().expect("ctr output");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "parent");
}

#[test]
fn test_ctr_run_prints_output_and_propagates_the_exit_code() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let out = ctr_run("t1", &[], &["sh", "-c", "uname -m; nproc; exit 3"]);
    assert_code(&out, 3);
    assert_eq!(text(&out.stdout), "aarch64\n1\n");
    assert_clean();

    // stdin reaches the container and EOF ends it; stderr is kept apart.
    let out = accordion_tests::containerd::ctr_with_stdin(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            TEST_IMAGE,
            "t1b",
            "sh",
            "-c",
            "wc -c; echo oops >&2",
        ],
        &vec![b'x'; 100_000],
    );
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "100000");
    assert_eq!(text(&out.stderr).trim(), "oops");
    assert_clean();
}

#[test]
fn test_ctr_task_exec_and_kill() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // SIGTERM reaches the container's process, which exits with its own code.
    let run = accordion_tests::containerd::spawn_ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "t2",
        "sh",
        "-c",
        "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 1; done",
    ]);
    wait_running("t2");

    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t2",
        "sh",
        "-c",
        "echo in-exec; exit 4",
    ]);
    assert_code(&out, 4);
    assert_eq!(text(&out.stdout), "in-exec\n");

    let out = ctr(&["task", "ps", "t2"]);
    assert_code(&out, 0);

    // Pause/Resume: the guest's cgroup freezer; containerd sees the state.
    let state = || {
        task_states()
            .into_iter()
            .find(|(t, _)| t == "t2")
            .map(|(_, s)| s)
            .unwrap_or_default()
    };
    assert_code(&ctr(&["task", "pause", "t2"]), 0);
    assert_eq!(state(), "PAUSED");
    assert_code(&ctr(&["task", "resume", "t2"]), 0);
    assert_eq!(state(), "RUNNING");

    // Stats: containerd decodes the shim's cgroup v2 metrics.
    let out = ctr(&["task", "metrics", "t2"]);
    assert_code(&out, 0);
    assert!(!text(&out.stdout).trim().is_empty());

    let out = ctr(&["task", "kill", "-s", "SIGTERM", "t2"]);
    assert_code(&out, 0);
    let out = run.wait_with_output().expect("ctr run");
    assert_code(&out, 42);
    assert!(
        text(&out.stdout).contains("got TERM"),
        "{}",
        text(&out.stdout)
    );
    assert_clean();

    // SIGKILL: 128 + 9.
    let run = accordion_tests::containerd::spawn_ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "t3",
        "sleep",
        "3600",
    ]);
    wait_running("t3");
    let out = ctr(&["task", "kill", "-s", "SIGKILL", "t3"]);
    assert_code(&out, 0);
    let out = run.wait_with_output().expect("ctr run");
    assert_code(&out, 137);
    assert_clean();
}

#[test]
fn test_bad_input_gives_a_clear_error_and_leaks_nothing() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // An unknown key in the runtime's config (containerd's runtime options, ConfigPath).
    std::fs::write("/tmp/accordion-bad.toml", "bogus_key = 1\n").expect("write");
    let out = ctr_run(
        "b1",
        &["--runtime-config-path", "/tmp/accordion-bad.toml"],
        &["true"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("bogus_key"),
        "{}",
        text(&out.stderr)
    );
    assert_clean();

    // A bind mount whose source does not exist.
    let out = ctr_run(
        "b2",
        &[
            "--mount",
            "type=bind,src=/nonexistent/dir,dst=/data,options=rbind:ro",
        ],
        &["true"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("/nonexistent/dir"),
        "{}",
        text(&out.stderr)
    );
    assert_clean();

    // A rootfs that does not exist.
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--rootfs",
        "/nonexistent/rootfs",
        "b3",
        "true",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("/nonexistent/rootfs"),
        "{}",
        text(&out.stderr)
    );
    let _ = ctr(&["container", "rm", "b3"]);
    assert_clean();
}

#[test]
fn test_containerd_restart_and_shim_kill() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let out = ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "r1",
        "sleep",
        "3600",
    ]);
    assert_code(&out, 0);
    let shims = process_pids("containerd-shim-accordion-v2");
    assert_eq!(shims.len(), 1, "one shim for the container: {shims:?}");

    // containerd restarts; the container keeps running and containerd reconnects to the shim.
    restart_containerd();
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "r1",
        "sh",
        "-c",
        "echo still-here",
    ]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout), "still-here\n");
    assert_eq!(process_pids("containerd-shim-accordion-v2"), shims);

    // The shim dies: containerd's cleanup (`shim delete`) removes the VM's files.
    let pid = shims[0];
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    wait_for(Duration::from_secs(60), || {
        let out = ctr(&["task", "ls"]);
        let t = text(&out.stdout);
        (!t.lines()
            .any(|l| l.starts_with("r1 ") && l.contains("RUNNING")))
        .then_some(())
        .ok_or(t)
    })
    .expect("containerd saw the shim die");
    let _ = ctr(&["task", "delete", "-f", "r1"]);
    let out = ctr(&["container", "rm", "r1"]);
    assert_code(&out, 0);
    assert!(
        !run_dir_entries().contains(&"r1".to_string()),
        "state left: {:?}",
        run_dir_entries()
    );
    assert_clean();
}

#[test]
fn test_the_guest_cannot_change_the_share_skeleton_but_writes_its_rootfs_and_volume() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let vol = "/tmp/accordion-share-volume";
    let _ = std::fs::remove_dir_all(vol);
    std::fs::create_dir_all(vol).expect("volume");
    let out = ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &format!("type=bind,src={vol},dst=/data,options=rbind:rw"),
        TEST_IMAGE,
        "s1",
        "sleep",
        "3600",
    ]);
    assert_code(&out, 0);
    wait_running("s1");

    // Root in the guest (what a compromised guest is), on the share: the container's directory
    // and its mounts/ are read-only (nothing in them can be created, renamed or replaced), its
    // rootfs is not.
    let dir = "/run/accordion/containers/s1";
    let script = format!(
        "erofs() {{ grep -q 'Read-only file system' && echo \"$1: EROFS\"; }}\n\
         mkdir {dir}/x 2>&1 | erofs mkdir\n\
         ln -s / {dir}/mounts/evil 2>&1 | erofs symlink\n\
         mv {dir}/mounts {dir}/moved 2>&1 | erofs rename\n\
         touch {dir}/rootfs/from-the-guest && echo 'rootfs: writable'"
    );
    let out = accordion(&["exec", "s1", "--", "sh", "-c", &script]);
    assert_eq!(
        text(&out.stdout),
        "mkdir: EROFS\nsymlink: EROFS\nrename: EROFS\nrootfs: writable\n",
        "{}",
        text(&out.stderr)
    );

    // In the container: its rootfs and its read-write volume are writable, and the host sees the
    // volume's file.
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "w1",
        "s1",
        "sh",
        "-c",
        "echo r > /written && cat /written && echo v > /data/f && cat /data/f",
    ]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout), "r\nv\n");
    assert_eq!(
        std::fs::read_to_string(format!("{vol}/f")).expect("the volume's file"),
        "v\n"
    );

    let _ = ctr(&["task", "delete", "-f", "s1"]);
    assert_code(&ctr(&["container", "rm", "s1"]), 0);
    assert_clean();
    let _ = std::fs::remove_dir_all(vol);
}

/// A volume with a submount, bound read-only (`ro`: the volume only, as runc does it) and
/// recursively read-only (`rro`: Kubernetes' recursiveReadOnly, the submount too).
#[test]
fn test_read_only_volume_keeps_a_writable_submount_unless_recursive() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let vol = "/tmp/accordion-ro-volume";
    let sub = format!("{vol}/sub");
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .args(["-c", script])
            .output()
            .expect("sh");
        assert!(out.status.success(), "{script}: {}", text(&out.stderr));
    };
    sh(&format!(
        "umount {sub} 2>/dev/null; rm -rf {vol}; mkdir -p {sub} && mount -t tmpfs sub {sub}"
    ));
    let out = ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &format!("type=bind,src={vol},dst=/ro,options=rbind:ro"),
        "--mount",
        &format!("type=bind,src={vol},dst=/rro,options=rbind:rro"),
        TEST_IMAGE,
        "ro1",
        "sleep",
        "3600",
    ]);
    assert_code(&out, 0);
    wait_running("ro1");
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "w1",
        "ro1",
        "sh",
        "-c",
        "for d in /ro /ro/sub /rro /rro/sub; do \
           if touch $d/f 2>/dev/null; then echo \"$d: writable\"; else echo \"$d: read-only\"; fi; \
         done",
    ]);
    assert_code(&out, 0);
    assert_eq!(
        text(&out.stdout),
        "/ro: read-only\n/ro/sub: writable\n/rro: read-only\n/rro/sub: read-only\n",
        "{}",
        text(&out.stderr)
    );
    // The writable submount is the host's: the file is there.
    assert!(std::path::Path::new(&format!("{sub}/f")).exists());
    assert!(!std::path::Path::new(&format!("{vol}/f")).exists());

    let _ = ctr(&["task", "delete", "-f", "ro1"]);
    assert_code(&ctr(&["container", "rm", "ro1"]), 0);
    assert_clean();
    sh(&format!("umount {sub} && rm -rf {vol}"));
}
