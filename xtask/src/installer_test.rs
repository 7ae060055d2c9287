//! `cargo xtask installer-test` (in `make test`): `accordion install` against temporary roots
//! holding real containerd configs (runtime/src/install/testdata), and containerd itself, Debian's
//! 1.7 (trixie) and 2.x (sid) for this machine's architecture, loading the result with `containerd
//! config dump`. Each case checks that:
//! - containerd accepts the config and has the `accordion` runtime in the right plugin;
//! - every line of the dump before the install is still there after it (the install only adds);
//! - a second install changes no byte, and uninstall restores the root byte for byte.
//!
//! The installer is the aarch64 `accordion` binary the node tests use (static; qemu-user runs it on
//! x86_64). containerd runs in a private mount namespace with the root's /etc bind-mounted over
//! /etc, so the absolute paths in the configs resolve inside the root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::{cross, root, XResult};

/// A containerd binary and its major version.
struct Containerd {
    major: u8,
    bin: PathBuf,
}

/// containerd from a Debian suite for this machine's architecture (cached), as `containerd`
/// extracted from the package.
fn containerd(suite: &str, major: u8) -> XResult<Containerd> {
    let cache = std::env::var_os("ACCORDION_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/accordion")
        })
        .join("containerd-bin");
    let apt = root().join("scripts/debian-apt.sh");
    let out = Command::new(&apt)
        .args(["version", suite, "containerd"])
        .stderr(Stdio::inherit())
        .output()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if version.is_empty() {
        return Err(format!("no containerd in Debian {suite}").into());
    }
    let dir = cache.join(format!("{suite}-{}", version.replace([':', '~', '+'], "_")));
    let bin = dir.join("usr/bin/containerd");
    if !bin.is_file() {
        eprintln!("installer-test: fetching containerd {version} ({suite})");
        let debs = dir.with_extension("debs");
        let _ = std::fs::remove_dir_all(&debs);
        let status = Command::new(&apt)
            .args(["download", suite])
            .arg(&debs)
            .arg(format!("containerd={version}"))
            .status()?;
        if !status.success() {
            return Err(format!("cannot download containerd {version} from {suite}").into());
        }
        for deb in std::fs::read_dir(&debs)?.flatten() {
            let status = Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&dir)
                .status()?;
            if !status.success() {
                return Err(format!("cannot unpack {}", deb.path().display()).into());
            }
        }
        std::fs::remove_dir_all(&debs)?;
    }
    let out = Command::new(&bin).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || !text.contains(&format!(" {major}.")) {
        return Err(format!("{} --version: {text:?}", bin.display()).into());
    }
    Ok(Containerd { major, bin })
}

/// Everything under a root: path → bytes (symlinks: their target; dirs: empty, with a marker).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap_or_default();
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else if m.is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                walk(root, &p, out);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mut v = format!("{:o} ", m.permissions().mode()).into_bytes();
                v.extend(std::fs::read(&p).unwrap_or_default());
                out.insert(rel, v);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `containerd config dump` of the config at /etc/containerd/config.toml under `root`.
fn dump(c: &Containerd, root: &Path) -> Result<String, String> {
    // Without a config file, what containerd runs on is its built-in one (1.7's `config dump`
    // fails on the missing file).
    let what = if root.join("etc/containerd/config.toml").exists() {
        "--config /etc/containerd/config.toml config dump"
    } else {
        "config default"
    };
    let script = format!(
        "mount --bind '{}' /etc && exec '{}' {what}",
        root.join("etc").display(),
        c.bin.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .map_err(|e| format!("unshare: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "containerd {} config dump failed: {}",
            c.major,
            text(&out)
        ));
    }
    // 2.x quotes strings with ' where 1.7 uses ": compare one form.
    Ok(String::from_utf8_lossy(&out.stdout).replace('\'', "\""))
}

/// One scenario: containerd's files in the root, the flags, the containerd that loads it, and
/// lines its dump must show once installed.
struct Case {
    name: &'static str,
    files: &'static [(&'static str, &'static str)],
    version_flag: &'static str,
    loaders: &'static [u8],
    expect: &'static [&'static str],
}

const TESTDATA: &str = "runtime/src/install/testdata";

