//! Pods through containerd's CRI plugin, as kubelet drives it, with `accordion-cri` (the CRI v1
//! client of this repository: crictl is not packaged here), in the emulated ARM64 node with
//! containerd (`cargo xtask node-test --containerd`): one VM per pod, and in-place resize
//! (UpdateContainerResources) becoming acknowledged vCPU hotplug.

use accordion_tests::containerd::{containerd_ready, process_pids, TEST_IMAGE};
use accordion_tests::cri_cli::{assert_no_leftovers, cri, cri_ok, write_json};
use accordion_tests::{
    accordion, assert_code, assert_vmm_jailed, can_run, guest_sh, meminfo_total, one_vm,
    proc_status_field, text, vmm_pid,
};

/// A pod config (no pod-level resources unless given).
fn pod_config(name: &str, resources: Option<serde_json::Value>) -> String {
    let mut linux = serde_json::json!({});
    if let Some(r) = resources {
        linux["resources"] = r;
    }
    pod_config_linux(name, linux)
}

/// A pod config whose `linux` section is `linux`.
fn pod_config_linux(name: &str, linux: serde_json::Value) -> String {
    write_json(
        &format!("pod-{name}"),
        &serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 1},
            "log_directory": format!("/tmp/pods/{name}"),
            "linux": linux,
        }),
    )
}

/// A container config running `script`, with CPU quota (period 100 ms) and shares.
fn container_config(name: &str, quota: Option<i64>, shares: Option<i64>, script: &str) -> String {
    let mut resources = serde_json::json!({});
    if let Some(q) = quota {
        resources["cpu_quota"] = q.into();
        resources["cpu_period"] = 100_000.into();
    }
    if let Some(s) = shares {
        resources["cpu_shares"] = s.into();
    }
    write_json(
        &format!("ctr-{name}"),
        &serde_json::json!({
            "metadata": {"name": name},
            "image": {"image": TEST_IMAGE},
            "command": ["sh", "-c", script],
            "log_path": format!("{name}.log"),
            "linux": {"resources": resources},
        }),
    )
}

/// RunPodSandbox with runtime `accordion`; returns the pod id.
fn run_pod(name: &str, resources: Option<serde_json::Value>) -> (String, String) {
    let config = pod_config(name, resources);
    let id = cri_ok(&["runp", "--runtime", "accordion", &config]);
    (id, config)
}

/// CreateContainer + StartContainer; returns the container id.
fn run_container(pod: &str, pod_config: &str, config: &str) -> String {
    let id = cri_ok(&["create", pod, config, pod_config]);
    cri_ok(&["start", &id]);
    id
}

/// ExecSync `sh -c script` in container `id`: (exit code, stdout).
fn exec(id: &str, script: &str) -> (i32, String) {
    let out = cri(&["exec", id, "--", "sh", "-c", script]);
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}

fn online(id: &str) -> String {
    let (code, out) = exec(id, "cat /sys/devices/system/cpu/online");
    assert_eq!(code, 0, "{out}");
    out.trim().to_string()
}

/// Stops and removes the pod, then checks nothing is left.
fn remove_pod(pod: &str) {
    cri_ok(&["stopp", pod]);
    cri_ok(&["rmp", pod]);
    assert_no_leftovers(&format!("removing pod {pod}"));
}

