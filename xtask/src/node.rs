//! The emulated ARM64 node: qemu-system-aarch64 (TCG, EL2, GICv3) booting Debian's stock kernel with an
//! initramfs holding busybox, our aarch64 binaries and the guest kernels, running one command as root.
//!
//! Channels: the command's stdout and stderr leave through two virtio consoles (hvc0, hvc1) to Unix
//! sockets we listen on, so they stay apart and are streamed live; the kernel and the exit marker go
//! to the serial port, which is logged to a file.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::assets::{self, Kernels};
use crate::containerd;
use crate::cpio;
use crate::cross::Artifact;
use crate::{root, XResult};

/// Where guest assets live in the node (and where Accordion looks by default).
pub const SHARE_DIR: &str = "/opt/accordion/share";
/// Where a node with containerd has the installer image archive (tests/tests/node_install.rs).
pub const INSTALLER_DIR: &str = "opt/accordion-installer";

/// What to run in the node and how.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub smp: u32,
    pub memory: String,
    pub timeout: Duration,
    pub bins: Vec<Artifact>,
    /// Executables placed under /opt/accordion/tests.
    pub tests: Vec<Artifact>,
    /// Extra host files: (host path, absolute node path).
    pub extra: Vec<(PathBuf, String)>,
    /// Host directory trees packed at a node path (regular files, directories and symlinks).
    pub trees: Vec<(PathBuf, String)>,
    pub env: Vec<(String, String)>,
    pub command: Vec<String>,
    /// containerd around the command (`--containerd`): its config, a bind-mounted root where
    /// pivot_root(2) works, and containerd started before and stopped after the command. The
    /// binaries and images come in `trees` (crate::containerd::tree).
    pub containerd: Option<containerd::Version>,
}

/// How a node run ended.
#[derive(Debug)]
pub struct NodeOutcome {
    /// The command's exit status inside the node.
    pub exit_code: i32,
    pub wall: Duration,
    /// Guest uptime when the command started, and the command's own duration (from the node).
    pub boot_to_command: Option<Duration>,
    pub command_time: Option<Duration>,
}

/// Failures of the harness itself (not of the command).
#[derive(Debug)]
pub enum NodeFailure {
    TimedOut { after: Duration, log: PathBuf },
    NoExitStatus { log: PathBuf, qemu_status: String },
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeFailure::TimedOut { after, log } => write!(
                f,
                "node timed out after {}s and was killed; serial log: {}",
                after.as_secs(),
                log.display()
            ),
            NodeFailure::NoExitStatus { log, qemu_status } => write!(
                f,
                "node ended ({qemu_status}) without reporting the command's exit status \
                 (kernel panic or init failure?); serial log: {}",
                log.display()
            ),
        }
    }
}

impl std::error::Error for NodeFailure {}

/// The node's /init. Busybox is the node's userland; the command runs as root in /root.
const NODE_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# pivot_root(2), which runc uses for every container, fails with EINVAL while / is the initial rootfs
# mount (it has no parent). With /accordion/reroot, / becomes a bind mount of that same tmpfs and PID 1
# chroots into it (switch_root's move + chroot, without copying a byte); mounts below come after.
if [ -f /accordion/reroot ] && [ -z "${NODE_REROOTED:-}" ]; then
    mkdir -p /.root && mount -o bind / /.root && cd /.root && mount -o move . / &&
        NODE_REROOTED=1 exec chroot . /init
    cd /
    reroot_failed=1
fi
unset NODE_REROOTED
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /var/tmp /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
[ -z "${reroot_failed:-}" ] || echo "node: re-rooting onto a bind mount failed: pivot_root will fail" > /dev/ttyAMA0
kver=$(uname -r)
if [ -f "/lib/modules/$kver/insmod.list" ]; then
    while read -r m; do insmod "/lib/modules/$kver/$m" 2>/dev/null || echo "node: insmod $m failed" > /dev/ttyAMA0; done < "/lib/modules/$kver/insmod.list"