const CASES: &[Case] = &[
    Case {
        name: "1.7 default config",
        files: &[("etc/containerd/config.toml", "containerd-1.7-default.toml")],
        version_flag: "auto",
        loaders: &[1, 2],
        expect: &[],
    },
    Case {
        name: "1.7 kubeadm-style config, conf.d glob import",
        files: &[
            ("etc/containerd/config.toml", "containerd-1.7-custom.toml"),
            (
                "etc/containerd/conf.d/mirror.toml",
                "containerd-1.7-conf.d-mirror.toml",
            ),
        ],
        version_flag: "auto",
        loaders: &[1, 2],
        expect: &[
            "SystemdCgroup = true",
            "runtime_type = \"io.containerd.runsc.v1\"",
            "registry.k8s.io/pause:3.10",
        ],
    },
    Case {
        name: "2.1 default config",
        files: &[("etc/containerd/config.toml", "containerd-2.1-default.toml")],
        version_flag: "auto",
        loaders: &[2],
        expect: &[],
    },
    Case {
        name: "2.1 custom config with an import",
        files: &[
            ("etc/containerd/config.toml", "containerd-2.1-custom.toml"),
            ("etc/containerd/extra.toml", "containerd-2.1-extra.toml"),
        ],
        version_flag: "auto",
        loaders: &[2],
        expect: &[
            "SystemdCgroup = true",
            "runtime_type = \"io.containerd.runsc.v1\"",
            "registry.k8s.io/pause:3.10",
        ],
    },
    // No config file: the host's containerd binary (in the root, run chrooted) tells its version
    // and, for 1.x, its built-in defaults.
    Case {
        name: "no config file, containerd 1.7 detected",
        files: &[],
        version_flag: "auto",
        loaders: &[1],
        expect: &[],
    },
    Case {
        name: "no config file, containerd 2.1 detected",
        files: &[],
        version_flag: "auto",
        loaders: &[2],
        expect: &[],
    },
];

/// The runtime's table header in a dump of containerd `major`.
fn runtime_header(major: u8) -> &'static str {
    if major >= 2 {
        "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.accordion]"
    } else {
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.accordion]"
    }
}

/// Writes `bytes` at `p`, creating its directory.
fn put(p: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::create_dir_all(p.parent().unwrap_or(Path::new("/"))).map_err(|e| e.to_string())?;
    std::fs::write(p, bytes).map_err(|e| format!("{}: {e}", p.display()))
}

/// A fresh `scratch` with a host root holding a virtiofsd stand-in (`root/`) and an install
/// source with stand-ins for the image's files (`src/`); returns (root, src).
fn fresh_host(scratch: &Path) -> Result<(PathBuf, PathBuf), String> {
    let _ = std::fs::remove_dir_all(scratch);
    let (host, src) = (scratch.join("root"), scratch.join("src"));
    put(&host.join("usr/libexec/virtiofsd"), b"virtiofsd stand-in")?;
    for f in [
        "bin/accordion",
        "bin/containerd-shim-accordion-v2",
        "share/guest/Image",
        "share/guest/agent-initrd.cpio",
    ] {
        put(&src.join(f), f.as_bytes())?;
    }
    Ok((host, src))
}

