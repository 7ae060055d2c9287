//! `cargo xtask`: Accordion's build orchestration (the cargo xtask pattern).
//!
//! Everything that needs ARM64 KVM runs in an emulated ARM64 node on x86_64 hosts, or directly on an
//! ARM64 host with /dev/kvm. See README.md and docs/BENCHMARKS.md.

mod assets;
mod bench;
mod containerd;
mod cpio;
mod cross;
mod image;
mod installer_test;
mod node;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

pub type XResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The workspace root (xtask lives one level below it).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

#[derive(Parser)]
#[command(about = "Accordion build orchestration", arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cross-build every workspace binary and example for aarch64 (static).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Fetch Debian's stock arm64 kernel and build the minimal guest kernel (cached).
    Kernels,
    /// Write the guest initramfs (busybox init) to a file.
    GuestInitrd { out: PathBuf },
    /// Boot the emulated ARM64 node and run a command in it as root; exits with its status.
    Node(NodeArgs),
    /// Run every integration test (tests/*.rs of each crate) for aarch64 in one node.
    NodeTest {
        /// Only test binaries whose name contains one of these (comma-separated).
        #[arg(long, value_delimiter = ',')]
        filter: Vec<String>,
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Benchmarks, run in one node each; medians printed (see docs/BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
    /// What `make demo` shows.
    Demo,
    /// Stage the files an ARM64 KVM host needs (docs/install.md) under DIR, laid out as under /:
    /// the shim and the CLI in usr/local/bin, the guest kernel and agent initramfs in
    /// opt/accordion/share/guest.
    Dist {
        dir: PathBuf,
        #[arg(long)]
        release: bool,
    },
    /// `accordion install`/`uninstall` against temporary roots with real containerd configs,
    /// loaded by Debian's containerd 1.7 and 2.x (`containerd config dump`).
    InstallerTest,
    /// Build the installer image the Helm chart's DaemonSet runs, as an OCI image-layout archive
    /// (FROM scratch: static release binaries and the guest assets). docs/install.md shows how to
    /// push it.
    Image {
        /// The archive to write (default target/image/accordion-installer-<version>.oci.tar).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct NodeOpts {
    /// vCPUs of the emulated node.
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Memory of the emulated node (qemu syntax: 3G, 2048M).
    #[arg(long, default_value = "3G")]
    memory: String,
    /// Hard limit for the whole node run, in seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Build and pack release binaries.
    #[arg(long)]
    release: bool,
    /// Add a host file to the node: HOST_PATH:NODE_PATH (NODE_PATH absolute).
    #[arg(long = "add", value_name = "HOST:NODE")]
    add: Vec<String>,
    /// Run containerd around the command: 1.7 (Debian trixie, the default) or 2.1 (Debian sid),
    /// each with runc, CNI and CRI, runtime `accordion` (io.containerd.accordion.v2, our shim)
    /// beside runc, and the images localhost/busybox:latest, localhost/accordion-test:latest and
    /// the pause image that version expects imported (scripts/containerd-node.sh). The node's
    /// ACCORDION_CONTAINERD says which.
    #[arg(long, value_name = "VERSION", num_args = 0..=1, require_equals = true,
          default_missing_value = "1.7")]
    containerd: Option<containerd::Version>,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    opts: NodeOpts,
    /// The command to run in the node, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: {e}");
            // 125: the harness failed, not the command (like `env`/`timeout` conventions).
            ExitCode::from(125)
        }
    }
}

fn step<T>(what: &str, f: impl FnOnce() -> XResult<T>) -> XResult<T> {
    let t = Instant::now();
    let r = f()?;
    if std::env::var_os("ACCORDION_NODE_QUIET").is_none() {
        eprintln!("xtask: {what} ({:.1}s)", t.elapsed().as_secs_f64());
    }
    Ok(r)
}

/// Forwards the variables a node command should see (e.g. CI's ACCORDION_REQUIRE_KVM=1).
fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("ACCORDION_") && k != "ACCORDION_CACHE")
        .chain([("RUST_BACKTRACE".to_string(), "1".to_string())])
        .collect()
}

