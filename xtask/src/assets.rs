//! Guest and node assets: kernels (scripts/kernels.sh), busybox, Debian modules, the guest initramfs.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{cpio, root, XResult};

/// The kernels directory produced by scripts/kernels.sh (see docs/kernels.md).
#[derive(Debug, Clone)]
pub struct Kernels {
    pub dir: PathBuf,
    pub debian_kver: String,
}

impl Kernels {
    pub fn minimal(&self) -> PathBuf {
        self.dir.join("Image")
    }
    pub fn debian(&self) -> PathBuf {
        self.dir.join("Image-debian")
    }
    pub fn modules_root(&self) -> PathBuf {
        self.dir.join("debian-modules")
    }
    fn kmod_dir(&self) -> PathBuf {
        self.modules_root()
            .join("lib/modules")
            .join(&self.debian_kver)
    }

    /// Module files (relative to lib/modules/<kver>) to insmod, in order, for an order file
    /// (`modules-node.order` / `modules-guest.order`): dependencies first, each once.
    pub fn insmod_list(&self, order_file: &str) -> XResult<Vec<String>> {
        let order = std::fs::read_to_string(self.dir.join(order_file))
            .map_err(|e| format!("{}: {e}", self.dir.join(order_file).display()))?;
        let dep_text = std::fs::read_to_string(self.kmod_dir().join("modules.dep"))?;
        let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
        for line in dep_text.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let d = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(path), (path.to_string(), d));
        }
        let mut out: Vec<String> = Vec::new();
        for name in order
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let key = name.replace('-', "_");
            let (path, d) = deps
                .get(&key)
                .ok_or_else(|| format!("module {name} not in {}", self.kmod_dir().display()))?;
            // modules.dep lists the full closure, deepest last: load in reverse.
            for dep in d.iter().rev().chain(std::iter::once(path)) {
                if !out.contains(dep) {
                    out.push(dep.clone());
                }
            }
        }
        Ok(out)
    }
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Runs scripts/kernels.sh (cached; prints progress on stderr) and returns its output directory.
/// `ACCORDION_KERNELS_DIR` points at a directory of the same shape to use instead (custom kernels).
pub fn kernels() -> XResult<Kernels> {
    if let Some(dir) = std::env::var_os("ACCORDION_KERNELS_DIR") {
        let dir = PathBuf::from(dir);
        let debian_kver = std::fs::read_to_string(dir.join("debian-kver"))
            .map_err(|e| {
                format!(
                    "ACCORDION_KERNELS_DIR: {}: {e}",
                    dir.join("debian-kver").display()
                )
            })?
            .trim()
            .to_string();
        return Ok(Kernels { dir, debian_kver });
    }
    let out = Command::new(root().join("scripts/kernels.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/kernels.sh: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprint!("{stdout}");
        return Err(format!("scripts/kernels.sh failed ({})", out.status).into());
    }
    let dir = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("kernels: "))
        .ok_or("scripts/kernels.sh printed no `kernels: DIR` line")?;
    let dir = PathBuf::from(dir.trim());
    let debian_kver = std::fs::read_to_string(dir.join("debian-kver"))?
        .trim()
        .to_string();
    Ok(Kernels { dir, debian_kver })
}