fi
hostname accordion-node
# Guest RAM is memfd-backed and madvise(MADV_HUGEPAGE)d by the VMM; Debian's default "never" for
# shmem would make every nested guest fault its RAM in 4 KiB pages (boots twice as slow).
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
ip link set lo up 2>/dev/null
[ -f /accordion/env ] && . /accordion/env
cd /root
# The virtio consoles are ttys: keep them open and raw so bytes reach the host unchanged
# (no \n -> \r\n); settings last only while the tty is open.
exec 3<>/dev/hvc0 4<>/dev/hvc1
stty raw -echo <&3
stty raw -echo <&4
read -r up _ < /proc/uptime
echo "@@CMD-START uptime=$up" > /dev/ttyAMA0
sh /accordion/cmd.sh < /dev/null >&3 2>&4 3>&- 4>&-
rc=$?
read -r up _ < /proc/uptime
# Through printk (level 2, shown despite `quiet`), not the tty: the kernel writes its console out
# before it powers off, while bytes still queued in the tty's buffer can be lost, as the exit
# code once was (the line ended mid-way, then "reboot: Power down").
echo "<2>@@CMD-END uptime=$up" > /dev/kmsg
echo "<2>@@EXIT-CODE=$rc" > /dev/kmsg
sync
poweroff -f
"#;

/// Quotes one word for sh.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn write_node_initrd(spec: &NodeSpec, k: &Kernels, busybox: &Path, dest: &Path) -> XResult<()> {
    let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, File::create(dest)?));
    let mut dirs: Vec<String> = Vec::new();
    let mut mkdirs = |w: &mut cpio::Writer<_>, path: &str| -> std::io::Result<()> {
        let mut prefix = String::new();
        for part in path.trim_start_matches('/').split('/') {
            prefix = if prefix.is_empty() {
                part.to_string()
            } else {
                format!("{prefix}/{part}")
            };
            if !dirs.contains(&prefix) {
                w.dir(&prefix)?;
                dirs.push(prefix.clone());
            }
        }
        Ok(())
    };
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "etc",
        "lib/modules",
        "accordion",
        "opt/accordion/tests",
    ] {
        mkdirs(&mut w, d)?;
    }
    w.file_from("bin/busybox", 0o755, busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, NODE_INIT.as_bytes())?;
    w.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    w.file("etc/resolv.conf", 0o644, b"nameserver 127.0.0.1\n")?;
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;

    // Guest assets where Accordion looks by default.
    let guest = format!("{SHARE_DIR}/guest");
    mkdirs(&mut w, &guest)?;
    w.file_from(&format!("{guest}/Image"), 0o644, &k.minimal())?;
    w.file_from(&format!("{guest}/Image-debian"), 0o644, &k.debian())?;
    let guest_initrd = dest.with_file_name("guest-initrd.cpio");
    assets::write_guest_initrd(k, busybox, &guest_initrd)?;
    w.file_from(&format!("{guest}/initrd.cpio"), 0o644, &guest_initrd)?;
    std::fs::remove_file(&guest_initrd)?;
    if spec.containerd.is_some() {
        // The installer image (make image), for the install tests: the same archive, from the
        // node's (debug) binaries.
        let archive = dest.with_file_name("accordion-installer.oci.tar");
        crate::image::build(&archive, &spec.bins, k, busybox)?;
        mkdirs(&mut w, INSTALLER_DIR)?;
        w.file_from(
            &format!("{INSTALLER_DIR}/accordion-installer.oci.tar"),
            0o644,
            &archive,
        )?;
        std::fs::remove_file(&archive)?;
    }
    if let Some(agent) = spec.bins.iter().find(|a| a.name == "accordion-agent") {
        let agent_initrd = dest.with_file_name("agent-initrd.cpio");
        assets::write_agent_initrd(k, busybox, &agent.path, &agent_initrd)?;
        w.file_from(&format!("{guest}/agent-initrd.cpio"), 0o644, &agent_initrd)?;
        std::fs::remove_file(&agent_initrd)?;
    }

    // The node runs Debian's kernel: its modules for vhost-vsock, tun, overlay, bridges.
    assets::add_modules(&mut w, k, "modules-node.order")?;

    for a in &spec.bins {
        let small = assets::stripped(&a.path, dest)?;
        w.file_from(&format!("usr/local/bin/{}", a.name), 0o755, &small)?;
        std::fs::remove_file(&small)?;
    }
    for a in &spec.tests {
        w.file_from(&format!("opt/accordion/tests/{}", a.name), 0o755, &a.path)?;
    }
    for (host, node) in &spec.extra {
        if let Some(parent) = Path::new(node).parent() {
            mkdirs(&mut w, &parent.to_string_lossy())?;
        }
        let perm = if is_executable(host) { 0o755 } else { 0o644 };
        w.file_from(node, perm, host)?;
    }

    for (host, node) in &spec.trees {
        add_tree(&mut w, host, node.trim_end_matches('/'), &mut mkdirs)?;
    }

    let mut env = String::new();
    for (k, v) in &spec.env {
        env.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    w.file("accordion/env", 0o644, env.as_bytes())?;
    let cmd: Vec<String> = spec.command.iter().map(|a| sh_quote(a)).collect();
    let script = if let Some(version) = spec.containerd {
        add_containerd_files(&mut w, &mut mkdirs, version)?;
        containerd::wrap_command(&cmd.join(" "))
    } else {
        format!("exec {}\n", cmd.join(" "))
    };
    w.file("accordion/cmd.sh", 0o755, script.as_bytes())?;
    w.finish()?;
    Ok(())
}

