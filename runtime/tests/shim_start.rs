//! The shim binary's `start`, fed exactly what containerd writes: containerd 2.3's
//! BootstrapParams (built from the protos containerd-shim ships, runtime options as an extension)
//! and 1.7/2.1's flags, TTRPC_ADDRESS and runtime options `Any`. Each reply must name an address
//! where the daemon really serves the task API version the reply announces, and the daemon must go
//! away (socket included) on Shutdown. No KVM needed: nothing here boots a VM.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim::api::{ConnectRequest, ConnectResponse, ShutdownRequest};
use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult, Extension};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::ttrpc::asynchronous::Client;
use containerd_shim::protos::ttrpc::proto::{Code, Request};

/// The shim cargo built for this test, or, where that path does not exist (the emulated node,
/// which has the test binaries but not the host's target directory), the one on PATH.
fn shim() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-accordion-v2"));
    if built.is_file() {
        built
    } else {
        PathBuf::from("containerd-shim-accordion-v2")
    }
}
const NAMESPACE: &str = "accordion-test";

/// A bundle directory with the `log` file the daemon logs to, and a stand-in for containerd's
/// ttrpc socket (the daemon connects its event publisher there at start).
struct Bundle {
    dir: PathBuf,
    _containerd: UnixListener,
}

impl Bundle {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "accordion-shim-start-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("log"), "").unwrap();
        let containerd = UnixListener::bind(dir.join("containerd.sock.ttrpc")).unwrap();
        Self {
            dir,
            _containerd: containerd,
        }
    }
    fn ttrpc_address(&self) -> String {
        self.dir.join("containerd.sock.ttrpc").display().to_string()
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Our runtime options (runtimeoptions.v1.Options, ConfigBody = `body`) as containerd's typeurl
/// names them.
fn runtime_options(body: &str) -> Any {
    let mut value = vec![0x1a, u8::try_from(body.len()).unwrap()];
    value.extend_from_slice(body.as_bytes());
    Any {
        type_url: "runtimeoptions.v1.Options".into(),
        value,
        ..Default::default()
    }
}

/// Runs `start` for `id` in `bundle` with `stdin` and `env`; returns its stdout, or its stderr as
/// the error.
fn start(
    bundle: &Bundle,
    id: &str,
    stdin: &[u8],
    env: &[(&str, String)],
) -> Result<Vec<u8>, String> {
    let mut child = Command::new(shim())
        .args(["-namespace", NAMESPACE, "-id", id, "-address"])
        .arg(bundle.dir.join("containerd.sock"))
        .arg("start")
        .current_dir(&bundle.dir)
        .env_remove("TTRPC_ADDRESS")
        .envs(env.iter().map(|(k, v)| (k, v)))
        // No config.toml of the machine's: the defaults.
        .env("ACCORDION_CONFIG", bundle.dir.join("none.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("start did not return in 30 s:\n{}", bundle.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Calls Connect on `service` at `address`.
async fn connect(client: &Client, service: &str) -> Result<ConnectResponse, String> {
    call(client, service, "Connect", &ConnectRequest::default()).await
}

async fn call<Req: Message, Resp: Message>(
    client: &Client,
    service: &str,
    method: &str,
    req: &Req,
) -> Result<Resp, String> {
    let request = Request {
        service: service.into(),
        method: method.into(),
        payload: req.write_to_bytes().unwrap(),
        timeout_nano: 10_000_000_000,
        ..Default::default()
    };
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    if response.status().code() != Code::OK {
        return Err(format!(
            "{:?}: {}",
            response.status().code(),
            response.status().message
        ));
    }
    Ok(Resp::parse_from_bytes(&response.payload).unwrap())
}

/// Both task API names answer Connect from the same daemon; Shutdown ends it and its socket.
async fn check_daemon(bundle: &Bundle, address: &str) {
    let client = Client::connect(address).await.unwrap();
    let v3 = connect(&client, "containerd.task.v3.Task").await.unwrap();
    let _daemon = KillOnDrop(v3.shim_pid, address.to_string());
    let v2 = connect(&client, "containerd.task.v2.Task").await.unwrap();
    assert_ne!(v3.shim_pid, 0);
    assert_eq!(v2.shim_pid, v3.shim_pid, "one daemon under both names");
    let unknown = connect(&client, "containerd.task.v9.Task")
        .await
        .unwrap_err();
    assert!(unknown.contains("does not exist"), "{unknown}");
    let _: containerd_shim::api::Empty = call(
        &client,
        "containerd.task.v2.Task",
        "Shutdown",
        &ShutdownRequest::default(),
    )
    .await
    .unwrap();
    let socket = Path::new(address.strip_prefix("unix://").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while socket.exists() || pid_alive(v3.shim_pid) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not go away after Shutdown:\n{}",
            bundle.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read_to_string(bundle.dir.join("address")).unwrap(),
        address
    );
}

/// Kills the daemon and removes its socket if a failed assertion leaves it running (it ignores
/// SIGTERM, as containerd's shims do).
struct KillOnDrop(u32, String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            if let Ok(pid) = i32::try_from(self.0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_file(self.1.trim_start_matches("unix://"));
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is gone for our purpose: its parent (the start process) has exited.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn test_containerd_2_3_bootstrap_params_get_a_v3_result_and_a_daemon_on_its_address() {
    let bundle = Bundle::new("v23");
    let id = format!("bootstrap-{}", std::process::id());
    let params = BootstrapParams {
        instance_id: id.clone(),
        namespace: NAMESPACE.into(),
        containerd_version: "v2.3.2".into(),
        containerd_ttrpc_address: bundle.ttrpc_address(),
        containerd_grpc_address: bundle.dir.join("containerd.sock").display().to_string(),
        containerd_binary: "/usr/bin/containerd".into(),
        socket_dir: Some(bundle.dir.join("s").display().to_string()),
        extensions: vec![Extension {
            value: Some(runtime_options("log_level = \"debug\"\n")).into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let out = start(&bundle, &id, &params.write_to_bytes().unwrap(), &[]).unwrap();
    let result = BootstrapResult::parse_from_bytes(&out).unwrap();
    assert_eq!((result.version, result.protocol.as_str()), (3, "ttrpc"));
    let dir = format!("unix://{}/", bundle.dir.join("s").display());
    assert!(result.address.starts_with(&dir), "{}", result.address);
    check_daemon(&bundle, &result.address).await;
}

#[tokio::test]
async fn test_containerd_1_7_and_2_1_start_gets_a_bare_address_of_a_v2_daemon() {
    // The legacy protocol has no socket directory: the daemon listens under /run/containerd/s.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the legacy start protocol puts the socket in /run/containerd/s (root)");
        return;
    }
    let bundle = Bundle::new("v17");
    let id = format!("legacy-{}", std::process::id());
    let env = [("TTRPC_ADDRESS", bundle.ttrpc_address())];
    let options = runtime_options("log_level = \"debug\"\n")
        .write_to_bytes()
        .unwrap();
    let out = start(&bundle, &id, &options, &env).unwrap();
    let address = String::from_utf8(out).unwrap();
    assert!(
        address.starts_with("unix:///run/containerd/s/"),
        "{address}"
    );
    check_daemon(&bundle, &address).await;
}

#[test]
fn test_start_with_bad_runtime_options_fails_with_the_reason_and_spawns_nothing() {
    let bundle = Bundle::new("bad");
    let id = format!("bad-{}", std::process::id());
    let params = BootstrapParams {
        instance_id: id.clone(),
        namespace: NAMESPACE.into(),
        containerd_ttrpc_address: bundle.ttrpc_address(),
        socket_dir: Some(bundle.dir.join("s").display().to_string()),
        extensions: vec![Extension {
            value: Some(runtime_options("log_level = \"loud\"\n")).into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = start(&bundle, &id, &params.write_to_bytes().unwrap(), &[]).unwrap_err();
    assert!(
        err.contains("runtime options") && err.contains("loud"),
        "{err}"
    );
    assert!(!bundle.dir.join("s").exists(), "no daemon socket");
}

#[test]
fn test_start_for_another_instance_is_refused() {
    let bundle = Bundle::new("other");
    let params = BootstrapParams {
        instance_id: "someone-else".into(),
        namespace: NAMESPACE.into(),
        containerd_ttrpc_address: bundle.ttrpc_address(),
        ..Default::default()
    };
    let err = start(&bundle, "me", &params.write_to_bytes().unwrap(), &[]).unwrap_err();
    assert!(err.contains("someone-else") && err.contains("/me"), "{err}");
}