pub fn prepare_node(
    opts: &NodeOpts,
    tests: Vec<cross::Artifact>,
    command: Vec<String>,
) -> XResult<(node::NodeSpec, assets::Kernels, PathBuf)> {
    let mut extra = Vec::new();
    for a in &opts.add {
        let (h, n) = a
            .split_once(':')
            .ok_or_else(|| format!("--add {a}: expected HOST_PATH:NODE_PATH"))?;
        if !n.starts_with('/') || !Path::new(h).is_file() {
            return Err(
                format!("--add {a}: host file must exist and node path be absolute").into(),
            );
        }
        extra.push((PathBuf::from(h), n.to_string()));
    }
    let bins = step("aarch64 build", || {
        cross::build(cross::Kind::Binaries, opts.release)
    })?;
    if opts.containerd.is_some() && !bins.iter().any(|a| a.name == containerd::SHIM_BINARY) {
        return Err(format!(
            "--containerd: the aarch64 build made no {}",
            containerd::SHIM_BINARY
        )
        .into());
    }
    let kernels = step("kernels", assets::kernels)?;
    let busybox = assets::busybox()?;
    let mut trees = vec![(step("virtiofsd", assets::virtiofsd)?, String::new())];
    let mut env = forwarded_env();
    if let Some(version) = opts.containerd {
        let tree = step(&format!("containerd {} tree", version.name()), || {
            containerd::tree(version)
        })?;
        trees.push((tree, String::new()));
        env.push(("ACCORDION_CONTAINERD".into(), version.name().into()));
    }
    let spec = node::NodeSpec {
        smp: opts.smp,
        memory: opts.memory.clone(),
        timeout: Duration::from_secs(opts.timeout),
        bins,
        tests,
        extra,
        trees,
        env,
        command,
        containerd: opts.containerd,
    };
    Ok((spec, kernels, busybox))
}

/// Runs a node command, or on an ARM64 KVM host the command itself. Returns its exit status.
pub fn run_in_node(spec: &node::NodeSpec, k: &assets::Kernels, busybox: &Path) -> XResult<i32> {
    if node::host_can_run_directly() {
        if spec.containerd.is_some() {
            return Err(
                "--containerd needs the emulated node; on an ARM64 host use its own containerd"
                    .into(),
            );
        }
        return direct::run(spec, k, busybox);
    }
    Ok(node::run(spec, k, busybox)?.exit_code)
}

fn run(cmd: Cmd) -> XResult<i32> {
    match cmd {
        Cmd::Build { release } => {
            for a in cross::build(cross::Kind::Binaries, release)? {
                println!("{}\t{}", a.name, a.path.display());
            }
            Ok(0)
        }
        Cmd::Kernels => {
            let k = assets::kernels()?;
            println!("{}", k.dir.display());
            Ok(0)
        }
        Cmd::GuestInitrd { out } => {
            let k = assets::kernels()?;
            assets::write_guest_initrd(&k, &assets::busybox()?, &out)?;
            Ok(0)
        }
        Cmd::Node(args) => {
            let (spec, k, bb) = prepare_node(&args.opts, Vec::new(), args.command)?;
            run_in_node(&spec, &k, &bb)
        }
        Cmd::NodeTest { filter, node: opts } => {
            let mut tests = step("aarch64 integration tests build", || {
                cross::build(cross::Kind::IntegrationTests, opts.release)
            })?;
            if !filter.is_empty() {
                tests.retain(|t| filter.iter().any(|f| t.name.contains(f.as_str())));
            }
            if tests.is_empty() {
                return Err("no integration tests matched".into());
            }
            // Each test binary runs in turn; failures are counted, never hidden. Arguments for
            // every binary (e.g. `--nocapture`) come from ACCORDION_TEST_ARGS.
            // ACCORDION_SECCOMP=log|record (scripts/seccomp-record.sh): the kernel's seccomp log
            // lines are collected from /proc/kmsg while the tests run (dmesg's ring would
            // wrap), unthrottled and kept off the serial console (which would crawl), and
            // printed deduplicated as `seccomp: <thread> <syscall nr>`.
            let script = "fail=0; n=0\n\
                 case \"$ACCORDION_SECCOMP\" in log|record)\n\
                   echo 0 > /proc/sys/kernel/printk_ratelimit; echo 3 > /proc/sys/kernel/printk\n\
                   while read -r line; do case $line in *type=1326*) echo \"$line\" >> /tmp/seccomp.log;; esac; done < /proc/kmsg &\n\
                   kmsg=$!;;\n\
                 esac\n\
                 for t in /opt/accordion/tests/*; do\n\
                   n=$((n+1)); echo \"=== node test binary: ${t##*/}\"\n\
                   \"$t\" $ACCORDION_TEST_ARGS || { fail=$((fail+1)); echo \"=== FAILED: ${t##*/}\"; }\n\
                 done\n\
                 echo \"=== node test binaries: $n run, $fail failed\"\n\
                 if [ -n \"$kmsg\" ]; then sleep 2; kill $kmsg; echo \"=== seccomp log\";\n\
                   sed -n 's/.*comm=\"\\([^\"]*\\)\".*syscall=\\([0-9]*\\).*/seccomp: \\1 \\2/p' /tmp/seccomp.log | sort -u; fi\n\
                 exit $fail\n";
            let (spec, k, bb) =
                prepare_node(&opts, tests, vec!["sh".into(), "-c".into(), script.into()])?;
            run_in_node(&spec, &k, &bb)
        }
        Cmd::Bench { what } => bench::run(what),
        Cmd::Demo => demo(),
        Cmd::Dist { dir, release } => dist(&dir, release),
        Cmd::Image { out } => installer_image(out),
        Cmd::InstallerTest => installer_test::run(),
    }
}