/// Debian trixie's static arm64 busybox (scripts/busybox.sh caches it).
pub fn busybox() -> XResult<PathBuf> {
    let out = Command::new(root().join("scripts/busybox.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/busybox.sh: {e}"))?;
    if !out.status.success() {
        return Err("scripts/busybox.sh failed".into());
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

/// Where the node has Debian's virtiofsd (the path Debian installs it at).
pub const NODE_VIRTIOFSD: &str = "/usr/libexec/virtiofsd";

/// scripts/virtiofsd.sh: Debian's virtiofsd and its libraries as a tree to pack at the node's
/// root, so integration tests can serve virtio-fs devices.
pub fn virtiofsd() -> XResult<PathBuf> {
    let out = Command::new(root().join("scripts/virtiofsd.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/virtiofsd.sh: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("virtiofsd: "))
        .filter(|_| out.status.success())
        .ok_or("scripts/virtiofsd.sh failed")?;
    let tree = PathBuf::from(dir.trim()).join("root");
    if !tree.join(NODE_VIRTIOFSD.trim_start_matches('/')).is_file() {
        return Err(format!(
            "scripts/virtiofsd.sh: no {NODE_VIRTIOFSD} under {}",
            tree.display()
        )
        .into());
    }
    Ok(tree)
}

/// The guest's /init: mounts, the boot-timer write, Debian's modules when booted on its kernel,
/// then `/accordion/cmd` (appended as its own cpio segment by whoever boots it) or a default.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Boot timer first: the VMM timestamps the moment init runs, independent of the console.
for arg in $(cat /proc/cmdline); do
    case "$arg" in accordion.boot_timer=*) devmem "${arg#*=}" 8 1 ;; esac
done
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
kver=$(uname -r)
if [ -f "/lib/modules/$kver/insmod.list" ]; then
    while read -r m; do insmod "/lib/modules/$kver/$m" || echo "init: insmod $m failed" >&2; done < "/lib/modules/$kver/insmod.list"
fi
if [ -x /accordion/cmd ]; then
    /accordion/cmd
else
    uname -a; cat /sys/devices/system/cpu/online
fi
rc=$?
echo "@@EXIT-CODE=$rc" > /dev/console
poweroff -f
"#;

/// Writes the guest initramfs used by the VMM's tests and `accordion run`: busybox, the init above
/// and, for the Debian stock kernel, virtio_mmio and the vsock modules (decompressed).
pub fn write_guest_initrd(k: &Kernels, busybox: &Path, dest: &Path) -> XResult<()> {
    let mut w = cpio::Writer::new(BufWriter::new(File::create(dest)?));
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc",
    ] {
        w.dir(d)?;
    }
    w.dir("lib")?;
    w.dir("lib/modules")?;
    w.file_from("bin/busybox", 0o755, busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, GUEST_INIT.as_bytes())?;
    add_modules(&mut w, k, "modules-guest.order")?;
    w.finish()?;
    Ok(())
}

/// Busybox applets linked in the agent's initramfs: busybox is a debugging tool and the shell that
/// `accordion run -- sh -c …` commands use, never the init.
const GUEST_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "cat",
    "echo",
    "printf",
    "ls",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "touch",
    "head",
    "tail",
    "wc",
    "grep",
    "sed",
    "awk",
    "sort",
    "uniq",
    "tr",
    "cut",
    "seq",
    "sleep",
    "true",
    "false",
    "test",
    "[",
    "env",
    "id",
    "uname",
    "nproc",
    "ps",
    "kill",
    "dmesg",
    "mount",
    "umount",
    "free",
    "df",
    "dd",
    "md5sum",
    "sha256sum",
    "yes",
    "date",
    "hostname",
    "ip",
    "stat",
    "readlink",
    "xargs",
    "find",
    "chmod",
    "devmem",
    "taskset",
    "top",
    "uptime",
];

/// Writes the guest initramfs whose PID 1 is the agent: `/init` is accordion-agent, plus busybox
/// (a tool, not the init) and, for Debian's stock kernel, the modules the agent loads itself.
pub fn write_agent_initrd(k: &Kernels, busybox: &Path, agent: &Path, dest: &Path) -> XResult<()> {
    let mut w = cpio::Writer::new(BufWriter::new(File::create(dest)?));
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc",
    ] {
        w.dir(d)?;
    }
    w.dir("lib")?;
    w.dir("lib/modules")?;
    let agent = stripped(agent, dest)?;
    w.file_from("init", 0o755, &agent)?;
    let _ = std::fs::remove_file(&agent);
    w.file_from("bin/busybox", 0o755, busybox)?;
    for applet in GUEST_APPLETS {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;
    add_modules(&mut w, k, "modules-guest.order")?;
    w.finish()?;
    Ok(())
}

/// A copy of an aarch64 binary without debug info (symbols stay, for backtraces), next to `near`.
/// Debug builds are ~15x larger than that, and every byte of an initramfs lives in guest RAM.
pub fn stripped(bin: &Path, near: &Path) -> XResult<PathBuf> {
    let name = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = near.with_file_name(format!("{name}.stripped"));
    let strip = if cfg!(target_arch = "aarch64") {
        "strip"
    } else {
        "aarch64-linux-gnu-strip"
    };
    let status = Command::new(strip)
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .map_err(|e| format!("cannot run {strip} (binutils-aarch64-linux-gnu): {e}"))?;
    if !status.success() {
        return Err(format!("{strip} {} failed ({status})", bin.display()).into());
    }
    Ok(out)
}

/// Adds `lib/modules/<kver>/…` for the modules an order file names, plus `insmod.list`.
pub fn add_modules<W: std::io::Write>(
    w: &mut cpio::Writer<W>,
    k: &Kernels,
    order_file: &str,
) -> XResult<()> {
    let list = k.insmod_list(order_file)?;
    let base = format!("lib/modules/{}", k.debian_kver);
    w.dir(&base)?;
    let mut dirs: Vec<String> = Vec::new();
    for m in &list {
        let mut prefix = base.clone();
        for part in Path::new(m).parent().into_iter().flat_map(|p| p.iter()) {
            prefix = format!("{prefix}/{}", part.to_string_lossy());
            if !dirs.contains(&prefix) {
                w.dir(&prefix)?;
                dirs.push(prefix.clone());
            }
        }
        w.file_from(&format!("{base}/{m}"), 0o644, &k.kmod_dir().join(m))?;
    }
    let mut listing = list.join("\n");
    listing.push('\n');
    w.file(&format!("{base}/insmod.list"), 0o644, listing.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_module_name_normalises_dashes_and_suffix() {
        assert_eq!(
            module_name("kernel/drivers/vhost/vhost_vsock.ko"),
            "vhost_vsock"
        );
        assert_eq!(module_name("kernel/net/vmw-vsock/vsock.ko.xz"), "vsock");
        assert_eq!(module_name("kernel/fs/overlay-fs.ko"), "overlay_fs");
    }

    #[test]
    fn test_insmod_list_puts_dependencies_first_once() {
        let dir = std::env::temp_dir().join(format!("xtask-mods-{}", std::process::id()));
        let kdir = dir.join("debian-modules/lib/modules/6.12.0-test");
        std::fs::create_dir_all(&kdir).unwrap();
        std::fs::write(
            kdir.join("modules.dep"),
            "kernel/a/vhost_vsock.ko: kernel/a/vhost.ko kernel/a/vhost_iotlb.ko kernel/b/vsock.ko\n\
             kernel/a/vhost.ko: kernel/a/vhost_iotlb.ko\n\
             kernel/a/vhost_iotlb.ko:\n\
             kernel/b/vsock.ko:\n",
        )
        .unwrap();
        std::fs::write(dir.join("x.order"), "vhost\nvhost-vsock\n").unwrap();
        let k = Kernels {
            dir: dir.clone(),
            debian_kver: "6.12.0-test".into(),
        };
        let list = k.insmod_list("x.order").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            list,
            [
                "kernel/a/vhost_iotlb.ko",
                "kernel/a/vhost.ko",
                "kernel/b/vsock.ko",
                "kernel/a/vhost_vsock.ko"
            ]
        );
    }
}