fn run_case(
    case: &Case,
    installer: &Path,
    loaders: &[Containerd],
    scratch: &Path,
) -> Result<(), String> {
    let (host, src) = fresh_host(scratch)?;
    for (path, fixture) in case.files {
        let bytes = std::fs::read(root().join(TESTDATA).join(fixture))
            .map_err(|e| format!("{fixture}: {e}"))?;
        put(&host.join(path), &bytes)?;
    }
    let install = || -> Result<String, String> {
        let mut cmd = installer_command(installer);
        cmd.arg("install")
            .arg("--root")
            .arg(&host)
            .arg("--source")
            .arg(&src)
            .args([
                "--restart",
                "none",
                "--skip-kvm-check",
                "--containerd-version",
                case.version_flag,
            ]);
        let out = cmd
            .output()
            .map_err(|e| format!("run the installer: {e}"))?;
        if !out.status.success() {
            return Err(format!("install failed: {}", text(&out)));
        }
        Ok(text(&out))
    };
    let used: Vec<&Containerd> = loaders
        .iter()
        .filter(|c| case.loaders.contains(&c.major))
        .collect();
    if case.files.is_empty() {
        for c in &used {
            put_in_root(&c.bin, &host)?;
        }
    }
    std::fs::create_dir_all(host.join("etc")).map_err(|e| e.to_string())?;
    let before = snapshot(&host);
    // Without a config file this is containerd's built-in configuration.
    let dumps_before: Vec<String> = used
        .iter()
        .map(|c| dump(c, &host))
        .collect::<Result<_, _>>()?;
    install()?;
    let once = snapshot(&host);
    for (c, before_dump) in used.iter().zip(&dumps_before) {
        let after = dump(c, &host)?;
        if !after.contains(runtime_header(c.major))
            || !after.contains("runtime_type = \"io.containerd.accordion.v2\"")
        {
            return Err(format!(
                "containerd {}'s dump has no accordion runtime:\n{after}",
                c.major
            ));
        }
        for want in case.expect {
            if !after.contains(want) {
                return Err(format!(
                    "containerd {}'s dump lost {want:?}:\n{after}",
                    c.major
                ));
            }
        }
        let lost: Vec<&str> = before_dump
            .lines()
            .filter(|l| !l.trim_start().starts_with("imports") && !after.lines().any(|a| a == *l))
            .collect();
        if !lost.is_empty() {
            return Err(format!(
                "containerd {}'s dump lost lines after the install: {lost:?}",
                c.major
            ));
        }
    }
    install()?;
    if snapshot(&host) != once {
        return Err("a second install changed the root".into());
    }
    let out = installer_command(installer)
        .arg("uninstall")
        .arg("--root")
        .arg(&host)
        .args(["--restart", "none"])
        .output()
        .map_err(|e| format!("run the installer: {e}"))?;
    if !out.status.success() {
        return Err(format!("uninstall failed: {}", text(&out)));
    }
    let after = snapshot(&host);
    if after != before {
        let diff: Vec<String> = after
            .keys()
            .chain(before.keys())
            .filter(|k| after.get(*k) != before.get(*k))
            .map(|k| k.display().to_string())
            .collect();
        return Err(format!("uninstall did not restore the root: {diff:?}"));
    }
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

/// config.toml of the chart's ConfigMap, rendered by Helm's engine (scripts/chart-test.sh).
fn render_chart_config(values: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(root().join("scripts/chart-test.sh"));
    cmd.arg("template").current_dir(root());
    if let Some(v) = values {
        cmd.args(["-f", v]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("scripts/chart-test.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("helm template failed: {}", text(&out)));
    }
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    // A block scalar: the lines after `config.toml: |` indented deeper than the key.
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.toml: |");
    let key = lines.next().ok_or("no config.toml in the rendered chart")?;
    let indent = key.len() - key.trim_start().len() + 2;
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect();
    Ok(body.join("\n").trim_end().to_string() + "\n")
}

fn chart_config(installer: &Path, scratch: &Path, values: Option<&str>) -> Result<(), String> {
    let config = render_chart_config(values)?;
    let (host, src) = fresh_host(scratch)?;
    let defaults = root().join(TESTDATA).join("containerd-2.1-default.toml");
    std::fs::create_dir_all(host.join("etc/containerd")).map_err(|e| e.to_string())?;
    std::fs::copy(&defaults, host.join("etc/containerd/config.toml")).map_err(|e| e.to_string())?;
    let file = scratch.join("chart-config.toml");
    std::fs::write(&file, &config).map_err(|e| e.to_string())?;
    let before = snapshot(&host);
    let out = installer_command(installer)
        .arg("install")
        .arg("--root")
        .arg(&host)
        .arg("--source")
        .arg(&src)
        .arg("--config")
        .arg(&file)
        .args(["--restart", "none", "--skip-kvm-check"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "install with the chart's config failed: {}\n{config}",
            text(&out)
        ));
    }
    let installed = std::fs::read_to_string(host.join("etc/accordion/config.toml"))
        .map_err(|e| e.to_string())?;
    if installed != config {
        return Err(format!("installed config differs:\n{installed}"));
    }
    let out = installer_command(installer)
        .arg("uninstall")
        .arg("--root")
        .arg(&host)
        .args(["--restart", "none"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() || snapshot(&host) != before {
        return Err(format!(
            "uninstall did not restore the root: {}",
            text(&out)
        ));
    }
    Ok(())
}

fn refused_without_kvm(installer: &Path, scratch: &Path) -> Result<(), String> {
    let (host, src) = fresh_host(scratch)?;
    put(&host.join("etc/containerd/config.toml"), b"version = 3\n")?;
    let before = snapshot(&host);
    let out = installer_command(installer)
        .arg("install")
        .arg("--root")
        .arg(&host)
        .arg("--source")
        .arg(&src)
        .args(["--restart", "none"])
        .output()
        .map_err(|e| e.to_string())?;
    let said = text(&out);
    if out.status.success() || !said.contains("This host cannot run Accordion") {
        return Err(format!(
            "expected a refusal, got {:?}: {said}",
            out.status.code()
        ));
    }
    if snapshot(&host) != before {
        return Err("the refused install changed the root".into());
    }
    Ok(())
}

/// Copies a dynamically linked binary into `root` as usr/bin/<name>, with the libraries `ldd`
/// lists at their paths, so it runs chrooted there as on a host.
fn put_in_root(bin: &Path, root: &Path) -> Result<(), String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let mut files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    files.push(bin.to_path_buf());
    for f in files {
        let dest = if f == bin {
            root.join("usr/bin")
                .join(bin.file_name().unwrap_or_default())
        } else {
            root.join(f.strip_prefix("/").unwrap_or(&f))
        };
        std::fs::create_dir_all(dest.parent().unwrap_or(root)).map_err(|e| e.to_string())?;
        std::fs::copy(&f, &dest).map_err(|e| format!("copy {}: {e}", f.display()))?;
    }
    Ok(())
}

/// The aarch64 installer: directly on an ARM64 host, else under qemu-user (the binary is static).
fn installer_command(bin: &Path) -> Command {
    if cfg!(target_arch = "aarch64") {
        Command::new(bin)
    } else {
        let mut c = Command::new("qemu-aarch64-static");
        c.arg(bin);
        c
    }
}

pub fn run() -> XResult<i32> {
    let t0 = Instant::now();
    let bins = cross::build(cross::Kind::Binaries, false)?;
    let installer = bins
        .iter()
        .find(|a| a.name == "accordion")
        .ok_or("the aarch64 build made no accordion")?
        .path
        .clone();
    let loaders = [containerd("trixie", 1)?, containerd("sid", 2)?];
    let scratch =
        std::env::temp_dir().join(format!("accordion-installer-test-{}", std::process::id()));
    let mut failed = 0;
    for case in CASES {
        let t = Instant::now();
        match run_case(case, &installer, &loaders, &scratch) {
            Ok(()) => println!(
                "installer-test: ok   {} ({:.1} s)",
                case.name,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!("installer-test: FAIL {}: {e}", case.name);
            }
        }
    }
    let mut cases = CASES.len();
    // The chart's rendered config.toml (default and custom values) is what the DaemonSet passes
    // to --config: the installer must accept it as is.
    for values in [None, Some("tests/chart/custom.yaml")] {
        cases += 1;
        let name = format!(
            "the chart's config.toml ({})",
            values.unwrap_or("default values")
        );
        match chart_config(&installer, &scratch, values) {
            Ok(()) => println!("installer-test: ok   {name}"),
            Err(e) => {
                failed += 1;
                println!("installer-test: FAIL {name}: {e}");
            }
        }
    }
    // Without --skip-kvm-check, a machine whose KVM cannot run Accordion is refused, unchanged.
    // (On an ARM64 host that qualifies, `accordion check` passes and there is nothing to refuse.)
    let qualifies = installer_command(&installer)
        .arg("check")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qualifies {
        cases += 1;
        match refused_without_kvm(&installer, &scratch) {
            Ok(()) => println!("installer-test: ok   a host without ARM64 KVM is refused"),
            Err(e) => {
                failed += 1;
                println!("installer-test: FAIL a host without ARM64 KVM is refused: {e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "installer-test: {} passed, {failed} failed in {:.1} s",
        cases - failed,
        t0.elapsed().as_secs_f64()
    );
    Ok(i32::from(failed > 0))
}
