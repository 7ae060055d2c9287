//! The agent's Containers service in a real microVM: `Sandbox::boot` with the minimal kernel and
//! the agent as PID 1, a busybox bundle built in the guest through Exec, OCI containers run by
//! libcontainer in the guest. Needs KVM and the guest assets (the emulated ARM64 node); skipped
//! elsewhere, and fails instead under ACCORDION_REQUIRE_KVM=1. The two tests boot one guest each
//! and run side by side.

use std::time::{Duration, Instant};

use accordion_runtime::agent_client::{
    AgentClient, AgentClientError, ContainerCreate, ContainerStatus, ExecSpec,
};
use accordion_runtime::sandbox::{self, Sandbox, SandboxSpec};
use tonic::Code;

const BUNDLES: &str = "/run/accordion/containers";
/// Generous: the guest is nested inside an emulated node.
const RPC: Duration = Duration::from_secs(120);

fn can_run() -> bool {
    let share = sandbox::share_dir().join("guest");
    let missing = if !std::path::Path::new("/dev/kvm").exists() {
        Some("/dev/kvm is missing".to_string())
    } else if !share.join("agent-initrd.cpio").exists() {
        Some(format!("no guest assets in {}", share.display()))
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

async fn boot(name: &str, extra_cmdline: &str) -> Sandbox {
    let share = sandbox::share_dir().join("guest");
    let spec = SandboxSpec {
        name: name.into(),
        kernel: share.join("Image"),
        initrd: share.join("agent-initrd.cpio"),
        extra_cmdline: extra_cmdline.into(),
        vcpus: 1,
        max_vcpus: 2,
        memory_mib: 512,
        max_memory_mib: None,
        agent_timeout: Duration::from_secs(120),
        cgroups_path: None,
        cpu_limit_millis: None,
        host: Default::default(),
        console_max_bytes: accordion_runtime::config::Config::default().console_max_bytes(),
    };
    Sandbox::boot(&spec).await.expect("boot")
}

/// Runs a shell command in the guest (outside any container); returns (code, stdout).
async fn guest_sh(agent: &AgentClient, script: &str) -> (i32, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = agent
        .exec(
            &["sh", "-c", script],
            &[],
            None::<tokio::io::Empty>,
            &mut out,
            &mut err,
        )
        .await
        .expect("guest exec");
    (
        status.shell_code(),
        String::from_utf8_lossy(&out).into_owned() + &String::from_utf8_lossy(&err),
    )
}

/// A bundle whose rootfs is the initramfs's static busybox with a few applets.
async fn make_bundle(agent: &AgentClient, id: &str) -> String {
    let bundle = format!("{BUNDLES}/{id}");
    let script = format!(
        "set -e; r={bundle}/rootfs; mkdir -p $r/bin $r/proc $r/dev $r/sys $r/tmp; \
         cp /bin/busybox $r/bin/busybox; \
         for a in sh echo hostname sleep cat true mkdir; do ln -s busybox $r/bin/$a; done"
    );
    let (code, out) = guest_sh(agent, &script).await;
    assert_eq!(code, 0, "bundle: {out}");
    bundle
}

fn spec_json(hostname: &str, args: &[&str]) -> Vec<u8> {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ];
    spec_text(hostname, args, &caps).into_bytes()
}

/// A minimal runc-style spec, written out by hand (the runtime crate does not depend on serde).
fn spec_text(hostname: &str, args: &[&str], caps: &[&str]) -> String {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let caps = list(caps);
    format!(
        r#"{{
  "ociVersion": "1.0.2",
  "root": {{"path": "rootfs"}},
  "hostname": "{hostname}",
  "process": {{
    "args": [{args}],
    "cwd": "/",
    "env": ["PATH=/bin", "HOME=/"],
    "user": {{"uid": 0, "gid": 0}},
    "noNewPrivileges": true,
    "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}}],
    "capabilities": {{"bounding": [{caps}], "effective": [{caps}], "permitted": [{caps}]}}
  }},
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}},
    {{"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}},
    {{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "mount"}}, {{"type": "uts"}}, {{"type": "ipc"}}, {{"type": "network"}}],
    "maskedPaths": ["/proc/kcore"],
    "seccomp": {{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_AARCH64"],
                "syscalls": [{{"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}}]}},
    "readonlyPaths": ["/proc/sys"]
  }}
}}"#,
        args = list(args),
    )
}

async fn create(agent: &AgentClient, id: &str, bundle: &str, hostname: &str, args: &[&str]) {
    agent
        .create_container(ContainerCreate {
            id: id.into(),
            bundle: bundle.into(),
            spec_json: spec_json(hostname, args),
            tty: false,
        })
        .await
        .expect("create");
}

fn rpc_code(err: &AgentClientError) -> Option<Code> {
    match err {
        AgentClientError::Rpc { code, .. } => Some(*code),
        _ => None,
    }
}

async fn assert_gone(agent: &AgentClient, id: &str) {
    let (code, out) = guest_sh(
        agent,
        &format!(
            "for p in /sys/fs/cgroup/accordion/{id} /run/accordion/bundles/{id} /run/accordion/state/{id}; do \
             if [ -e $p ]; then echo left: $p; fi; done"
        ),
    )
    .await;
    assert_eq!((code, out.as_str()), (0, ""), "state left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_containers_lifecycle_in_a_real_guest() {
    if !can_run() {
        return;
    }
    let sandbox = boot(&format!("ctr-{}", std::process::id()), "").await;
    let agent = sandbox.agent().with_rpc_timeout(RPC);

    // 0. No accordion.share on the command line: nothing mounted, nothing reported.
    let info = agent.guest_info().await.expect("guest info");
    assert_eq!((info.share_tag, info.share_error), (None, None));
    assert_eq!(bundles_mount(&agent).await, "", "a mount on {BUNDLES}");

    // 1. Output and exit code of a short container.
    let bundle = make_bundle(&agent, "c1").await;
    create(
        &agent,
        "c1",
        &bundle,
        "c1-host",
        &["sh", "-c", "echo hi; exit 7"],
    )
    .await;
    assert_eq!(
        agent.container_state("c1").await.expect("state").status,
        ContainerStatus::Created
    );
    let attach_agent = agent.clone();
    let attach = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut err = Vec::new();
        attach_agent
            .attach_container("c1", None::<tokio::io::Empty>, &mut out, &mut err)
            .await
            .expect("attach");
        (out, err)
    });
    // Attach must be in place before the process runs; give the call a moment to open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.start_container("c1").await.expect("start");
    let exit = agent.wait_container("c1", RPC).await.expect("wait");
    assert_eq!(exit.code, Some(7), "{exit:?}");
    let (out, err) = attach.await.expect("attach task");
    assert_eq!(String::from_utf8_lossy(&out), "hi\n", "stderr: {err:?}");
    let state = agent.container_state("c1").await.expect("state");
    assert_eq!(state.status, ContainerStatus::Stopped);
    assert_eq!(state.exit.and_then(|e| e.code), Some(7));
    agent.delete_container("c1", false).await.expect("delete");
    assert_gone(&agent, "c1").await;

    // 2. A long-running container: exec sees its UTS namespace; Update/Stats reach its cgroup;
    //    Delete refuses while it runs; SIGKILL gives 137.
    let bundle = make_bundle(&agent, "c2").await;
    create(&agent, "c2", &bundle, "c2-host", &["sleep", "1000"]).await;
    agent.start_container("c2").await.expect("start");
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = agent
        .exec_in_container(
            "c2",
            ExecSpec {
                argv: vec!["hostname".into()],
                ..ExecSpec::default()
            },
            None::<tokio::io::Empty>,
            &mut out,
            &mut err,
        )
        .await
        .expect("exec in container");
    assert_eq!(
        status.code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(String::from_utf8_lossy(&out), "c2-host\n");
    // The spec's seccomp filter applies to execs too (libcontainer's tenant builder drops it;
    // the agent loads it itself): mkdirat fails with EPERM (errnoRet 1).
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = agent
        .exec_in_container(
            "c2",
            ExecSpec {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "grep Seccomp: /proc/self/status; mkdir /tmp/blocked".into(),
                ],
                ..ExecSpec::default()
            },
            None::<tokio::io::Empty>,
            &mut out,
            &mut err,
        )
        .await
        .expect("exec mkdir");
    assert_eq!(
        status.code,
        Some(1),
        "{status:?} {} {}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    assert!(
        String::from_utf8_lossy(&err).contains("Operation not permitted"),
        "{:?}",
        String::from_utf8_lossy(&err)
    );
    assert!(
        String::from_utf8_lossy(&out).contains("Seccomp:\t2"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    // On a terminal too (the pty master comes back over the console socket).
    let mut out = Vec::new();
    let status = agent
        .exec_in_container(
            "c2",
            ExecSpec {
                argv: vec!["sh".into(), "-c".into(), "test -t 0 && echo tty-ok".into()],
                tty: true,
                ..ExecSpec::default()
            },
            None::<tokio::io::Empty>,
            &mut out,
            tokio::io::sink(),
        )
        .await
        .expect("tty exec in container");
    assert_eq!(status.code, Some(0));
    assert!(
        String::from_utf8_lossy(&out).contains("tty-ok"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let (_, guest_hostname) = guest_sh(&agent, "hostname").await;
    assert_ne!(
        guest_hostname, "c2-host\n",
        "the guest's own UTS namespace changed"
    );

    agent
        .update_container(
            "c2",
            br#"{"cpu": {"quota": 50000, "period": 100000, "shares": 512}, "memory": {"limit": 134217728}}"#
                .to_vec(),
        )
        .await
        .expect("update");
    let (code, cpu_max) = guest_sh(&agent, "cat /sys/fs/cgroup/accordion/c2/cpu.max").await;
    assert_eq!((code, cpu_max.as_str()), (0, "50000 100000\n"));
    let stats = agent.container_stats("c2").await.expect("stats");
    assert_eq!(stats.cpu_max, "50000 100000");
    assert_eq!(stats.memory_max_bytes, Some(134_217_728));
    assert!(stats.pids_current >= 1, "{stats:?}");
    assert!(
        stats.memory_stat.pgfault > 0 && stats.memory_stat.kernel_stack > 0,
        "{stats:?}"
    );
    assert!(stats.memory_peak_bytes.is_some(), "{stats:?}");
    let err = agent
        .update_container("c2", br#"{"cpu": {"quota": 5}}"#.to_vec())
        .await
        .expect_err("quota below 1000");
    assert_eq!(rpc_code(&err), Some(Code::InvalidArgument), "{err}");

    let err = agent
        .delete_container("c2", false)
        .await
        .expect_err("delete while running");
    assert_eq!(rpc_code(&err), Some(Code::FailedPrecondition), "{err}");
    agent.kill_container("c2", 9, false).await.expect("kill");
    let exit = agent.wait_container("c2", RPC).await.expect("wait");
    assert_eq!(exit.shell_code(), 137, "{exit:?}");
    agent.delete_container("c2", false).await.expect("delete");
    assert_gone(&agent, "c2").await;

    // 3. A main process on a terminal.
    let bundle = make_bundle(&agent, "c4").await;
    agent
        .create_container(ContainerCreate {
            id: "c4".into(),
            bundle,
            spec_json: spec_json("c4-host", &["sh", "-c", "test -t 1 && echo tty-main"]),
            tty: true,
        })
        .await
        .expect("create tty container");
    let attach_agent = agent.clone();
    let attach = tokio::spawn(async move {
        let mut out = Vec::new();
        attach_agent
            .attach_container("c4", None::<tokio::io::Empty>, &mut out, tokio::io::sink())
            .await
            .expect("attach");
        out
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.start_container("c4").await.expect("start");
    let exit = agent.wait_container("c4", RPC).await.expect("wait");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    let out = attach.await.expect("attach task");
    assert!(
        String::from_utf8_lossy(&out).contains("tty-main"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    agent.delete_container("c4", false).await.expect("delete");
    assert_gone(&agent, "c4").await;

    // 4. Malformed requests are clear INVALID_ARGUMENTs and the agent keeps serving.
    let bundle = make_bundle(&agent, "c3").await;
    let err = agent
        .create_container(ContainerCreate {
            id: "c3".into(),
            bundle: bundle.clone(),
            spec_json: b"{\"process\": ".to_vec(),
            tty: false,
        })
        .await
        .expect_err("malformed spec");
    assert_eq!(rpc_code(&err), Some(Code::InvalidArgument), "{err}");
    let err = agent
        .create_container(ContainerCreate {
            id: "c3".into(),
            bundle: format!("{BUNDLES}/../../../etc"),
            spec_json: spec_json("x", &["true"]),
            tty: false,
        })
        .await
        .expect_err("bundle outside");
    assert_eq!(rpc_code(&err), Some(Code::InvalidArgument), "{err}");
    let err = agent
        .create_container(ContainerCreate {
            id: "../c3".into(),
            bundle,
            spec_json: spec_json("x", &["true"]),
            tty: false,
        })
        .await
        .expect_err("bad id");
    assert_eq!(rpc_code(&err), Some(Code::InvalidArgument), "{err}");
    let err = agent
        .container_state("nosuch")
        .await
        .expect_err("unknown id");
    assert_eq!(rpc_code(&err), Some(Code::NotFound), "{err}");
    assert!(!agent.health().await.expect("health").is_empty());

    sandbox.stop(Duration::from_secs(5)).await;
}

/// The mountinfo line of whatever is mounted on the bundles' root in the guest; empty when none.
async fn bundles_mount(agent: &AgentClient) -> String {
    let (code, out) = guest_sh(
        agent,
        &format!("awk '$5 == \"{BUNDLES}\"' /proc/self/mountinfo"),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    out
}

/// The file's content in the guest; empty when it does not exist (yet).
async fn guest_cat(agent: &AgentClient, path: &str) -> String {
    guest_sh(agent, &format!("cat {path} 2>/dev/null")).await.1
}

/// Waits up to `within` for `path` to hold something other than `before` (and not nothing).
async fn wait_for_change(
    agent: &AgentClient,
    path: &str,
    before: &str,
    within: Duration,
) -> String {
    let end = Instant::now() + within;
    loop {
        let now = guest_cat(agent, path).await;
        if !now.trim().is_empty() && now != before {
            return now;
        }
        assert!(
            Instant::now() < end,
            "{path} stayed {before:?} for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_containers_pause_pids_oom_and_share_error_in_a_real_guest() {
    if !can_run() {
        return;
    }
    // A tag no virtio-fs device has: PID 1 cannot mount it, says why, and serves anyway.
    let sandbox = boot(
        &format!("ctrp-{}", std::process::id()),
        "accordion.share=no-such-tag",
    )
    .await;
    let agent = sandbox.agent().with_rpc_timeout(RPC);
    let info = agent.guest_info().await.expect("guest info");
    assert_eq!(info.share_tag.as_deref(), Some("no-such-tag"));
    let share_error = info.share_error.expect("a share error");
    assert!(share_error.contains("no-such-tag"), "{share_error}");
    assert_eq!(bundles_mount(&agent).await, "", "a mount on {BUNDLES}");

    // Opened first: the containers below are created after it and still covered.
    let mut oom = agent.watch_oom().await.expect("watch OOM");

    // 1. Pause: a counter stops; Exec is refused; Resume: it moves again; force-delete of a
    //    paused container.
    let bundle = make_bundle(&agent, "p1").await;
    create(
        &agent,
        "p1",
        &bundle,
        "p1",
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 1; done",
        ],
    )
    .await;
    let err = agent
        .pause_container("p1")
        .await
        .expect_err("pause created");
    assert_eq!(rpc_code(&err), Some(Code::FailedPrecondition), "{err}");
    agent.start_container("p1").await.expect("start");
    let count = format!("{bundle}/rootfs/tmp/count");
    let first = wait_for_change(&agent, &count, "", Duration::from_secs(60)).await;
    wait_for_change(&agent, &count, &first, Duration::from_secs(60)).await;

    agent.pause_container("p1").await.expect("pause");
    agent
        .pause_container("p1")
        .await
        .expect("pause again is a no-op");
    assert_eq!(
        agent.container_state("p1").await.expect("state").status,
        ContainerStatus::Paused
    );
    let frozen = guest_cat(&agent, &count).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        guest_cat(&agent, &count).await,
        frozen,
        "the counter moved while paused"
    );
    let err = agent
        .exec_in_container(
            "p1",
            ExecSpec {
                argv: vec!["true".into()],
                ..ExecSpec::default()
            },
            None::<tokio::io::Empty>,
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await
        .expect_err("exec while paused");
    assert_eq!(rpc_code(&err), Some(Code::FailedPrecondition), "{err}");

    agent.resume_container("p1").await.expect("resume");
    assert_eq!(
        agent.container_state("p1").await.expect("state").status,
        ContainerStatus::Running
    );
    wait_for_change(&agent, &count, &frozen, Duration::from_secs(60)).await;

    agent.pause_container("p1").await.expect("pause");
    let err = agent
        .delete_container("p1", false)
        .await
        .expect_err("delete paused without force");
    assert_eq!(rpc_code(&err), Some(Code::FailedPrecondition), "{err}");
    agent
        .delete_container("p1", true)
        .await
        .expect("force-delete paused");
    assert_gone(&agent, "p1").await;
    let err = agent
        .pause_container("p1")
        .await
        .expect_err("pause deleted");
    assert_eq!(rpc_code(&err), Some(Code::NotFound), "{err}");

    // 2. Pids: the shell and its background sleep. Kill of all keeps a paused container paused;
    //    fatal signals reach it.
    let bundle = make_bundle(&agent, "p2").await;
    create(
        &agent,
        "p2",
        &bundle,
        "p2",
        &["sh", "-c", "sleep 1000 & wait"],
    )
    .await;
    agent.start_container("p2").await.expect("start");
    let main = agent.container_state("p2").await.expect("state").pid;
    let end = Instant::now() + Duration::from_secs(60);
    let pids = loop {
        let pids = agent.container_pids("p2").await.expect("pids");
        if pids.len() >= 2 || Instant::now() > end {
            break pids;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(pids.contains(&main), "main pid {main} not in {pids:?}");
    let other = pids
        .iter()
        .find(|&&p| p != main)
        .copied()
        .unwrap_or_default();
    assert_eq!(
        guest_cat(&agent, &format!("/proc/{other}/comm")).await,
        "sleep\n"
    );

    agent.pause_container("p2").await.expect("pause");
    // Signalling every process leaves a paused container paused (libcontainer's own kill of all
    // thaws it). The unhandled SIGTERM still kills the sleep at once, frozen or not: the kernel
    // turns a fatal signal into SIGKILL. The shell, its pid namespace's init, ignores it.
    agent
        .kill_container("p2", 15, true)
        .await
        .expect("SIGTERM all, paused");
    assert_eq!(
        agent.container_state("p2").await.expect("state").status,
        ContainerStatus::Paused
    );
    let end = Instant::now() + Duration::from_secs(30);
    while agent.container_pids("p2").await.expect("pids") != vec![main] {
        assert!(Instant::now() < end, "the sleep outlived SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        agent.container_state("p2").await.expect("state").status,
        ContainerStatus::Paused
    );
    agent
        .kill_container("p2", 9, false)
        .await
        .expect("SIGKILL paused");
    let exit = agent.wait_container("p2", RPC).await.expect("wait");
    assert_eq!(exit.shell_code(), 137, "{exit:?}");
    assert_eq!(
        agent.container_state("p2").await.expect("state").status,
        ContainerStatus::Stopped
    );
    let err = agent
        .resume_container("p2")
        .await
        .expect_err("resume stopped");
    assert_eq!(rpc_code(&err), Some(Code::FailedPrecondition), "{err}");
    assert_eq!(
        agent.container_pids("p2").await.expect("pids"),
        Vec::<u32>::new()
    );
    agent.delete_container("p2", false).await.expect("delete");
    assert_gone(&agent, "p2").await;

    // 3. OOM: a shell doubling a string under a 32 MiB memory.max is OOM-killed; the watch
    //    names it, and Stats counts it.
    let bundle = make_bundle(&agent, "p3").await;
    create(
        &agent,
        "p3",
        &bundle,
        "p3",
        &[
            "sh",
            "-c",
            "x=0123456789abcdef; while true; do x=$x$x; done",
        ],
    )
    .await;
    agent
        .update_container("p3", br#"{"memory": {"limit": 33554432}}"#.to_vec())
        .await
        .expect("memory limit");
    agent.start_container("p3").await.expect("start");
    let oom_id = tokio::time::timeout(RPC, oom.next())
        .await
        .expect("an OOM event in time")
        .expect("OOM watch")
        .expect("OOM watch still open");
    assert_eq!(oom_id, "p3");
    let exit = agent.wait_container("p3", RPC).await.expect("wait");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    let stats = agent.container_stats("p3").await.expect("stats");
    assert!(stats.memory_events.oom_kill >= 1, "{stats:?}");
    assert!(stats.memory_events.max >= 1, "{stats:?}");
    agent.delete_container("p3", false).await.expect("delete");
    assert_gone(&agent, "p3").await;

    sandbox.stop(Duration::from_secs(5)).await;
}
