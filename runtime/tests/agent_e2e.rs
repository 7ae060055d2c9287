//! The agent binary, run on the host with `--listen-unix --no-init`, driven by the runtime's real
//! agent client through a stand-in for the VMM's hybrid-vsock device: a Unix socket that answers
//! `CONNECT 1024\n` with `OK 1024\n` and splices to the agent. That stand-in is the only fake.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use accordion_proto::agent::v1 as pb;
use accordion_runtime::agent_client::{
    format_cpulist, AgentClient, AgentClientError, ClientConfig, CpuEventKind, ExitStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

const MIB: usize = 1024 * 1024;

/// A running agent plus its hybrid-vsock front; both go away on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    front: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    async fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("accordion-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let agent_sock = dir.join("agent.sock");
        let front = dir.join("vsock.sock");
        let child = agent_command()
            .arg("--listen-unix")
            .arg(&agent_sock)
            .arg("--no-init")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn agent");
        spawn_front(&front, agent_sock);
        Agent { child, dir, front }
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.front, Duration::from_secs(20))
            .await
            .expect("connect")
    }
}

/// The agent binary: `ACCORDION_AGENT_BIN`, else the one cargo built beside this test
/// (target/<triple>/<profile>/), else `accordion-agent` on PATH (as in the emulated node).
fn agent_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ACCORDION_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("accordion-agent")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("accordion-agent"),
    }
}

/// The agent binary, started through the cross runner when the tests run under one (qemu-user
/// without binfmt_misc cannot execute an aarch64 binary directly).
fn agent_command() -> Command {
    let agent = agent_path();
    let runner_var = format!(
        "CARGO_TARGET_{}_UNKNOWN_LINUX_GNU_RUNNER",
        std::env::consts::ARCH.to_uppercase()
    );
    match std::env::var("ACCORDION_TEST_RUNNER").or_else(|_| std::env::var(runner_var)) {
        Ok(runner) if !runner.is_empty() => {
            let mut words = runner.split_whitespace();
            let mut cmd = Command::new(words.next().unwrap_or_default());
            cmd.args(words).arg(&agent);
            cmd
        }
        _ => Command::new(agent),
    }
}

/// The hybrid-vsock stand-in: `CONNECT 1024\n` → `OK 1024\n` + splice to the agent; anything else
/// or an agent that does not answer → the connection is closed, as a VMM does.
fn spawn_front(front: &Path, agent_sock: PathBuf) {
    let listener = UnixListener::bind(front).expect("bind front");
    tokio::spawn(async move {
        while let Ok((mut host, _)) = listener.accept().await {
            let agent_sock = agent_sock.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                while let Ok(byte) = host.read_u8().await {
                    if byte == b'\n' {
                        break;
                    }
                    line.push(byte);
                }
                if line != b"CONNECT 1024" {
                    return;
                }
                let Ok(mut guest) = UnixStream::connect(&agent_sock).await else {
                    return;
                };
                if host.write_all(b"OK 1024\n").await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
            });
        }
    });
}

async fn sh(client: &AgentClient, script: &str) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = client
        .exec(
            &["/bin/sh", "-c", script],
            &[],
            None::<&'static [u8]>,
            &mut out,
            &mut err,
        )
        .await
        .expect("exec");
    (out, err, status)
}

