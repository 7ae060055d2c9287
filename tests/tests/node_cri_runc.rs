//! accordion-cri against containerd's CRI with runc, in the emulated ARM64 node started with
//! `--containerd` (`cargo xtask node-test --containerd --filter node_cri`): a pod and a container
//! from crictl-style JSON, exec, a resource update seen in the container's cgroup, and teardown.
//! Skips when containerd's socket is absent (plain `node-test`); fails instead under
//! ACCORDION_REQUIRE_CONTAINERD=1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use accordion_tests::{assert_code, text};

const SOCKET: &str = "/run/containerd/containerd.sock";

const POD_JSON: &str = r#"{
  "metadata": {"name": "cri-runc", "namespace": "default", "uid": "cri-runc-uid", "attempt": 1},
  "log_directory": "/tmp/cri-runc/logs",
  "linux": {"resources": {"cpu_quota": 100000, "cpu_period": 100000}}
}"#;

const CONTAINER_JSON: &str = r#"{
  "metadata": {"name": "main"},
  "image": {"image": "localhost/busybox:latest"},
  "command": ["sh", "-c", "echo started; exec sleep 3600"],
  "log_path": "main.log",
  "linux": {"resources": {"cpu_quota": 100000, "cpu_period": 100000, "cpu_shares": 1024,
                          "memory_limit_in_bytes": 134217728}}
}"#;

/// Whether containerd serves CRI here; panics under ACCORDION_REQUIRE_CONTAINERD=1 when not.
fn containerd_runs() -> bool {
    let present = Path::new(SOCKET).exists();
    if !present && std::env::var("ACCORDION_REQUIRE_CONTAINERD").as_deref() == Ok("1") {
        panic!("ACCORDION_REQUIRE_CONTAINERD=1 but {SOCKET} is missing");
    }
    if !present {
        eprintln!("SKIPPED: {SOCKET} is missing (run the node with --containerd)");
    }
    present
}

fn cri(args: &[&str]) -> Output {
    Command::new("accordion-cri")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run accordion-cri (is it on PATH?)")
}

/// `accordion-cri args…`, which must succeed; its stdout, trimmed.
fn cri_ok(args: &[&str]) -> String {
    let out = cri(args);
    assert_code(&out, 0);
    text(&out.stdout).trim().to_string()
}

fn write_configs(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("create the config directory");
    let pod = dir.join("pod.json");
    let container = dir.join("container.json");
    std::fs::write(&pod, POD_JSON).expect("write pod.json");
    std::fs::write(&container, CONTAINER_JSON).expect("write container.json");
    (pod, container)
}

#[test]
fn test_cri_runc_pod_runs_execs_resizes_and_is_removed() {
    if !containerd_runs() {
        return;
    }
    let (pod_json, container_json) = write_configs(Path::new("/tmp/cri-runc"));
    let (pod_json, container_json) = (pod_json.to_str().unwrap(), container_json.to_str().unwrap());

    let pod = cri_ok(&["runp", "--runtime", "runc", pod_json]);
    let ctr = cri_ok(&["create", &pod, container_json, pod_json]);
    cri_ok(&["start", &ctr]);
    let listed = cri_ok(&["ps", "--pod", &pod]);
    assert_eq!(listed, format!("{ctr}\tmain\tCONTAINER_RUNNING\t{pod}"));

    let hi = cri(&["exec", &ctr, "--", "echo", "hi"]);
    assert_code(&hi, 0);
    assert_eq!(text(&hi.stdout), "hi\n");
    let three = cri(&[
        "exec",
        &ctr,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_code(&three, 3);
    assert_eq!(text(&three.stdout), "out\n");
    assert_eq!(text(&three.stderr), "err\n");

    assert_eq!(
        cri_ok(&["exec", &ctr, "--", "cat", "/sys/fs/cgroup/cpu.max"]),
        "100000 100000"
    );
    cri_ok(&["update", "--cpu-quota", "50000", &ctr]);
    assert_eq!(
        cri_ok(&["exec", &ctr, "--", "cat", "/sys/fs/cgroup/cpu.max"]),
        "50000 100000"
    );
    let inspect: serde_json::Value = serde_json::from_str(&cri_ok(&["inspect", &ctr])).unwrap();
    assert_eq!(inspect["status"]["state"], "CONTAINER_RUNNING");
    assert_eq!(inspect["status"]["resources"]["linux"]["cpuQuota"], 50000);
    assert_eq!(inspect["status"]["resources"]["linux"]["cpuPeriod"], 100000);
    let inspectp: serde_json::Value = serde_json::from_str(&cri_ok(&["inspectp", &pod])).unwrap();
    assert_eq!(inspectp["status"]["state"], "SANDBOX_READY");
    assert_eq!(inspectp["status"]["runtimeHandler"], "runc");

    cri_ok(&["stop", &ctr]);
    assert_eq!(
        cri_ok(&["ps", "-a", "--pod", &pod]),
        format!("{ctr}\tmain\tCONTAINER_EXITED\t{pod}")
    );
    cri_ok(&["rm", &ctr]);
    cri_ok(&["stopp", &pod]);
    cri_ok(&["rmp", &pod]);
    assert!(
        !cri_ok(&["ps", "-a"]).contains(&ctr),
        "container {ctr} still listed"
    );
    assert!(!cri_ok(&["pods"]).contains(&pod), "pod {pod} still listed");
}

#[test]
fn test_cri_unknown_container_is_not_found_on_stderr_and_exit_1() {
    if !containerd_runs() {
        return;
    }

    let out = cri(&["inspect", "no-such-container"]);

    assert_code(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("accordion-cri: ContainerStatus: rpc error: code = NotFound desc = "),
        "stderr: {stderr}"
    );
}
