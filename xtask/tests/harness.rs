//! End-to-end checks of the emulated ARM64 node harness, as a user runs it: `cargo xtask node -- …`.
//! They boot real nodes (qemu-system-aarch64, TCG), so each takes several seconds.

use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("ACCORDION_NODE_QUIET", "1")
        .output()
        .expect("run xtask")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// qemu processes still running whose command line names a node run directory of this checkout.
fn stray_nodes() -> Vec<String> {
    let marker = format!(
        "{}/target/node/",
        env!("CARGO_MANIFEST_DIR").trim_end_matches("/xtask")
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        if cmdline.starts_with("qemu-system-aarch64") && cmdline.contains(&marker) {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn test_node_command_exit_status_propagates() {
    let out = xtask(&["node", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
}

#[test]
fn test_node_is_aarch64_with_kvm_and_keeps_streams_apart() {
    let out = xtask(&[
        "node",
        "--",
        "sh",
        "-c",
        "uname -m; test -c /dev/kvm && echo kvm-ok; echo to-stderr >&2",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "aarch64\nkvm-ok\n");
    assert!(stderr.contains("to-stderr"), "stderr: {stderr}");
}

#[test]
fn test_node_hung_command_is_killed_at_timeout_with_log_path() {
    let out = xtask(&["node", "--timeout", "30", "--", "sleep", "600"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("timed out after 30s"), "stderr: {stderr}");
    assert!(stderr.contains("serial log: "), "stderr: {stderr}");
    assert!(
        stray_nodes().is_empty(),
        "qemu left running: {:?}",
        stray_nodes()
    );
}

#[test]
fn test_node_bad_add_argument_is_a_clear_error() {
    let out = xtask(&["node", "--add", "/nonexistent:/x", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("host file must exist"),
        "{}",
        text(&out.stderr)
    );
}

/// One node with `--containerd`: runc really runs containers from the local busybox and
/// accordion-test images (exit status back through ctr); the CRI plugin is loaded, found its CNI
/// config, and the sandbox and test images are in k8s.io; CRI has the `accordion` runtime and
/// containerd's PATH has its shim; Debian's CNI bridge plugin wires a network namespace to cni0
/// (veth, host-local IPAM) and it answers ping. Debian ships no crictl: no pod runs through CRI.
#[test]
fn test_node_containerd_runs_a_runc_container_and_loads_cri() {
    let script = [
        r#"ctr plugins ls | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" { print "cri:" $NF }'"#,
        "grep -q 'failed to load cni' /var/log/containerd.log || echo cni:ok",
        "ctr -n k8s.io images ls -q | grep -x -e registry.k8s.io/pause:3.8 -e localhost/accordion-test:latest",
        r#"containerd --config /etc/containerd/config.toml config dump |
             awk '/runtimes.accordion]/ { f = 1 } f && /runtime_type/ { print $NF; exit }'"#,
        r#"env PATH="$(tr '\0' '\n' < /proc/$(cat /run/containerd.pid)/environ | sed -n 's/^PATH=//p')" \
             which containerd-shim-accordion-v2"#,
        "ctr run --rm localhost/accordion-test:latest t0 sh -c 'cat /etc/accordion-test; uname -m'",
        "mkdir -p /run/netns && touch /run/netns/t && unshare --net=/run/netns/t true",
        r#"echo '{"cniVersion": "1.0.0", "name": "t", "type": "bridge", "bridge": "cni0", "isGateway": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}}' |
             CNI_COMMAND=ADD CNI_CONTAINERID=t CNI_NETNS=/run/netns/t CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni \
             /usr/lib/cni/bridge | grep -o '"address": "[^"]*"'"#,
        "ping -c 1 -W 5 10.88.0.2 > /dev/null && echo ping:ok",
        "ctr run --rm localhost/busybox:latest t1 sh -c 'echo hi; exit 7'",
    ]
    .join("\n");
    let out = xtask(&["node", "--containerd", "--", "sh", "-c", &script]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(
        stdout,
        "cri:ok\ncni:ok\nlocalhost/accordion-test:latest\nregistry.k8s.io/pause:3.8\n\
         \"io.containerd.accordion.v2\"\n/usr/local/bin/containerd-shim-accordion-v2\n\
         accordion-test\naarch64\n\"address\": \"10.88.0.2/16\"\nping:ok\nhi\n",
        "stderr: {stderr}"
    );
}