/// Deterministic incompressible-looking bytes (xorshift), so corruption or reordering shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_health_and_guest_info_report_agent_and_host_facts() {
    let agent = Agent::start("info").await;
    let client = agent.client().await;
    let version = client.health().await.expect("health");
    let info = client.guest_info().await.expect("guest info");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.agent_version, version);
    assert_eq!(info.kernel_release, release.trim());
    assert!(
        info.cpus_online.1 >= 1 && info.cpus_online.1 <= info.cpus_possible.1,
        "{info:?}"
    );
    assert!(
        info.memory_available_bytes > 0 && info.memory_available_bytes <= info.memory_total_bytes,
        "{info:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_exec_keeps_stdout_and_stderr_apart_and_exit_5_propagates() {
    let agent = Agent::start("streams").await;
    let client = agent.client().await;
    let (out, err, status) = sh(&client, "echo out; echo err >&2; exit 5").await;
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(
        status,
        ExitStatus {
            code: Some(5),
            signal: None
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_exec_exit_0_and_kill_9_propagate() {
    let agent = Agent::start("codes").await;
    let client = agent.client().await;
    let (_, _, ok) = sh(&client, "true").await;
    let (_, _, killed) = sh(&client, "kill -9 $$").await;
    assert_eq!((ok.code, ok.shell_code()), (Some(0), 0));
    assert_eq!((killed.signal, killed.shell_code()), (Some(9), 137));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_exec_one_mib_of_output_arrives_intact() {
    let agent = Agent::start("mib").await;
    let client = agent.client().await;
    // 65536 lines of 16 bytes: order and completeness both checked by exact comparison.
    let (out, _, status) = sh(
        &client,
        "i=0; while [ $i -lt 65536 ]; do printf '%015d\\n' $i; i=$((i+1)); done",
    )
    .await;
    let expected: String = (0..65536).map(|i| format!("{i:015}\n")).collect();
    assert_eq!(out.len(), MIB);
    assert!(
        out == expected.as_bytes(),
        "output differs from the expected 1 MiB"
    );
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_exec_stdin_piped_through_cat_one_mib() {
    let agent = Agent::start("stdin").await;
    let client = agent.client().await;
    let input = pattern(MIB);
    let mut out = Vec::new();
    let status = client
        .exec(
            &["cat"],
            &[],
            Some(std::io::Cursor::new(input.clone())),
            &mut out,
            tokio::io::sink(),
        )
        .await
        .expect("exec");
    assert!(status.success());
    assert_eq!(out.len(), input.len());
    assert!(out == input, "cat echoed different bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_twenty_concurrent_execs_run_in_parallel() {
    let agent = Agent::start("concurrent").await;
    let client = agent.client().await;
    let started = Instant::now();
    let runs = (0..20).map(|i| {
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            let script = format!("sleep 1; echo {i}");
            let status = client
                .exec(
                    &["/bin/sh", "-c", &script],
                    &[],
                    None::<&'static [u8]>,
                    &mut out,
                    tokio::io::sink(),
                )
                .await
                .expect("exec");
            (String::from_utf8(out).expect("utf8"), status)
        }
    });
    let results = futures_join_all(runs).await;
    let elapsed = started.elapsed();
    for (i, (out, status)) in results.iter().enumerate() {
        assert_eq!(
            (out.as_str(), status.success()),
            (format!("{i}\n").as_str(), true)
        );
    }
    // Serially this would take 20 s.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

/// join_all without the futures crate: spawn each, await in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("task"));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_garbage_bytes_drop_that_connection_and_agent_keeps_serving() {
    let agent = Agent::start("garbage").await;
    let client = agent.client().await;
    let mut raw = UnixStream::connect(&agent.front).await.expect("connect");
    raw.write_all(b"CONNECT 1024\n").await.expect("write");
    let mut ok = [0u8; 8];
    raw.read_exact(&mut ok).await.expect("handshake");
    assert_eq!(&ok, b"OK 1024\n");
    let garbage = pattern(64 * 1024);
    // The agent may close mid-write; that is the expected outcome, not a failure.
    let _ = raw.write_all(&garbage).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "agent kept the garbage connection open");
    assert_eq!(
        client.health().await.expect("health after garbage"),
        env!("CARGO_PKG_VERSION")
    );
    let fresh = agent.client().await;
    assert!(fresh.health().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_oversized_message_refused_and_agent_keeps_serving() {
    let agent = Agent::start("oversized").await;
    let client = agent.client().await;
    let huge = pb::SignalRequest {
        exec_id: "x".repeat(5 * MIB),
        signal: 15,
    };
    let status = client
        .raw()
        .signal(huge)
        .await
        .expect_err("oversized accepted");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(client.health().await.is_ok());
    assert!(agent.client().await.health().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_handshake_garbage_is_typed_error() {
    let dir = std::env::temp_dir().join(format!("accordion-e2e-{}-hs", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"ERR no such port\n").await;
        }
    });
    let err = AgentClient::connect(&path, Duration::from_secs(5))
        .await
        .expect_err("garbage handshake");
    assert!(matches!(err, AgentClientError::Handshake { .. }), "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connect_nobody_serving_retries_until_deadline_then_timeout() {
    let path =
        std::env::temp_dir().join(format!("accordion-e2e-{}-nobody.sock", std::process::id()));
    let deadline = Duration::from_millis(700);
    let started = Instant::now();
    let err = AgentClient::connect_with(&path, deadline, ClientConfig::default())
        .await
        .expect_err("nobody serves");
    assert!(matches!(err, AgentClientError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= deadline, "gave up before the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_agent_killed_mid_exec_reported_as_gone_within_deadline() {
    let mut agent = Agent::start("killed").await;
    let client = agent.client().await;
    let exec_client = client.clone();
    let exec = tokio::spawn(async move {
        exec_client
            .exec(
                &["sleep", "30"],
                &[],
                None::<&'static [u8]>,
                tokio::io::sink(),
                tokio::io::sink(),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.child.kill().await.expect("kill agent");
    let result = tokio::time::timeout(Duration::from_secs(10), exec)
        .await
        .expect("exec hung after the agent died")
        .expect("join");
    assert!(
        matches!(result, Err(AgentClientError::AgentGone { .. })),
        "{result:?}"
    );
    let health = client.health().await;
    assert!(
        matches!(health, Err(AgentClientError::AgentGone { .. })),
        "{health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_shutdown_answers_then_agent_exits_off_pid1() {
    let mut agent = Agent::start("shutdown").await;
    let client = agent.client().await;
    client.shutdown().await.expect("shutdown");
    let status = tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
        .await
        .expect("agent still running")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_signal_rpc_terminates_running_exec() {
    use pb::exec_response::Response as R;
    let agent = Agent::start("signal").await;
    let client = agent.client().await;
    let mut raw = client.raw();
    let start = pb::ExecRequest {
        request: Some(pb::exec_request::Request::Start(pb::ExecStart {
            argv: vec!["sleep".into(), "30".into()],
            ..Default::default()
        })),
    };
    // Keep the request stream open (the sender lives until the end of the test).
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(start).await.expect("start");
    let mut responses = raw
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("exec")
        .into_inner();
    let exec_id = match responses.message().await.expect("first message") {
        Some(pb::ExecResponse {
            response: Some(R::Started(started)),
        }) => started.exec_id,
        other => panic!("expected started, got {other:?}"),
    };
    client.signal(&exec_id, 15).await.expect("signal");
    let exit = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("no exit after SIGTERM")
        .expect("stream");
    assert_eq!(
        exit,
        Some(pb::ExecResponse {
            response: Some(R::Exit(pb::ExecExit {
                code: None,
                signal: Some(15)
            }))
        })
    );
    let gone = client.signal(&exec_id, 15).await;
    assert!(
        matches!(
            gone,
            Err(AgentClientError::Rpc {
                code: tonic::Code::NotFound,
                ..
            })
        ),
        "{gone:?}"
    );
    drop(tx);
}

fn sysfs_cpulist(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/devices/system/cpu/{name}"))
        .expect("read cpulist")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cpu_watch_first_event_is_snapshot_of_this_machines_cpus() {
    let agent = Agent::start("cpu-snapshot").await;
    let client = agent.client().await;
    let mut watch = client.watch_cpus().await.expect("watch");
    let first = watch.next().await.expect("first event").expect("snapshot");
    assert_eq!(first.kind, CpuEventKind::Snapshot);
    assert_eq!(first.cpu, None);
    assert_eq!(format_cpulist(&first.online), sysfs_cpulist("online"));
    assert_eq!(format_cpulist(&first.present), sysfs_cpulist("present"));
    assert_eq!(format_cpulist(&first.possible), sysfs_cpulist("possible"));
    let enabled = std::path::Path::new("/sys/devices/system/cpu/enabled")
        .exists()
        .then(|| sysfs_cpulist("enabled"));
    assert_eq!(first.enabled.as_deref().map(format_cpulist), enabled);
    assert!(first.guest_monotonic > Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_set_online_offlining_cpu0_is_refused_and_onlining_cpu0_is_a_no_op() {
    let agent = Agent::start("cpu-setonline").await;
    let client = agent.client().await;
    let refused = client.set_cpus_online(&[], &[0]).await;
    assert!(
        matches!(
            &refused,
            Err(AgentClientError::Rpc {
                code: tonic::Code::InvalidArgument,
                message
            }) if message.contains("CPU 0")
        ),
        "{refused:?}"
    );
    // CPU 0 is online already: nothing is written, whatever our privileges.
    let results = client.set_cpus_online(&[0], &[]).await.expect("set online");
    assert_eq!(results.len(), 1);
    assert_eq!((results[0].cpu, results[0].online), (0, true));
    assert_eq!(results[0].error, None);
    assert_eq!(sysfs_cpulist("online"), {
        let mut watch = client.watch_cpus().await.expect("watch");
        let snapshot = watch.next().await.expect("event").expect("snapshot");
        format_cpulist(&snapshot.online)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cpu_watch_of_agent_killed_ends_with_agent_gone() {
    let mut agent = Agent::start("cpu-killed").await;
    let client = agent.client().await;
    let mut watch = client.watch_cpus().await.expect("watch");
    let snapshot = watch.next().await.expect("snapshot");
    assert!(snapshot.is_some());
    // Reads until the stream fails: events of other tests' uevents may come first.
    let waiter = tokio::spawn(async move {
        loop {
            match watch.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.child.kill().await.expect("kill agent");
    let result = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("watch hung after the agent died")
        .expect("join");
    assert!(
        matches!(result, Err(AgentClientError::AgentGone { .. })),
        "{result:?}"
    );
}

/// Real kernel uevents: writing an action to a device's `uevent` file makes the kernel send that
/// uevent (a synthetic one, same format, plus SYNTH_UUID). Needs root; skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cpu_watch_reports_kernel_add_and_online_uevents() {
    let agent = Agent::start("cpu-uevents").await;
    let client = agent.client().await;
    let mut watch = client.watch_cpus().await.expect("watch");
    let snapshot = watch.next().await.expect("event").expect("snapshot");
    let cpu = *snapshot.online.last().expect("an online CPU");
    let uevent = format!("/sys/devices/system/cpu/cpu{cpu}/uevent");
    // The agent binds its uevent socket before serving, so these cannot be missed.
    for action in ["add", "online"] {
        match std::fs::write(&uevent, action) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: cannot write {uevent}: {e}");
                return;
            }
            Err(e) => panic!("write {action} to {uevent}: {e}"),
        }
    }
    let mut seen = Vec::new();
    let wanted = [
        (CpuEventKind::Added, Some(cpu)),
        (CpuEventKind::Online, Some(cpu)),
    ];
    let collect = async {
        while seen.len() < 2 {
            let event = watch.next().await.expect("event").expect("stream open");
            if event.cpu == Some(cpu) {
                seen.push((event.kind, event.cpu));
            }
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(10), collect).await;
    assert!(finished.is_ok(), "saw only {seen:?}");
    assert_eq!(seen, wanted);
}
