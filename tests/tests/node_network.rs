//! Pod networking through CNI (containerd's CRI plugin with Debian's bridge + host-local plugins,
//! the node's cni0 bridge on 10.88.0.0/16), in the emulated ARM64 node with containerd
//! (`cargo xtask node-test --containerd`): the pod's CNI interface reaches the microVM through a
//! tap and tc redirects, and the guest has the IP and MAC CNI assigned.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use accordion_tests::containerd::{
    containerd_ready, ctr, process_pids, wait_for, RUNTIME, TEST_IMAGE,
};
use accordion_tests::cri_cli::{assert_no_leftovers, cri, cri_ok, write_json};
use accordion_tests::{assert_code, can_run, one_vm, text};

/// A pod (runtime `accordion`, or runc) with a DNS config, and one container running `script`.
struct Pod {
    id: String,
    ctr: String,
    removed: std::cell::Cell<bool>,
}

impl Pod {
    fn run(name: &str, runtime: &str, script: &str) -> Pod {
        let pod_cfg = write_json(
            &format!("pod-{name}"),
            &serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 1},
                "log_directory": format!("/tmp/pods/{name}"),
                "dns_config": {"servers": ["10.88.0.1"], "searches": ["accordion.test"]},
            }),
        );
        let id = cri_ok(&["runp", "--runtime", runtime, &pod_cfg]);
        let ctr_cfg = write_json(
            &format!("ctr-{name}"),
            &serde_json::json!({
                "metadata": {"name": "main"},
                "image": {"image": TEST_IMAGE},
                "command": ["sh", "-c", script],
                "log_path": "main.log",
            }),
        );
        let ctr = cri_ok(&["create", &id, &ctr_cfg, &pod_cfg]);
        cri_ok(&["start", &ctr]);
        Pod {
            id,
            ctr,
            removed: std::cell::Cell::new(false),
        }
    }

    /// `sh -c script` in the container: (exit code, stdout + stderr).
    fn exec(&self, script: &str) -> (i32, String) {
        let out = cri(&["exec", &self.ctr, "--", "sh", "-c", script]);
        (
            out.status.code().unwrap_or(-1),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    }

    fn inspect(&self) -> serde_json::Value {
        serde_json::from_str(&cri_ok(&["inspectp", &self.id])).expect("inspectp JSON")
    }

    /// The IP CRI reports for the pod (CNI's).
    fn ip(&self) -> String {
        self.inspect()["status"]["network"]["ip"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The pod's network namespace path on the node (CRI's verbose info names it in the
    /// sandbox's runtime spec).
    fn netns(&self) -> PathBuf {
        let info = cri_ok(&["inspectp", &self.id]);
        let start = info
            .find("/var/run/netns/")
            .expect("a network namespace path in the pod's info");
        let path: String = info[start..].chars().take_while(|c| *c != '"').collect();
        PathBuf::from(path)
    }

    fn remove(&self) {
        self.removed.set(true);
        cri_ok(&["stopp", &self.id]);
        cri_ok(&["rmp", &self.id]);
    }
}

impl Drop for Pod {
    /// A failed test still removes its pods, so the next test starts clean.
    fn drop(&mut self) {
        if !self.removed.get() {
            let _ = cri(&["stopp", &self.id]);
            let _ = cri(&["rmp", &self.id]);
        }
    }
}

/// Runs `args` on the node inside the network namespace `netns`.
fn in_netns(netns: &Path, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("run nsenter")
}

/// The interface `eth0` of a namespace as CNI left it: (MAC, MTU), from `ip -o link` (the node's
/// /sys shows the node's own namespace).
fn cni_eth0(netns: &Path) -> (String, String) {
    let out = text(&in_netns(netns, &["ip", "-o", "link", "show", "dev", "eth0"]).stdout);
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .map(|w| w.to_string())
            .unwrap_or_default()
    };
    let (mac, mtu) = (after("link/ether"), after("mtu"));
    assert!(!mac.is_empty() && !mtu.is_empty(), "ip -o link: {out}");
    (mac, mtu)
}

/// Keeps a network namespace alive after containerd removes its file: a bind mount of it.
struct KeptNetns(PathBuf);

impl KeptNetns {
    fn new(netns: &Path, name: &str) -> Self {
        let keep = PathBuf::from(format!("/run/accordion-test-netns-{name}"));
        std::fs::write(&keep, b"").expect("create the mount point");
        let out = Command::new("mount")
            .args(["--bind"])
            .arg(netns)
            .arg(&keep)
            .output()
            .expect("mount");
        assert_code(&out, 0);
        Self(keep)
    }
}

impl Drop for KeptNetns {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a shim or its VMM process holds open that network setup could leak: (taps, network namespaces, netlink
/// sockets).
fn network_fds(pid: u32) -> (usize, usize, usize) {
    let netlink: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/net/netlink"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    let (mut taps, mut netns, mut nl) = (0, 0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the shim's fds")
        .flatten()
    {
        let target = std::fs::read_link(fd.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        if target == "/dev/net/tun" {
            taps += 1;
        } else if target.starts_with("net:[") || target.starts_with("/var/run/netns/") {
            netns += 1;
        } else if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            if netlink.iter().any(|n| n == inode) {
                nl += 1;
            }
        }
    }
    (taps, netns, nl)
}

#[test]
fn test_two_pods_on_the_cni_bridge_have_their_ips_and_talk_tcp() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // B serves a TCP echo on port 7000 (busybox nc, a new `cat` per connection).
    let b = Pod::run("net-b", "accordion", "exec nc -ll -p 7000 -e cat");
    let a = Pod::run("net-a", "accordion", "exec sleep 3600");
    let (ip_a, ip_b) = (a.ip(), b.ip());
    assert!(
        ip_a.starts_with("10.88.") && ip_b.starts_with("10.88."),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);

    // The guest's eth0 is CNI's: same IP, MAC and MTU.
    let netns_a = a.netns();
    let kept = KeptNetns::new(&netns_a, "a");
    let (mac, mtu) = cni_eth0(&netns_a);
    let (code, guest) = a.exec(
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ip -o -4 addr show dev eth0",
    );
    assert_eq!(code, 0, "{guest}");
    let lines: Vec<&str> = guest.lines().collect();
    assert_eq!(lines[0], mac, "{guest}");
    assert_eq!(lines[1], mtu, "{guest}");
    assert!(guest.contains(&format!("inet {ip_a}/16")), "{guest}");
    // Dual stack: the guest has CNI's IPv6 address too, and reaches B over IPv6.
    let v6 = |p: &Pod| {
        p.inspect()["status"]["network"]["additionalIps"]
            .as_array()
            .and_then(|ips| {
                ips.iter().find_map(|ip| {
                    ip["ip"]
                        .as_str()
                        .filter(|s| s.contains(':'))
                        .map(str::to_string)
                })
            })
            .expect("an IPv6 address from CNI")
    };
    let (v6_a, v6_b) = (v6(&a), v6(&b));
    let (_, guest6) = a.exec("ip -o -6 addr show dev eth0");
    assert!(guest6.contains(&format!("inet6 {v6_a}/64")), "{guest6}");
    // IPv6 duplicate address detection takes a moment after the guest adds the address.
    let reached6 = wait_for(Duration::from_secs(20), || {
        let (code, out) = a.exec(&format!("ping -6 -c 1 -W 3 {v6_b}"));
        (code == 0).then_some(()).ok_or(out)
    });
    assert!(reached6.is_ok(), "ping -6 {v6_b}: {reached6:?}");
    // Not the node's kernel: a VM.
    let (_, boot_id) = a.exec("cat /proc/sys/kernel/random/boot_id");
    let node_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
    assert_ne!(boot_id, node_boot);

    // Pod to pod: ping, and a TCP round trip through B's echo.
    let (code, out) = a.exec(&format!("ping -c 2 -W 5 {ip_b}"));
    assert_eq!(code, 0, "{out}");
    let (code, out) = a.exec(&format!("echo hello-from-a | nc -w 5 {ip_b} 7000"));
    assert_eq!((code, out.trim()), (0, "hello-from-a"), "{out}");
    // Pod to node: the bridge's address, and the default route through it.
    let (code, out) = a.exec("ping -c 1 -W 5 10.88.0.1 && ip route show default");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("default via 10.88.0.1"), "{out}");
    // DNS: the resolv.conf CRI made from the pod's dns_config.
    let (_, resolv) = a.exec("cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 10.88.0.1"), "{resolv}");
    assert!(resolv.contains("accordion.test"), "{resolv}");

    // The host side while the pod runs: a tap beside eth0, and the redirects.
    let links = text(&in_netns(&netns_a, &["ip", "-o", "link"]).stdout);
    assert!(links.contains("tap0_acc"), "{links}");
    let qdiscs = text(&in_netns(&netns_a, &["tc", "qdisc", "show", "dev", "eth0"]).stdout);
    assert!(qdiscs.contains("ingress"), "{qdiscs}");

    // Each pod's VMM process holds exactly its pod's tap, and its shim none (it handed the tap
    // over): no namespace file, no netlink socket left open in either.
    let shims = process_pids("containerd-shim-accordion-v2");
    assert_eq!(shims.len(), 2, "{shims:?}");
    for pid in shims {
        assert_eq!(network_fds(pid), (0, 0, 0), "shim {pid}");
    }
    let vmms = accordion_tests::vmm_pids();
    assert_eq!(vmms.len(), 2, "{vmms:?}");
    for pid in vmms {
        assert_eq!(network_fds(pid), (1, 0, 0), "vmm {pid}");
    }

    a.remove();
    b.remove();
    // The namespace (kept alive by our bind mount) has no tap and no ingress qdisc left.
    let links = text(&in_netns(&kept.0, &["ip", "-o", "link"]).stdout);
    assert!(!links.contains("_acc"), "{links}");
    let qdiscs = text(&in_netns(&kept.0, &["tc", "qdisc", "show"]).stdout);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    drop(kept);
    assert_no_leftovers("removing the pods");
}

