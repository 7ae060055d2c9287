//! `cargo xtask bench …`: measurements as medians over several runs (docs/BENCHMARKS.md).

use std::time::Duration;

use clap::Subcommand;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{node, prepare_node, root, run_in_node, NodeOpts, XResult};

#[derive(Subcommand)]
pub enum Bench {
    /// Boot time, accordion vs QEMU + KVM (Debian trixie's arm64 qemu) in the same node, same kernel
    /// and initramfs: process start → the guest init's console marker; 1-of-1, 1-of-128 and
    /// 128-of-128 vCPUs; VMM RSS; process start → the agent answering and running a command; the
    /// exec round trip of `true` (10 x --runs samples, median and p99). Medians over --runs.
    Boot {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Runs of the 128-of-128 configuration (0 skips it): ~4.5 min each in the emulated node,
        /// where 128 guest vCPUs share the node's two emulated CPUs.
        #[arg(long, default_value_t = 1)]
        runs_128: usize,
    },
    /// vCPU hotplug: `accordion resize` request → guest acknowledgement for 1→4, 4→1, one vCPU
    /// plugged (1→2) and unplugged (2→1), --runs times each (median, p99), each also as a fraction
    /// of a cold boot (process start → agent answered and ran a command) measured in the same run.
    Hotplug {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Guest kernel in the node's guest assets (Image = minimal, Image-debian = Debian stock).
        #[arg(long, default_value = "Image")]
        kernel: String,
    },
    /// Pods through containerd's CRI (accordion-cri): RunPodSandbox + CreateContainer +
    /// StartContainer until the container's first output, accordion vs runc alternately (medians
    /// over --runs); --concurrent accordion pods started at once (p50, p99 ÷ single); host RSS
    /// per sandbox (shim + VMM + virtiofsd, guest RAM excluded).
    Pod {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 10)]
        concurrent: usize,
    },
    /// In-place resize through CRI: UpdateContainerResources 1→4 and 4→1 CPUs until the call
    /// returns (acknowledged by the guest), --runs times each (median, p99), ÷ a cold pod start
    /// measured in the same run.
    Resize {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Pod-to-pod networking on the CNI bridge: round trip (ping) and TCP throughput (nc), two
    /// accordion pods against two runc pods in the same node (medians over --runs).
    Net {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The VMM's jail against the development switch that turns it off (ACCORDION_JAIL=off), in
    /// one node run with containerd: process start → agent answered and ran a command, resize
    /// 1→4 and 4→1 acknowledged, pod start through CRI beside runc, and host RSS per sandbox
    /// (shim + VMM + virtiofsd, guest RAM excluded), --runs times each, jail on then off.
    Jail {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Memory resize (virtio-mem): `accordion resize --memory` request → guest acknowledgement
    /// for 256 MiB → 1 GiB and back, --runs times each (median, p99), each also as a fraction of
    /// a cold boot measured in the same run; the guest fills 600 MiB between grow and shrink, and
    /// the VMM's RSS (guest RAM included) is sampled before each grow, once filled, and after
    /// each shrink.
    Memory {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest kernel in the node's guest assets (Image = minimal, Image-debian = Debian stock).
        #[arg(long, default_value = "Image")]
        kernel: String,
    },
    /// The emulated node itself: boot to the command, and whole-run wall time, over N runs.
    Node {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// With containerd around the command (`node --containerd`): the command time then
        /// includes containerd's start, the image imports and its stop.
        #[arg(long)]
        containerd: bool,
    },
}

pub fn median(mut v: Vec<Duration>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(v[v.len() / 2])
}

/// scripts/node-qemu.sh: the peer VMM as a tree to pack at the node's root.
fn node_qemu() -> XResult<PathBuf> {
    let out = Command::new(root().join("scripts/node-qemu.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/node-qemu.sh: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("node-qemu: "))
        .filter(|_| out.status.success())
        .ok_or("scripts/node-qemu.sh failed")?;
    Ok(PathBuf::from(dir.trim()).join("root"))
}

/// The node script of `bench boot`: every configuration boots the same minimal kernel and busybox
/// initramfs, whose /init prints `@@EXIT-CODE=` and powers off.
fn boot_script(runs: usize, runs_128: usize) -> String {
    let g = "/opt/accordion/share/guest";
    let acc = |label: &str, n: usize, vcpus: u32, max: u32| {
        format!(
            "accordion-bench run --label {label} --runs {n} --out $OUT -- boot --kernel {g}/Image \
             --initrd {g}/initrd.cpio --vcpus {vcpus} --max-vcpus {max} --memory 256\n"
        )
    };
    // No `set -e`: a configuration that fails is reported and the others still are.
    let mut s = String::from("OUT=/root/bench.txt\n: > $OUT\n");
    // A first boot warms the node's page cache; it is not measured.
    s.push_str(&format!(
        "boot --kernel {g}/Image --initrd {g}/initrd.cpio --memory 256 > /dev/null 2>&1 || true\n"
    ));
    s.push_str(&acc("acc-1of1", runs, 1, 1));
    s.push_str(&acc("acc-1of128", runs, 1, 128));
    s.push_str(&format!(
        "accordion-bench run --label qemu-1of1 --runs {runs} --out $OUT -- qemu-system-aarch64 \
         -M virt,gic-version=3 -accel kvm -cpu host -smp 1 -m 256M -kernel {g}/Image \
         -initrd {g}/initrd.cpio -append 'console=ttyAMA0 panic=-1 quiet' -nographic -no-reboot \
         -nic none\n"
    ));
    // Process start → the agent (PID 1) has answered Health and run a first command.
    s.push_str(&format!(
        "accordion-bench run --label acc-agent --marker @@AGENT-UP --runs {runs} --out $OUT -- \
         accordion run --kernel {g}/Image --memory 256M --vcpus 1 --max-vcpus 1 -- echo @@AGENT-UP\n"
    ));
    // Operator exec round trip (CLI process start + control socket + agent exec of `true`).
    s.push_str(&format!(
        "accordion run -d --name bench-exec --kernel {g}/Image --memory 256M --vcpus 1 --max-vcpus 1 >/dev/null\n\
         accordion-bench latency --label exec-true --runs {} --out $OUT -- accordion exec bench-exec -- true\n\
         accordion stop bench-exec >/dev/null\n",
        runs * 10
    ));
    if runs_128 > 0 {
        s.push_str(&acc("acc-128of128", runs_128, 128, 128));
    }
    s.push_str("accordion-bench report $OUT\n");
    s
}

/// The node script of `bench hotplug`.
fn hotplug_script(runs: usize, kernel: &str) -> String {
    let k = format!("/opt/accordion/share/guest/{kernel}");
    let mut s = String::from("OUT=/root/bench.txt\n: > $OUT\n");
    s.push_str(&format!(
        "accordion-bench run --label cold-boot --marker @@AGENT-UP --runs 5 --out $OUT -- \
         accordion run --kernel {k} --vcpus 1 --max-vcpus 8 -- echo @@AGENT-UP\n\
         accordion run -d --name hp --kernel {k} --vcpus 1 --max-vcpus 8 >/dev/null || exit 1\n\
         accordion resize hp --vcpus 4 >/dev/null && accordion resize hp --vcpus 1 >/dev/null || exit 1\n"
    ));
    // `accordion resize`'s server-side latency (request received → guest acknowledged), kept
    // only once `accordion status` shows the guest at the target.
    let step = |to: u32, label: &str| {
        format!("  accordion-bench vcpus --name hp --vcpus {to} --label {label} --out $OUT\n")
    };
    s.push_str(&format!("for i in $(seq {runs}); do\n"));
    s.push_str(&step(4, "resize-1to4"));
    s.push_str(&step(1, "resize-4to1"));
    s.push_str(&step(2, "plug-one"));
    s.push_str(&step(1, "unplug-one"));
    s.push_str("done\naccordion stop hp >/dev/null\naccordion-bench report $OUT\n");
    s
}

/// The node script of `bench memory`.
fn memory_script(runs: usize, kernel: &str) -> String {
    let k = format!("/opt/accordion/share/guest/{kernel}");
    let shape = format!("--kernel {k} --vcpus 1 --max-vcpus 2 --memory 256M --max-memory 2G");
    let mut s = String::from("OUT=/root/bench.txt\n: > $OUT\n");
    s.push_str(&format!(
        "accordion-bench run --label cold-boot --marker @@AGENT-UP --runs 5 --out $OUT -- \\\n\
         accordion run {shape} -- echo @@AGENT-UP\n\
         accordion run -d --name mem {shape} >/dev/null || exit 1\n\
         accordion resize mem --memory 1G >/dev/null && accordion resize mem --memory 256M >/dev/null || exit 1\n"
    ));
    // The guest uses what it got (600 MiB of a tmpfs, freed again) so the shrink gives back
    // memory the host really holds.
    let fill = "accordion exec mem -- sh -c 'mkdir -p /fill && mount -t tmpfs -o size=700m fill /fill \
                && dd if=/dev/zero of=/fill/x bs=1M count=600 2>/dev/null; rm -f /fill/x; umount /fill' \
                || echo 'FAIL fill the guest could not fill its memory' >> $OUT\n";
    s.push_str(&format!("for i in $(seq {runs}); do\n"));
    s.push_str("  accordion-bench rss --name mem --label rss-before-grow --out $OUT\n");
    s.push_str(
        "  accordion-bench memory --name mem --mib 1024 --label grow-256to1024 --out $OUT\n",
    );
    s.push_str(&format!("  {fill}"));
    s.push_str("  accordion-bench rss --name mem --label rss-filled --out $OUT\n");
    s.push_str(
        "  accordion-bench memory --name mem --mib 256 --label shrink-1024to256 --out $OUT\n",
    );
    s.push_str("  accordion-bench rss --name mem --label rss-after-shrink --out $OUT\n");
    s.push_str("done\naccordion stop mem >/dev/null\naccordion-bench report $OUT\n");
    s
}

/// The node script of `bench jail`: the jail on and off (ACCORDION_JAIL=off) alternately, sample
/// by sample, for the agent's readiness and resizes (one `accordion run -d` sandbox per mode, so
/// the machine's drift falls on both alike); then pods with it on, and again after containerd
/// restarts with the switch in its environment, which its shims inherit. Each mode has its own
/// results file and report.
fn jail_script(runs: usize) -> String {
    let k = "/opt/accordion/share/guest/Image";
    let out = |mode: &str| format!("/root/bench-jail-{mode}.txt");
    let (on, off) = (out("on"), out("off"));
    let agent_up = |env: &str, out: &str| {
        format!(
            "  {env}accordion-bench run --label agent-up --marker @@AGENT-UP --runs 1 --out {out} -- \\\n\
             accordion run --timings --kernel {k} --vcpus 1 --max-vcpus 8 -- echo @@AGENT-UP\n"
        )
    };
    let resize = |mode: &str, to: u32, label: &str| {
        format!(
            "  accordion-bench vcpus --name hp-{mode} --vcpus {to} --label {label} --out {}\n",
            out(mode)
        )
    };
    let mut s = format!(
        ": > {on}\n: > {off}\necho '== agent-up and resizes, jail on and off alternately'\n"
    );
    s.push_str(&format!("for i in $(seq {runs}); do\n"));
    s.push_str(&agent_up("", &on));
    s.push_str(&agent_up("ACCORDION_JAIL=off ", &off));
    s.push_str("done\n");
    for (mode, env) in [("on", ""), ("off", "ACCORDION_JAIL=off ")] {
        s.push_str(&format!(
            "{env}accordion run -d --name hp-{mode} --kernel {k} --vcpus 1 --max-vcpus 8 >/dev/null || exit 1\n\
             accordion resize hp-{mode} --vcpus 4 >/dev/null && accordion resize hp-{mode} --vcpus 1 >/dev/null || exit 1\n"
        ));
    }
    s.push_str(&format!("for i in $(seq {runs}); do\n"));
    for mode in ["on", "off"] {
        s.push_str(&resize(mode, 4, "resize-1to4"));
        s.push_str(&resize(mode, 1, "resize-4to1"));
    }
    s.push_str("done\naccordion stop hp-on >/dev/null; accordion stop hp-off >/dev/null\n");
    s.push_str(&format!(
        "echo '== pods, jail on'\n\
         accordion-bench pod --runs {runs} --concurrent 0 --out {on} || echo 'FAIL pods the pod bench failed' >> {on}\n\
         echo '== pods, jail off (containerd restarted with ACCORDION_JAIL=off)'\n\
         export ACCORDION_JAIL=off\n\
         ACCORDION_NODE_QUIET=1 /accordion/containerd.sh stop && ACCORDION_NODE_QUIET=1 /accordion/containerd.sh start || exit 1\n\
         accordion-bench pod --runs {runs} --concurrent 0 --out {off} || echo 'FAIL pods the pod bench failed' >> {off}\n\
         echo '== jail on'\naccordion-bench report {on}; on=$?\n\
         echo '== jail off'\naccordion-bench report {off} && exit $on\n"
    ));
    s
}

/// The node a benchmark runs in: two CPUs, `memory`, release binaries, an hour at most.
fn bench_node(memory: &str, containerd: Option<crate::containerd::Version>) -> NodeOpts {
    NodeOpts {
        smp: 2,
        memory: memory.into(),
        timeout: 3600,
        release: true,
        add: Vec::new(),
        containerd,
    }
}

/// A node run with containerd whose command is `script` (the CRI benchmarks).
fn cri_bench(script: String, what: &str) -> XResult<i32> {
    let opts = bench_node("3G", Some(crate::containerd::Version::V1_7));
    let (spec, k, bb) = prepare_node(&opts, Vec::new(), vec!["sh".into(), "-c".into(), script])?;
    println!(
        "bench {what}: in the emulated node, containerd 1.7 CRI, runtime `accordion` (and runc)"
    );
    run_in_node(&spec, &k, &bb)
}

pub fn run(b: Bench) -> XResult<i32> {
    match b {
        Bench::Pod { runs, concurrent } => cri_bench(
            format!(
                "accordion-bench pod --runs {runs} --concurrent {concurrent} --out /root/bench.txt"
            ),
            "pod",
        ),
        Bench::Resize { runs } => cri_bench(
            format!("accordion-bench resize --runs {runs} --out /root/bench.txt"),
            "resize",
        ),
        Bench::Jail { runs } => cri_bench(jail_script(runs), "jail"),
        Bench::Net { runs } => cri_bench(
            format!("accordion-bench net --runs {runs} --out /root/bench.txt"),
            "net",
        ),
        Bench::Memory { runs, kernel } => {
            let opts = bench_node("4G", None);
            let (spec, k, bb) = prepare_node(
                &opts,
                Vec::new(),
                vec!["sh".into(), "-c".into(), memory_script(runs, &kernel)],
            )?;
            println!(
                "bench memory: {kernel}, sandbox of 256 MiB growing to 1 GiB (max 2 GiB), in the emulated node"
            );
            run_in_node(&spec, &k, &bb)
        }
        Bench::Hotplug { runs, kernel } => {
            let opts = bench_node("3G", None);
            let (spec, k, bb) = prepare_node(
                &opts,
                Vec::new(),
                vec!["sh".into(), "-c".into(), hotplug_script(runs, &kernel)],
            )?;
            println!(
                "bench hotplug: {kernel}, sandbox of 1 of 8 vCPUs, 512 MiB, in the emulated node"
            );
            run_in_node(&spec, &k, &bb)
        }
        Bench::Boot { runs, runs_128 } => {
            let opts = bench_node("3G", None);
            let qemu = node_qemu()?;
            let (mut spec, k, bb) = prepare_node(
                &opts,
                Vec::new(),
                vec!["sh".into(), "-c".into(), boot_script(runs, runs_128)],
            )?;
            spec.trees.push((qemu, String::new()));
            println!("bench boot: minimal 6.12 kernel + busybox initramfs, 256 MiB, in the emulated node");
            run_in_node(&spec, &k, &bb)
        }
        Bench::Node { runs, containerd } => {
            let opts = NodeOpts {
                smp: 2,
                memory: "3G".into(),
                timeout: 300,
                release: false,
                add: Vec::new(),
                containerd: containerd.then_some(crate::containerd::Version::V1_7),
            };
            let (spec, k, bb) = prepare_node(&opts, Vec::new(), vec!["true".into()])?;
            let (mut boot, mut cmd, mut wall) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..runs {
                let o = node::run(&spec, &k, &bb)?;
                if o.exit_code != 0 {
                    return Err(format!("run {i}: `true` exited {}", o.exit_code).into());
                }
                boot.extend(o.boot_to_command);
                cmd.extend(o.command_time);
                wall.push(o.wall);
            }
            let m = |v: Vec<Duration>| {
                median(v).map_or("?".to_string(), |d| format!("{:.2}s", d.as_secs_f64()))
            };
            let with = if containerd { " with --containerd" } else { "" };
            println!("bench node: {runs} runs, -smp 2 -m 3G, command `true`{with}");
            println!("  guest uptime at command start (median): {}", m(boot));
            println!("  command `true` inside the node (median): {}", m(cmd));
            println!(
                "  qemu process wall time, start to exit (median): {}",
                m(wall)
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_jail_script_alternates_the_jail_on_and_off_and_reports_each() {
        let script = jail_script(2);
        let (alternating, pods) = script.split_once("echo '== pods, jail on'").expect("pods");
        // Each sample of the agent's readiness: on, then off.
        let on = "  accordion-bench run --label agent-up --marker @@AGENT-UP --runs 1 --out /root/bench-jail-on.txt";
        let off = "  ACCORDION_JAIL=off accordion-bench run --label agent-up --marker @@AGENT-UP --runs 1 --out /root/bench-jail-off.txt";
        let (i, j) = (
            alternating.find(on).expect("on"),
            alternating.find(off).expect("off"),
        );
        assert!(i < j && alternating[..i].ends_with("for i in $(seq 2); do\n"));
        assert!(alternating.contains("ACCORDION_JAIL=off accordion run -d --name hp-off"));
        assert!(alternating.contains(
            "accordion-bench vcpus --name hp-off --vcpus 4 --label resize-1to4 --out /root/bench-jail-off.txt\n"
        ));
        assert!(alternating.contains(
            "accordion-bench vcpus --name hp-on --vcpus 1 --label resize-4to1 --out /root/bench-jail-on.txt\n"
        ));
        // Pods: on first; off after containerd restarted with the switch (its shims inherit it).
        let (pods_on, pods_off) = pods.split_once("export ACCORDION_JAIL=off").expect("off");
        assert!(pods_on
            .contains("accordion-bench pod --runs 2 --concurrent 0 --out /root/bench-jail-on.txt"));
        assert!(pods_off.contains("/accordion/containerd.sh start"));
        assert!(pods_off.contains(
            "accordion-bench pod --runs 2 --concurrent 0 --out /root/bench-jail-off.txt"
        ));
        // Either report's failed samples fail the run.
        assert!(pods_off.contains("accordion-bench report /root/bench-jail-on.txt; on=$?\n"));
        assert!(pods_off.ends_with("accordion-bench report /root/bench-jail-off.txt && exit $on\n"));
    }

    #[test]
    fn test_hotplug_script_extracts_each_resize_latency() {
        let script = hotplug_script(3, "Image");
        assert!(script.contains(
            "  accordion-bench vcpus --name hp --vcpus 4 --label resize-1to4 --out $OUT\n"
        ));
        assert!(script.ends_with("accordion-bench report $OUT\n"));
        assert!(script.contains("for i in $(seq 3); do"));
        assert!(script.contains("--kernel /opt/accordion/share/guest/Image "));
    }

    #[test]
    fn test_memory_script_samples_rss_around_each_grow_and_shrink() {
        let script = memory_script(4, "Image");
        assert!(script.contains("for i in $(seq 4); do"));
        assert!(script.contains(
            "  accordion-bench memory --name mem --mib 1024 --label grow-256to1024 --out $OUT\n"
        ));
        let before = script.find("--label rss-before-grow").unwrap();
        let grow = script.find("--label grow-256to1024").unwrap();
        let filled = script.find("--label rss-filled").unwrap();
        let shrink = script.find("--label shrink-1024to256").unwrap();
        let after = script.find("--label rss-after-shrink").unwrap();
        assert!(before < grow && grow < filled && filled < shrink && shrink < after);
        assert!(script.contains("--memory 256M --max-memory 2G"));
        assert!(script.ends_with("accordion-bench report $OUT\n"));
    }

    #[test]
    fn test_median_of_odd_and_even_and_empty() {
        let s = Duration::from_secs;
        assert_eq!(median(vec![s(3), s(1), s(2)]), Some(s(2)));
        assert_eq!(median(vec![s(4), s(1), s(2), s(3)]), Some(s(3)));
        assert_eq!(median(Vec::new()), None);
    }
}