/// `cargo xtask image`: the installer image archive, and how to get it to a cluster.
fn installer_image(out: Option<PathBuf>) -> XResult<i32> {
    let bins = step("aarch64 release build", || {
        cross::build(cross::Kind::Binaries, true)
    })?;
    let kernels = step("kernels", assets::kernels)?;
    let busybox = assets::busybox()?;
    let out = out.unwrap_or_else(image::default_out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    step("installer image", || {
        image::build(&out, &bins, &kernels, &busybox)
    })?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "{} ({:.1} MiB): {}\n\
         push it with skopeo (no container engine needed):\n  \
         skopeo copy oci-archive:{} docker://<registry>/accordion-installer:{}\n\
         then: helm install accordion charts/accordion --set image.repository=<registry>/accordion-installer",
        out.display(),
        size as f64 / (1024.0 * 1024.0),
        image::reference(),
        out.display(),
        env!("CARGO_PKG_VERSION")
    );
    Ok(0)
}

/// `cargo xtask dist DIR`: prints every file it wrote.
fn dist(dir: &Path, release: bool) -> XResult<i32> {
    let bins = step("aarch64 build", || {
        cross::build(cross::Kind::Binaries, release)
    })?;
    let kernels = step("kernels", assets::kernels)?;
    let busybox = assets::busybox()?;
    let built = |name: &str| {
        bins.iter()
            .find(|a| a.name == name)
            .map(|a| a.path.as_path())
            .ok_or_else(|| format!("the aarch64 build made no {name}"))
    };
    let bin = dir.join("usr/local/bin");
    let guest = dir
        .join(node::SHARE_DIR.trim_start_matches('/'))
        .join("guest");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&guest)?;
    for name in [containerd::SHIM_BINARY, "accordion"] {
        let dest = bin.join(name);
        std::fs::rename(assets::stripped(built(name)?, &dest)?, &dest)?;
        println!("{}", dest.display());
    }
    let image = guest.join("Image");
    std::fs::copy(kernels.minimal(), &image)?;
    println!("{}", image.display());
    let initrd = guest.join("agent-initrd.cpio");
    assets::write_agent_initrd(&kernels, &busybox, built("accordion-agent")?, &initrd)?;
    println!("{}", initrd.display());
    Ok(0)
}

/// What `make demo` runs in the node: a 1-vCPU sandbox that grows and shrinks, with what the guest
/// reports and how long each step took.
const DEMO_SCRIPT: &str = r#"
now() { read up _ < /proc/uptime; echo "$up"; }
step() { echo; echo "== $*"; T0=$(now); }
took() { echo "   ($(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.0f", (b - a) * 1000 }') ms)"; }
cat > /root/demo-pod.json <<'JSON'
{"metadata": {"name": "demo", "namespace": "default", "uid": "demo-uid", "attempt": 1},
 "log_directory": "/tmp/demo-pod"}
JSON
cat > /root/demo-ctr.json <<'JSON'
{"metadata": {"name": "main"}, "image": {"image": "localhost/accordion-test:latest"},
 "command": ["sh", "-c", "echo started; exec sleep 3600"], "log_path": "main.log",
 "linux": {"resources": {"cpu_quota": 100000, "cpu_period": 100000, "cpu_shares": 1024}}}