#[test]
fn test_pod_with_two_containers_runs_in_one_vm_and_leaves_nothing() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // Pod sysctls are the pod network's: the guest's. (containerd 2.x also adds
    // ping_group_range to every pod.)
    let sysctls = serde_json::json!({"net.ipv4.ip_unprivileged_port_start": "80"});
    let pod_cfg = pod_config_linux("two", serde_json::json!({ "sysctls": sysctls }));
    let pod = cri_ok(&["runp", "--runtime", "accordion", &pod_cfg]);
    let a = run_container(
        &pod,
        &pod_cfg,
        &container_config("a", Some(100_000), None, "echo a > /tmp/a; exec sleep 3600"),
    );
    let b = run_container(
        &pod,
        &pod_cfg,
        &container_config("b", Some(100_000), None, "exec sleep 3600"),
    );
    assert_eq!(
        process_pids("containerd-shim-accordion-v2").len(),
        1,
        "one shim (and so one VMM) for the pod"
    );
    // virtiofsd's namespace sandbox is two processes: the one the shim started, waiting in the
    // node's pid namespace, and the server, pid 1 of a pid namespace of its own.
    assert_eq!(
        process_pids("virtiofsd").len(),
        2,
        "one (sandboxed) virtiofsd for the pod"
    );
    // Same guest kernel (boot id), not the node's; separate root filesystems.
    let (_, boot_a) = exec(&a, "cat /proc/sys/kernel/random/boot_id");
    let (_, boot_b) = exec(&b, "cat /proc/sys/kernel/random/boot_id");
    let node_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
    assert_eq!(boot_a, boot_b);
    assert_ne!(boot_a, node_boot);
    assert_eq!(exec(&b, "cat /tmp/a 2>/dev/null; echo end").1, "end\n");
    assert_eq!(
        exec(&a, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start"),
        (0, "80\n".into())
    );
    // ExecSync: output and exit code.
    assert_eq!(
        exec(&a, "echo hi; uname -m; exit 3"),
        (3, "hi\naarch64\n".into())
    );
    // The pod's sandbox is an Accordion sandbox the operator CLI sees.
    let out = accordion(&["status", &pod]);
    assert_code(&out, 0);
    remove_pod(&pod);
}

#[test]
fn test_in_place_resize_is_acknowledged_vcpu_hotplug() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let (pod, pod_cfg) = run_pod("resize", None);
    let c = run_container(
        &pod,
        &pod_cfg,
        &container_config("main", Some(100_000), Some(1024), "exec sleep 3600"),
    );
    assert_eq!(online(&c), "0");

    // Up to 3 CPUs: acknowledged, the guest has CPUs 0-2 and the container's cgroup says so.
    cri_ok(&[
        "update",
        "--cpu-quota",
        "300000",
        "--cpu-period",
        "100000",
        &c,
    ]);
    assert_eq!(online(&c), "0-2");
    let cgroup = format!("/sys/fs/cgroup/accordion/{c}/cpu.max");
    let out = accordion(&["exec", &pod, "--", "cat", &cgroup]);
    assert_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "300000 100000");

    // Back to 1.
    cri_ok(&[
        "update",
        "--cpu-quota",
        "100000",
        "--cpu-period",
        "100000",
        &c,
    ]);
    assert_eq!(online(&c), "0");

    // Beyond max_vcpus: the call fails, containerd keeps the old resources, the guest is unchanged.
    let out = cri(&[
        "update",
        "--cpu-quota",
        "10000000",
        "--cpu-period",
        "100000",
        &c,
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("at most"),
        "{}",
        text(&out.stderr)
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&cri_ok(&["inspect", &c])).expect("inspect json");
    let quota = inspect
        .pointer("/status/resources/linux/cpu_quota")
        .or_else(|| inspect.pointer("/status/resources/linux/cpuQuota"));
    assert_eq!(
        quota.and_then(serde_json::Value::as_i64),
        Some(100_000),
        "{inspect}"
    );
    assert_eq!(online(&c), "0");

    // 20 updates in a row: the last one is what the guest ends with.
    for i in 0..20 {
        let cpus = [2, 4, 1, 3][i % 4];
        let quota = (cpus * 100_000).to_string();
        cri_ok(&[
            "update",
            "--cpu-quota",
            &quota,
            "--cpu-period",
            "100000",
            &c,
        ]);
    }
    assert_eq!(online(&c), "0-2");
    let out = accordion(&["status", &pod]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("resize"),
        "{}",
        text(&out.stdout)
    );
    remove_pod(&pod);
}