/// containerd's configuration, Accordion's (for the shim), the CNI network, /var/run and the re-root
/// marker read by NODE_INIT.
fn add_containerd_files<W: Write>(
    w: &mut cpio::Writer<W>,
    mkdirs: &mut impl FnMut(&mut cpio::Writer<W>, &str) -> std::io::Result<()>,
    version: containerd::Version,
) -> XResult<()> {
    for d in [
        "etc/containerd",
        "etc/accordion",
        "etc/cni/net.d",
        "var/lib",
        "var/log",
    ] {
        mkdirs(w, d)?;
    }
    // CRI bind-mounts network namespaces under /var/run/netns.
    w.symlink("var/run", "../run")?;
    w.file(
        "etc/containerd/config.toml",
        0o644,
        containerd::config_toml(version).as_bytes(),
    )?;
    w.file(
        "etc/accordion/config.toml",
        0o644,
        containerd::accordion_config_toml().as_bytes(),
    )?;
    w.file(
        "etc/cni/net.d/10-accordion.conflist",
        0o644,
        containerd::CNI_CONFLIST.as_bytes(),
    )?;
    w.file(
        "accordion/containerd.sh",
        0o755,
        containerd::CONTROL_SCRIPT.as_bytes(),
    )?;
    w.file("accordion/reroot", 0o644, b"")?;
    Ok(())
}

/// Packs the tree under `host` at `node` (e.g. "" for the root), parents first.
fn add_tree<W: Write>(
    w: &mut cpio::Writer<W>,
    host: &Path,
    node: &str,
    mkdirs: &mut impl FnMut(&mut cpio::Writer<W>, &str) -> std::io::Result<()>,
) -> XResult<()> {
    let mut entries: Vec<_> = std::fs::read_dir(host)
        .map_err(|e| format!("{}: {e}", host.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{node}/{}", e.file_name().to_string_lossy());
        let ft = e.file_type()?;
        if ft.is_dir() {
            mkdirs(w, &name)?;
            add_tree(w, &e.path(), &name, mkdirs)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(e.path())?;
            w.symlink(&name, &target.to_string_lossy())?;
        } else {
            let perm = if is_executable(&e.path()) {
                0o755
            } else {
                0o644
            };
            w.file_from(&name, perm, &e.path())?;
        }
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Accepts one connection (qemu's chardev connects as a client) and copies it to `sink` until EOF.
fn pump(
    listener: UnixListener,
    mut sink: Box<dyn Write + Send>,
    done: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        };
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        let mut buf = [0u8; 16384];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = sink.flush();
                }
            }
        }
    })
}