#[test]
fn test_accordion_pod_reaches_a_runc_pod() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let r = Pod::run("net-runc", "runc", "exec nc -ll -p 7001 -e cat");
    let a = Pod::run("net-acc", "accordion", "exec sleep 3600");
    let (code, out) = a.exec(&format!("echo via-bridge | nc -w 5 {} 7001", r.ip()));
    assert_eq!((code, out.trim()), (0, "via-bridge"), "{out}");
    a.remove();
    r.remove();
    assert_no_leftovers("removing the pods");
}

#[test]
fn test_host_network_is_refused_and_a_missing_netns_is_named() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let out = ctr(&[
        "run",
        "--rm",
        "--net-host",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "hostnet",
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("host's network"), "{err}");

    let out = ctr(&[
        "run",
        "--rm",
        "--with-ns",
        "network:/var/run/netns/accordion-nope",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "nonetns",
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/var/run/netns/accordion-nope"), "{err}");
    assert_no_leftovers("removing the pods");
}

#[test]
fn test_a_namespace_with_only_lo_boots_a_vm_without_a_nic() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // An empty network namespace, kept by a bind mount (what `ip netns add` does).
    let ns = "/run/accordion-test-netns-empty";
    std::fs::write(ns, b"").expect("create the mount point");
    let out = Command::new("unshare")
        .args([
            "-n",
            "sh",
            "-c",
            &format!("mount --bind /proc/self/ns/net {ns}"),
        ])
        .output()
        .expect("unshare");
    assert_code(&out, 0);
    let out = ctr(&[
        "run",
        "--rm",
        "--with-ns",
        &format!("network:{ns}"),
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "lo-only",
        "sh",
        "-c",
        "ls /sys/class/net",
    ]);
    let _ = Command::new("umount").arg(ns).output();
    let _ = std::fs::remove_file(ns);
    assert_code(&out, 0);
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["lo"]
    );
    assert_no_leftovers("removing the pods");
}

#[test]
fn test_an_interface_that_vanishes_leaves_the_vm_running_and_teardown_clean() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let a = Pod::run("net-vanish", "accordion", "exec sleep 3600");
    let netns = a.netns();
    let out = in_netns(&netns, &["ip", "link", "del", "eth0"]);
    assert_code(&out, 0);
    // The guest still answers; its interface just has nowhere to send.
    let (code, out) = a.exec("echo alive; ping -c 1 -W 2 10.88.0.1 > /dev/null; echo done");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("alive") && out.contains("done"), "{out}");
    a.remove();
    assert_no_leftovers("removing the pods");
}