#[test]
fn test_pod_size_follows_limits_then_requests() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // Burstable: a request of 2 CPUs (2048 shares), no limit → 2 vCPUs.
    let (pod, pod_cfg) = run_pod("burstable", None);
    let c = run_container(
        &pod,
        &pod_cfg,
        &container_config("req", None, Some(2048), "exec sleep 3600"),
    );
    assert_eq!(online(&c), "0-1");
    remove_pod(&pod);

    // Two containers with limits 1 and 1.5 → ceil(2.5) = 3.
    let (pod, pod_cfg) = run_pod("pair", None);
    let one = run_container(
        &pod,
        &pod_cfg,
        &container_config("one", Some(100_000), None, "exec sleep 3600"),
    );
    assert_eq!(online(&one), "0");
    let half = run_container(
        &pod,
        &pod_cfg,
        &container_config("half", Some(150_000), None, "exec sleep 3600"),
    );
    assert_eq!(online(&half), "0-2");
    remove_pod(&pod);
}

/// The cgroup a process (or thread) is in: the `0::` line of its /proc cgroup file.
fn cgroup_of(proc_path: &str) -> String {
    std::fs::read_to_string(format!("{proc_path}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string()
}

fn read_trimmed(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn test_pod_vm_is_charged_to_its_cgroup_parent_and_cpu_max_follows_resizes() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let parent = "/kubepods/burstable/poduid-hostcgroup";
    let pod_cfg = write_json(
        "pod-hostcgroup",
        &serde_json::json!({
            "metadata": {"name": "hostcgroup", "namespace": "default", "uid": "uid-hostcgroup", "attempt": 1},
            "log_directory": "/tmp/pods/hostcgroup",
            "linux": {"cgroup_parent": parent},
        }),
    );
    let pod = cri_ok(&["runp", "--runtime", "accordion", &pod_cfg]);
    let ctr_cfg = write_json(
        "ctr-hostcgroup",
        &serde_json::json!({
            "metadata": {"name": "main"},
            "image": {"image": TEST_IMAGE},
            "command": ["sh", "-c", "exec sleep 3600"],
            "log_path": "main.log",
            "linux": {"resources": {
                "cpu_quota": 50_000, "cpu_period": 100_000, "cpu_shares": 512, "oom_score_adj": 500
            }},
        }),
    );
    let c = run_container(&pod, &pod_cfg, &ctr_cfg);
    let cgroup = format!("{parent}/{pod}");
    let dir = std::path::PathBuf::from(format!("/sys/fs/cgroup{cgroup}"));

    // Every thread of the shim (its vCPU and device threads) and virtiofsd are charged there.
    let shims = process_pids("containerd-shim-accordion-v2");
    // virtiofsd's namespace sandbox: a waiting parent and the server.
    let virtiofsd = process_pids("virtiofsd");
    assert_eq!((shims.len(), virtiofsd.len()), (1, 2));
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", shims[0]))
        .expect("shim threads")
        .flatten()
        .map(|t| t.path().display().to_string())
        .collect();
    assert!(threads.len() > 3, "{threads:?}");
    for thread in &threads {
        assert_eq!(cgroup_of(thread), cgroup, "{thread}");
    }
    for pid in &virtiofsd {
        assert_eq!(cgroup_of(&format!("/proc/{pid}")), cgroup);
    }

    // Limits: guest RAM (the node's 512 MiB default) + the host overhead; pids; the pod's CPU
    // limit (0.5 CPU); and the container's OOM score on both host processes.
    assert_eq!(
        read_trimmed(&dir.join("memory.max")),
        ((512 + 96) << 20).to_string()
    );
    assert_eq!(read_trimmed(&dir.join("pids.max")), "1024");
    assert_eq!(read_trimmed(&dir.join("cpu.max")), "50000 100000");
    let current: u64 = read_trimmed(&dir.join("memory.current"))
        .parse()
        .expect("memory.current");
    assert!(
        current > 16 << 20,
        "memory.current {current}: guest RAM is charged here"
    );
    for pid in [shims[0], virtiofsd[0], virtiofsd[1]] {
        assert_eq!(
            read_trimmed(std::path::Path::new(&format!("/proc/{pid}/oom_score_adj"))),
            "500"
        );
    }

    // The VM runs in a jailed process of its own, charged to the same cgroup, and `accordion
    // status` shows that process's confinement as the kernel has it.
    let vmm = vmm_pid(&pod);
    assert_ne!(vmm, shims[0]);
    assert_vmm_jailed(vmm);
    let out = accordion(&["status", &pod]);
    assert_code(&out, 0);
    let status = text(&out.stdout);
    let proc_status = read_trimmed(std::path::Path::new(&format!("/proc/{vmm}/status")));
    let proc_field = |key: &str| proc_status_field(&proc_status, key);
    let (uid, gid) = (proc_field("Uid:"), proc_field("Gid:"));
    let expected = [
        format!("vmm cgroup: {cgroup}\n"),
        format!(
            "vmm ids: uid {} (effective {}), gid {} (effective {})\n",
            uid[0], uid[1], gid[0], gid[1]
        ),
        "vmm no_new_privs: 1\n".to_string(),
        "vmm capabilities: none\n".to_string(),
        "vmm namespaces: host: none; own: mnt pid net user ipc uts cgroup\n".to_string(),
    ];
    for line in expected {
        assert!(status.contains(&line), "{line:?} not in:\n{status}");
    }
    assert!(status.contains("vmm seccomp: filter on"), "{status}");
    assert_eq!(
        read_trimmed(std::path::Path::new(&format!("/proc/{vmm}/oom_score_adj"))),
        "500"
    );

    // cpu.max follows in-place resizes: 1.5 CPUs (2 vCPUs), then back to 0.5.
    cri_ok(&[
        "update",
        "--cpu-quota",
        "150000",
        "--cpu-period",
        "100000",
        &c,
    ]);
    assert_eq!(online(&c), "0-1");
    assert_eq!(read_trimmed(&dir.join("cpu.max")), "150000 100000");
    cri_ok(&[
        "update",
        "--cpu-quota",
        "50000",
        "--cpu-period",
        "100000",
        &c,
    ]);
    assert_eq!(online(&c), "0");
    assert_eq!(read_trimmed(&dir.join("cpu.max")), "50000 100000");

    remove_pod(&pod);
    assert!(!dir.exists(), "{} left", dir.display());
}

const MIB: u64 = 1 << 20;

/// The guest's MemTotal as container `id` sees it, bytes.
fn memtotal(id: &str) -> u64 {
    let (code, out) = exec(id, "cat /proc/meminfo");
    assert_eq!(code, 0, "{out}");
    meminfo_total(&out)
}

/// Container `c`'s memory.max in the guest.
fn container_memory_max(pod: &str, c: &str) -> String {
    guest_sh(pod, &format!("cat /sys/fs/cgroup/accordion/{c}/memory.max"))
        .trim()
        .to_string()
}

fn inspect_memory_limit(c: &str) -> Option<i64> {
    let inspect: serde_json::Value =
        serde_json::from_str(&cri_ok(&["inspect", c])).expect("inspect json");
    inspect
        .pointer("/status/resources/linux/memory_limit_in_bytes")
        .or_else(|| inspect.pointer("/status/resources/linux/memoryLimitInBytes"))
        .and_then(serde_json::Value::as_i64)
}

#[test]
fn test_in_place_memory_resize_grows_and_shrinks_the_vm() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // A bad annotation: the pod does not start, and says why.
    let bad = write_json(
        "pod-badmax",
        &serde_json::json!({
            "metadata": {"name": "badmax", "namespace": "default", "uid": "uid-badmax", "attempt": 1},
            "log_directory": "/tmp/pods/badmax",
            "annotations": {"accordion.dev/max-memory": "2147483648"},
            "linux": {},
        }),
    );
    let out = cri(&["runp", "--runtime", "accordion", &bad]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("accordion.dev/max-memory")
            && text(&out.stderr).contains("unit"),
        "{}",
        text(&out.stderr)
    );
    assert_no_leftovers("a pod with a bad max-memory annotation");

    // Privileged (inside its VM only) so the container can mount a tmpfs to fill.
    let pod_cfg = write_json(
        "pod-memresize",
        &serde_json::json!({
            "metadata": {"name": "memresize", "namespace": "default", "uid": "uid-memresize", "attempt": 1},
            "log_directory": "/tmp/pods/memresize",
            "annotations": {"accordion.dev/max-memory": "2Gi"},
            "linux": {"security_context": {"privileged": true}},
        }),
    );
    let pod = cri_ok(&["runp", "--runtime", "accordion", &pod_cfg]);
    let ctr_cfg = write_json(
        "ctr-memresize",
        &serde_json::json!({
            "metadata": {"name": "main"},
            "image": {"image": TEST_IMAGE},
            "command": ["sh", "-c", "exec sleep 3600"],
            "log_path": "main.log",
            "linux": {
                "resources": {"cpu_quota": 100_000, "cpu_period": 100_000, "memory_limit_in_bytes": 256 << 20},
                "security_context": {"privileged": true},
            },
        }),
    );
    let c = run_container(&pod, &pod_cfg, &ctr_cfg);
    // 256 MiB + the guest's 128 fit the node's 512 MiB default: the VM boots at 512.
    let boot_total = memtotal(&c);
    assert_eq!(container_memory_max(&pod, &c), (256 << 20).to_string());
    let s = accordion_tests::sandbox_status(&pod);
    assert_eq!(
        s["memory plugged"], "0 MiB plugged of 0 MiB asked, up to 2048 MiB",
        "{s:?}"
    );
    // The pod's host cgroup, where its VMM is charged.
    let host_cgroup = cgroup_of(&format!("/proc/{}", vmm_pid(&pod)));
    let host_max = format!("/sys/fs/cgroup{host_cgroup}/memory.max");
    let host_memory_max = || read_trimmed(std::path::Path::new(&host_max));
    assert_eq!(host_memory_max(), ((512 + 96) << 20).to_string());

    // A 1 GiB limit: the VM grows to 1 GiB + 128 MiB before the container's limit follows, and
    // the container can use what it got (700 MiB, more than the VM booted with).
    cri_ok(&["update", "--memory", &(1u64 << 30).to_string(), &c]);
    assert_eq!(memtotal(&c), boot_total + 640 * MIB);
    assert_eq!(container_memory_max(&pod, &c), (1u64 << 30).to_string());
    assert_eq!(host_memory_max(), ((1152 + 96) << 20).to_string());
    let (code, out) = exec(
        &c,
        "mkdir -p /fill && mount -t tmpfs -o size=800m fill /fill && \
         dd if=/dev/zero of=/fill/x bs=1M count=700 2>/dev/null && wc -c < /fill/x",
    );
    assert_eq!((code, out.trim()), (0, "734003200"));
    let (code, _) = exec(&c, "rm /fill/x && umount /fill");
    assert_eq!(code, 0);

    // Above what the pod may grow to: refused, nothing changed.
    let out = cri(&["update", "--memory", &(3u64 << 30).to_string(), &c]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("at most 2048 MiB"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(inspect_memory_limit(&c), Some(1 << 30));
    assert_eq!(memtotal(&c), boot_total + 640 * MIB);
    assert_eq!(container_memory_max(&pod, &c), (1u64 << 30).to_string());

    // CPU and memory in one update: 3 vCPUs and 1.5 GiB (+128 MiB).
    cri_ok(&[
        "update",
        "--cpu-quota",
        "300000",
        "--cpu-period",
        "100000",
        "--memory",
        &(1536u64 << 20).to_string(),
        &c,
    ]);
    assert_eq!(online(&c), "0-2");
    assert_eq!(memtotal(&c), boot_total + 1152 * MIB);
    assert_eq!(container_memory_max(&pod, &c), (1536u64 << 20).to_string());

    // The guest holds 1000 MiB outside the container: a shrink to 256 MiB cannot leave it room.
    // The call fails saying so, and everything stays: the VM's size, its vCPUs, the container's
    // limit (put back after it was lowered) and the container itself.
    guest_sh(
        &pod,
        "mkdir -p /hold && mount -t tmpfs -o size=1100m hold /hold && \
         dd if=/dev/zero of=/hold/x bs=1M count=1000 2>/dev/null",
    );
    let out = cri(&["update", "--memory", &(256u64 << 20).to_string(), &c]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(err.contains("free memory in the guest first"), "{err}");
    assert_eq!(inspect_memory_limit(&c), Some(1536 << 20));
    assert_eq!(memtotal(&c), boot_total + 1152 * MIB);
    assert_eq!(container_memory_max(&pod, &c), (1536u64 << 20).to_string());
    assert_eq!(online(&c), "0-2");
    assert_eq!(guest_sh(&pod, "wc -c < /hold/x").trim(), "1048576000");

    // Freed, it shrinks: the container's limit first, then the VM back to its boot size, and
    // the host's limit with it.
    guest_sh(&pod, "rm /hold/x && umount /hold");
    cri_ok(&["update", "--memory", &(256u64 << 20).to_string(), &c]);
    assert_eq!(memtotal(&c), boot_total);
    assert_eq!(container_memory_max(&pod, &c), (256u64 << 20).to_string());
    assert_eq!(host_memory_max(), ((512 + 96) << 20).to_string());
    let s = accordion_tests::sandbox_status(&pod);
    assert_eq!(
        s["memory plugged"], "0 MiB plugged of 0 MiB asked, up to 2048 MiB",
        "{s:?}"
    );
    assert!(s.contains_key("memory resize"), "{s:?}");
    remove_pod(&pod);
}

/// A container with a seccomp profile: kubelet's RuntimeDefault (Pod Security "restricted"
/// requires it) and a Localhost profile, with and without no_new_privs. Its execs (exec probes,
/// `kubectl exec`) work and run under its filter, as its own process does.
#[test]
fn test_exec_runs_under_the_containers_seccomp_profile() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    // Everything allowed but making directories, which fails with EPERM.
    let profile = "/tmp/accordion-seccomp-no-mkdir.json";
    std::fs::write(
        profile,
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        })
        .to_string(),
    )
    .expect("write the seccomp profile");
    let (pod, pod_cfg) = run_pod("seccomp", None);
    let runtime_default = serde_json::json!({"profile_type": "RuntimeDefault"});
    let localhost = serde_json::json!({"profile_type": "Localhost", "localhost_ref": profile});
    for (name, seccomp, no_new_privs) in [
        ("rtdefault", &runtime_default, false),
        ("rtdefault-nnp", &runtime_default, true),
        ("localhost", &localhost, false),
        ("localhost-nnp", &localhost, true),
    ] {
        let cfg = write_json(
            &format!("ctr-{name}"),
            &serde_json::json!({
                "metadata": {"name": name},
                "image": {"image": TEST_IMAGE},
                "command": ["sh", "-c", "exec sleep 3600"],
                "log_path": format!("{name}.log"),
                "linux": {"security_context": {"seccomp": seccomp, "no_new_privs": no_new_privs}},
            }),
        );
        let c = run_container(&pod, &pod_cfg, &cfg);
        // The containers' own processes (`sleep`; the pod shares one pid namespace, whose pid 1
        // is the unconfined pause) and the exec are all in filter mode (2).
        let (code, out) = exec(
            &c,
            "for p in $(pidof sleep); do grep '^Seccomp:' /proc/$p/status; done; \
             echo self; grep '^Seccomp:' /proc/self/status; echo exec-ok",
        );
        assert_eq!(code, 0, "{name}: {out}");
        let (mains, own) = out.split_once("self\n").expect("the script's marker");
        assert!(
            !mains.is_empty() && mains.lines().all(|l| l == "Seccomp:\t2"),
            "{name}: {out}"
        );
        assert_eq!(own, "Seccomp:\t2\nexec-ok\n", "{name}");
        if seccomp == &localhost {
            // The filter is the container's: what it blocks, the exec cannot do either.
            let (code, out) = exec(&c, "mkdir /tmp/blocked 2>&1; echo rc=$?");
            assert_eq!(code, 0, "{name}: {out}");
            assert!(
                out.contains("Operation not permitted") && out.contains("rc=1"),
                "{name}: {out}"
            );
        } else {
            let (code, out) = exec(&c, "mkdir /tmp/allowed && echo made");
            assert_eq!((code, out.as_str()), (0, "made\n"), "{name}");
        }
    }
    remove_pod(&pod);
    let _ = std::fs::remove_file(profile);
}