fn run_dir() -> XResult<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = root()
        .join("target/node")
        .join(format!("run-{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn marker(log: &str, key: &str) -> Option<String> {
    log.lines()
        .rev()
        .find_map(|l| l.find(key).map(|i| l[i + key.len()..].trim().to_string()))
}

fn uptime(log: &str, key: &str) -> Option<Duration> {
    let v: f64 = marker(log, key)?.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(v).ok()
}

/// Boots the node, runs the command, streams its output, returns how it ended.
pub fn run(spec: &NodeSpec, k: &Kernels, busybox: &Path) -> XResult<NodeOutcome> {
    let dir = run_dir()?;
    let initrd = dir.join("node.cpio");
    let log = dir.join("serial.log");
    let t_pack = Instant::now();
    write_node_initrd(spec, k, busybox, &initrd)?;
    let pack_time = t_pack.elapsed();

    let out_sock = dir.join("out.sock");
    let err_sock = dir.join("err.sock");
    let out_l = UnixListener::bind(&out_sock)?;
    let err_l = UnixListener::bind(&err_sock)?;
    let done = Arc::new(AtomicBool::new(false));
    let out_t = pump(out_l, Box::new(std::io::stdout()), done.clone());
    let err_t = pump(err_l, Box::new(std::io::stderr()), done.clone());

    let mut qemu = Command::new("qemu-system-aarch64");
    qemu.args([
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
    ])
    .args(["-smp", &spec.smp.to_string(), "-m", &spec.memory])
    .arg("-kernel")
    .arg(k.debian())
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyAMA0 panic=-1 quiet"])
    .args([
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .args(["-device", "virtio-serial-pci"])
    .arg("-chardev")
    .arg(format!("socket,id=out,path={}", out_sock.display()))
    .args(["-device", "virtconsole,chardev=out"])
    .arg("-chardev")
    .arg(format!("socket,id=err,path={}", err_sock.display()))
    .args(["-device", "virtconsole,chardev=err"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(dir.join("qemu.stderr"))?);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent; it
    // makes the kernel kill qemu if xtask dies, so no node is ever left running.
    unsafe {
        qemu.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = qemu
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-aarch64 (run `make setup`): {e}"))?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > spec.timeout {
            let _ = child.kill();
            let _ = child.wait();
            done.store(true, Ordering::Relaxed);
            let _ = out_t.join();
            let _ = err_t.join();
            return Err(Box::new(NodeFailure::TimedOut {
                after: spec.timeout,
                log,
            }));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = out_t.join();
    let _ = err_t.join();
    let _ = std::fs::remove_file(&initrd);
    let _ = std::fs::remove_file(&out_sock);
    let _ = std::fs::remove_file(&err_sock);

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(code) = marker(&text, "@@EXIT-CODE=").and_then(|c| c.parse::<i32>().ok()) else {
        let qerr = std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
        eprintln!("--- last lines of {} ---", log.display());
        for l in text
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("{l}");
        }
        if !qerr.trim().is_empty() {
            eprintln!("--- qemu stderr ---\n{}", qerr.trim());
        }
        return Err(Box::new(NodeFailure::NoExitStatus {
            log,
            qemu_status: status.to_string(),
        }));
    };
    let start_up = uptime(&text, "@@CMD-START uptime=");
    let end_up = uptime(&text, "@@CMD-END uptime=");
    let command_time = match (start_up, end_up) {
        (Some(a), Some(b)) => b.checked_sub(a),
        _ => None,
    };
    if std::env::var_os("ACCORDION_NODE_QUIET").is_none() {
        eprintln!(
            "node: packed in {:.1}s; boot to command {}; command {}; qemu wall {:.1}s; serial log {}",
            pack_time.as_secs_f64(),
            fmt_opt(start_up),
            fmt_opt(command_time),
            wall.as_secs_f64(),
            log.display()
        );
    }
    Ok(NodeOutcome {
        exit_code: code,
        wall,
        boot_to_command: start_up,
        command_time,
    })
}

fn fmt_opt(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}s", d.as_secs_f64()))
        .unwrap_or_else(|| "?".into())
}

/// On an ARM64 host with a usable /dev/kvm, node commands run directly on the host.
pub fn host_can_run_directly() -> bool {
    cfg!(target_arch = "aarch64") && Path::new("/dev/kvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sh_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(sh_quote("uname"), "uname");
        assert_eq!(sh_quote("exit 7"), "'exit 7'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn test_marker_takes_the_last_occurrence() {
        let log = "boot\n@@EXIT-CODE=1\nnoise @@EXIT-CODE=7\n";
        assert_eq!(marker(log, "@@EXIT-CODE=").as_deref(), Some("7"));
        assert_eq!(
            uptime("@@CMD-START uptime=2.50\n", "@@CMD-START uptime="),
            Some(Duration::from_millis(2500))
        );
    }
}