JSON
guest() {
  accordion-cri exec "$C" -- sh -c 'echo "   guest sees: online CPUs $(cat /sys/devices/system/cpu/online), nproc $(nproc)"'
  echo "   container cgroup cpu.max: $(accordion exec "$P" -- cat /sys/fs/cgroup/accordion/$C/cpu.max)"
}
echo "node: $(uname -m), kernel $(uname -r), $(nproc) CPUs; containerd $(containerd --version | cut -d' ' -f3)"
accordion check | sed 's/^/   /'
step "a pod through containerd's CRI, runtime accordion: RunPodSandbox + CreateContainer + StartContainer (container limit 1 CPU)"
P=$(accordion-cri runp --runtime accordion /root/demo-pod.json) || exit 1
C=$(accordion-cri create "$P" /root/demo-ctr.json /root/demo-pod.json) || exit 1
accordion-cri start "$C" >/dev/null || exit 1
took
echo "   pod $P: $(pidof containerd-shim-accordion-v2 | wc -w) shim process (the VMM runs inside it), $(pidof virtiofsd | wc -w) virtiofsd"
accordion status "$P" | grep -E '^(vcpus|kernel|boot):' | sed 's/^/   /'
guest
for cpus in 4 1; do
  step "in-place resize as kubelet does it: UpdateContainerResources cpu quota ${cpus}00000 / period 100000"
  accordion-cri update --cpu-quota "${cpus}00000" --cpu-period 100000 "$C" || exit 1
  took
  guest
done
step "beyond the pod's 8 possible vCPUs: quota 900000 is refused, nothing changes"
accordion-cri update --cpu-quota 900000 --cpu-period 100000 "$C" 2>&1 | sed 's/^/   /'
guest
step "accordion status (the pod's VM, with its last resizes)"
accordion status "$P" | sed 's/^/   /'
step "StopPodSandbox + RemovePodSandbox"
accordion-cri stopp "$P" >/dev/null && accordion-cri rmp "$P" >/dev/null || exit 1
took
step "memory: a sandbox of 256 MiB that may grow to 2 GiB (virtio-mem): accordion run -d --memory 256M --max-memory 2G"
accordion run -d --name mem --vcpus 1 --max-vcpus 2 --memory 256M --max-memory 2G >/dev/null || exit 1
took
mem() {
  echo "   guest MemTotal: $(accordion exec mem -- sed -n 's/^MemTotal: *//p' /proc/meminfo); VMM $(accordion status mem | sed -n 's/^memory plugged: //p')"
}
mem
for size in 1G 256M; do
  step "accordion resize mem --memory $size"
  out=$(accordion resize mem --memory "$size") || exit 1
  echo "   $out"
  mem
done
accordion stop mem >/dev/null || exit 1
echo "   left in /run/accordion: $(ls /run/accordion | wc -l) entries"
"#;

fn demo() -> XResult<i32> {
    let opts = NodeOpts {
        smp: 2,
        memory: "3G".into(),
        timeout: 900,
        release: false,
        add: Vec::new(),
        containerd: Some(containerd::Version::V1_7),
    };
    println!(
        "== Accordion demo: a pod through containerd in the emulated ARM64 node; its microVM grows and shrinks its vCPUs; a sandbox grows and shrinks its memory"
    );
    let (spec, k, bb) = prepare_node(
        &opts,
        Vec::new(),
        vec!["sh".into(), "-c".into(), DEMO_SCRIPT.into()],
    )?;
    run_in_node(&spec, &k, &bb)
}

/// ARM64 hosts with KVM: no node, the command runs here with our binaries first on PATH.
mod direct {
    use super::*;

    pub fn run(spec: &node::NodeSpec, k: &assets::Kernels, busybox: &Path) -> XResult<i32> {
        let stage = root().join("target/direct");
        let bin = stage.join("bin");
        let guest = stage.join("share/guest");
        let tests = stage.join("tests");
        for d in [&bin, &guest, &tests] {
            std::fs::create_dir_all(d)?;
        }
        for a in &spec.bins {
            std::fs::copy(&a.path, bin.join(&a.name))?;
        }
        for a in &spec.tests {
            std::fs::copy(&a.path, tests.join(&a.name))?;
        }
        std::fs::copy(k.minimal(), guest.join("Image"))?;
        std::fs::copy(k.debian(), guest.join("Image-debian"))?;
        assets::write_guest_initrd(k, busybox, &guest.join("initrd.cpio"))?;
        if let Some(agent) = spec.bins.iter().find(|a| a.name == "accordion-agent") {
            assets::write_agent_initrd(k, busybox, &agent.path, &guest.join("agent-initrd.cpio"))?;
        }
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // Node scripts refer to /opt/accordion/tests; point them at the staged copies.
        let cmd: Vec<String> = spec
            .command
            .iter()
            .map(|a| a.replace("/opt/accordion/tests", &tests.to_string_lossy()))
            .collect();
        let status = std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("PATH", path)
            .env("ACCORDION_SHARE_DIR", stage.join("share"))
            .envs(spec.env.iter().cloned())
            .status()?;
        Ok(status.code().unwrap_or(128 + 9))
    }
}
