//! `accordion install` / `accordion uninstall`: put Accordion on a node (its binaries and guest
//! assets in /opt/accordion, /etc/accordion/config.toml, the runtime in containerd's config, the
//! node label), and take every bit of it away again.
//!
//! The chart's DaemonSet runs it with the host's root at `--root /host`; by hand it runs with the
//! default root `/`. Everything is checked before anything is written (so a refused install
//! changes nothing), every change is recorded first (manifest.rs), and installing again changes
//! nothing that is already right.

pub mod containerd;
pub mod kube;
pub mod manifest;
pub mod systemd;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use crate::config::Config;
use containerd::ContainerdError;
use manifest::{under, ManifestError, NodeLabel, Recorder};

/// Where the installed files live on the host.
pub const PREFIX: &str = "/opt/accordion";
/// Accordion's configuration on the host.
pub const CONFIG_PATH: &str = crate::config::DEFAULT_PATH;
/// The binaries an install carries, as named in `<source>/bin` and `/opt/accordion/bin`.
pub const BINARIES: [&str; 2] = ["accordion", "containerd-shim-accordion-v2"];
/// The guest assets, in `<source>/share/guest` and `/opt/accordion/share/guest`.
pub const GUEST_ASSETS: [&str; 2] = ["Image", "agent-initrd.cpio"];
/// Where containerd (and operators) find the binaries: containerd resolves runtime type
/// io.containerd.accordion.v2 to `containerd-shim-accordion-v2` on its PATH.
const LINK_DIR: &str = "/usr/local/bin";
const CONTAINERD_UNIT: &str = "containerd.service";

/// Errors of install and uninstall.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
    #[error(transparent)]
    Kube(#[from] kube::KubeError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("The install source {0} lacks {1} (expected <source>/bin/{{accordion,containerd-shim-accordion-v2}} and <source>/share/guest/{{Image,agent-initrd.cpio}})")]
    Source(PathBuf, String),
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error(
        "This host cannot run Accordion: {0}. Accordion needs an ARM64 host whose KVM has an \
         in-kernel GICv3 and the SMCCC filter (Linux >= 6.4); `accordion check` shows the details"
    )]
    Unsuitable(String),
    #[error(
        "virtiofsd is not at {0} on the host (the shim runs it for every pod): install Debian's \
         virtiofsd package, or set [virtiofsd] path in the config"
    )]
    Virtiofsd(PathBuf),
    #[error("{0} in the Accordion config does not exist on the host")]
    GuestAsset(PathBuf),
    #[error("Invalid --node-label {0:?}: not a Kubernetes label key")]
    LabelKey(String),
    #[error("--node-label needs the node's name: set NODE_NAME (the chart passes spec.nodeName) or --node-name")]
    NoNodeName,
    #[error("Invalid node name {0:?}")]
    NodeName(String),
    #[error("Invalid --containerd-version {0:?}: auto, 1 or 2")]
    ContainerdVersion(String),
    #[error("Cannot wait for a signal: {0}")]
    Signal(nix::Error),
}

/// How containerd gets restarted after its config changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Restart {
    /// containerd.service, through systemd's D-Bus API on the host's system bus.
    Systemd,
    /// Not at all: the operator restarts containerd (e.g. `systemctl restart containerd`).
    None,
}

/// `accordion install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The host's root directory (the chart mounts it at /host).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Where the files to install are (bin/, share/guest/); default: the directory above this
    /// binary's own (/accordion in the installer image).
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// An Accordion config.toml to install as /etc/accordion/config.toml (checked first); without
    /// it an existing file is kept, and a missing one is written with the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// containerd's main config file on the host.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
    /// containerd's major version: auto (the config's `version`, else the host's containerd
    /// binary), 1 or 2. Only matters when the config file does not exist.
    #[arg(long, default_value = "auto")]
    pub containerd_version: String,
    /// How containerd is restarted once its config changed.
    #[arg(long, value_enum, default_value = "systemd")]
    pub restart: Restart,
    /// Label this node with KEY=true once installed (needs NODE_NAME and the pod's service account).
    #[arg(long, value_name = "KEY")]
    pub node_label: Option<String>,
    /// The node's name (default: $NODE_NAME).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Skip the KVM checks (preparing a root for another machine, tests).
    #[arg(long)]
    pub skip_kvm_check: bool,
    /// Only check that a complete install is in place (exit 0) or not (exit 1); the chart's
    /// readiness probe.
    #[arg(long)]
    pub check: bool,
    /// Once installed, stay running until SIGTERM/SIGINT (the chart's DaemonSet).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: uninstall when the signal comes.
    #[arg(long, requires = "wait")]
    pub uninstall_on_exit: bool,
}

/// `accordion uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The host's root directory.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// How containerd is restarted once its config is back.
    #[arg(long, value_enum, default_value = "systemd")]
    pub restart: Restart,
}

/// What an install will do, decided and checked before anything is written.
struct Plan {
    files: Vec<(PathBuf, Vec<u8>, u32)>,
    links: Vec<(PathBuf, PathBuf)>,
    config: Option<Vec<u8>>,
    main: containerd::MainConfig,
    main_text: Option<String>,
    dropin: PathBuf,
    dropin_text: String,
    label: Option<NodeLabel>,
}

fn say(msg: &str) {
    println!("accordion install: {msg}");
}

/// The default source: the directory above the running binary's directory.
fn default_source() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(PREFIX))
}

fn read(path: &Path) -> Result<Vec<u8>, InstallError> {
    fs::read(path).map_err(|e| InstallError::Read(path.to_path_buf(), e))
}

fn major_flag(s: &str) -> Result<Option<u8>, InstallError> {
    match s {
        "auto" => Ok(None),
        "1" => Ok(Some(1)),
        "2" => Ok(Some(2)),
        other => Err(InstallError::ContainerdVersion(other.to_string())),
    }
}

/// The host's containerd binary, run inside the host root (chroot) so its own libraries are used.
struct HostBinary<'a> {
    root: &'a Path,
}

impl HostBinary<'_> {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let bin = ["usr/bin", "usr/local/bin", "usr/sbin", "bin"]
            .iter()
            .map(|d| Path::new("/").join(d).join("containerd"))
            .find(|p| under(self.root, p).is_file())
            .ok_or_else(|| {
                "no containerd binary in /usr/bin, /usr/local/bin, /usr/sbin or /bin".to_string()
            })?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(args).stdin(std::process::Stdio::null());
        if self.root != Path::new("/") {
            let root = self.root.to_path_buf();
            // SAFETY: between fork and exec only async-signal-safe calls (chroot, chdir) run.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    nix::unistd::chroot(&root).map_err(std::io::Error::from)?;
                    nix::unistd::chdir("/").map_err(std::io::Error::from)
                });
            }
        }
        let what = format!("{} {}", bin.display(), args.join(" "));
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl containerd::HostContainerd for HostBinary<'_> {
    fn major(&self) -> Result<u8, String> {
        let text = self.run(&["--version"])?;
        containerd::parse_version_output(&text)
            .ok_or_else(|| format!("no version in `containerd --version`: {:?}", text.trim()))
    }

    fn default_config(&self) -> Result<String, String> {
        self.run(&["config", "default"])
    }
}

/// The default /etc/accordion/config.toml of a fresh install (docs/configuration.md has every key).
const DEFAULT_CONFIG: &str =
    "# Written by `accordion install`; every key is in docs/configuration.md.\n\
[vcpus]\ndefault = 1\nmin = 1\nmax = 8\n\n[memory]\ndefault_mib = 512\n";

fn kvm_check() -> Result<(), InstallError> {
    let report =
        accordion_vmm::platform::probe().map_err(|e| InstallError::Unsuitable(e.to_string()))?;
    let missing = report.missing();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(InstallError::Unsuitable(format!(
            "missing {}",
            missing.join(", ")
        )))
    }
}

fn plan(args: &InstallArgs) -> Result<Plan, InstallError> {
    let root = &args.root;
    let source = args.source.clone().unwrap_or_else(default_source);
    let prefix = Path::new(PREFIX);
    let mut files = Vec::new();
    let mut links = Vec::new();
    for name in BINARIES {
        let from = source.join("bin").join(name);
        if !from.is_file() {
            return Err(InstallError::Source(source, format!("bin/{name}")));
        }
        let to = prefix.join("bin").join(name);
        links.push((Path::new(LINK_DIR).join(name), to.clone()));
        files.push((to, read(&from)?, 0o755));
    }
    for name in GUEST_ASSETS {
        let from = source.join("share/guest").join(name);
        if !from.is_file() {
            return Err(InstallError::Source(source, format!("share/guest/{name}")));
        }
        files.push((prefix.join("share/guest").join(name), read(&from)?, 0o644));
    }

    // The config that will be in force: the given one, the host's, or the defaults.
    let config_host = Path::new(CONFIG_PATH);
    let (config, effective) = match &args.config {
        Some(p) => {
            let bytes = read(p)?;
            (Some(bytes.clone()), (p.clone(), bytes))
        }
        None => match fs::read(under(root, config_host)) {
            Ok(bytes) => (None, (config_host.to_path_buf(), bytes)),
            Err(_) => (
                Some(DEFAULT_CONFIG.as_bytes().to_vec()),
                (
                    config_host.to_path_buf(),
                    DEFAULT_CONFIG.as_bytes().to_vec(),
                ),
            ),
        },
    };
    let cfg = Config::parse(&effective.0, &String::from_utf8_lossy(&effective.1))?;
    let installed: Vec<&PathBuf> = files.iter().map(|(p, _, _)| p).collect();
    for asset in [&cfg.guest.kernel, &cfg.guest.initrd] {
        if !installed.contains(&asset) && !under(root, asset).is_file() {
            return Err(InstallError::GuestAsset(asset.clone()));
        }
    }
    if !under(root, &cfg.virtiofsd.path).is_file() {
        return Err(InstallError::Virtiofsd(cfg.virtiofsd.path.clone()));
    }

    let main = containerd::load_main(
        root,
        &args.containerd_config,
        major_flag(&args.containerd_version)?,
        &HostBinary { root },
    )?;
    let dropin = args
        .containerd_config
        .parent()
        .unwrap_or(Path::new("/etc/containerd"))
        .join("conf.d/accordion.toml");
    let main_text = containerd::with_import(&main, &dropin)?;
    let dropin_text = containerd::dropin_text(root, &main, &dropin)?;

    let label = match &args.node_label {
        None => None,
        Some(key) => {
            if !kube::valid_label_key(key) {
                return Err(InstallError::LabelKey(key.clone()));
            }
            let node = args
                .node_name
                .clone()
                .or_else(|| std::env::var("NODE_NAME").ok())
                .filter(|n| !n.is_empty())
                .ok_or(InstallError::NoNodeName)?;
            if !kube::valid_node_name(&node) {
                return Err(InstallError::NodeName(node));
            }
            Some(NodeLabel {
                node,
                key: key.clone(),
            })
        }
    };
    Ok(Plan {
        files,
        links,
        config,
        main,
        main_text,
        dropin,
        dropin_text,
        label,
    })
}

fn restart(root: &Path, how: Restart) -> Result<(), InstallError> {
    match how {
        Restart::Systemd => {
            let t = Instant::now();
            systemd::restart(root, CONTAINERD_UNIT, Duration::from_secs(120))?;
            say(&format!(
                "restarted {CONTAINERD_UNIT} in {:.1} s",
                t.elapsed().as_secs_f64()
            ));
        }
        Restart::None => say("containerd was not restarted (--restart none): restart it to apply"),
    }
    Ok(())
}

/// The permission bits of the file at `path`, or 0644 for a file that does not exist yet: an
/// edited containerd config keeps its mode.
fn mode_or_default(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(0o644)
}

/// Runs the install; returns the process exit status.
pub fn install(args: &InstallArgs) -> Result<(), InstallError> {
    let t0 = Instant::now();
    let plan = plan(args)?;
    if !args.skip_kvm_check {
        kvm_check()?;
    }
    let root = &args.root;
    let mut rec = Recorder::open(root)?;
    rec.manifest.complete = false;
    rec.save()?;
    for (path, bytes, mode) in &plan.files {
        rec.write(path, bytes, *mode, false)?;
    }
    for (link, target) in &plan.links {
        rec.symlink(link, target)?;
    }
    if let Some(bytes) = &plan.config {
        rec.write(Path::new(CONFIG_PATH), bytes, 0o644, false)?;
    }
    say(&format!(
        "files in {PREFIX}, links in {LINK_DIR}, {CONFIG_PATH}"
    ));
    rec.write(&plan.dropin, plan.dropin_text.as_bytes(), 0o644, false)?;
    let main_path = plan.main.path.clone();
    if let Some(text) = &plan.main_text {
        let mode = mode_or_default(&rec.host(&main_path));
        rec.write(&main_path, text.as_bytes(), mode, true)?;
    }
    rec.manifest.containerd_config = Some(main_path.clone());
    rec.manifest.dropin = Some(plan.dropin.clone());
    rec.save()?;
    say(&format!(
        "runtime {} ({}) in {} (schema {}), imported by {}",
        containerd::RUNTIME_NAME,
        containerd::RUNTIME_TYPE,
        plan.dropin.display(),
        plan.main.schema.number(),
        main_path.display()
    ));
    restart(root, args.restart)?;
    if let Some(label) = &plan.label {
        kube::Api::in_cluster(&label.node)?.label(&label.node, &label.key, Some("true"))?;
        rec.manifest.node_label = Some(label.clone());
        say(&format!("labelled node {} {}=true", label.node, label.key));
    }
    rec.manifest.complete = true;
    rec.save()?;
    say(&format!("done in {:.1} s", t0.elapsed().as_secs_f64()));
    Ok(())
}

/// `install --check`: a complete install whose files are all in place.
pub fn check(root: &Path) -> Result<(), String> {
    if !Recorder::exists(root) {
        return Err(format!("not installed under {}", root.display()));
    }
    let rec = Recorder::open(root).map_err(|e| e.to_string())?;
    if !rec.manifest.complete {
        return Err("an install is incomplete (in progress, or it failed)".into());
    }
    let mut want: Vec<PathBuf> = BINARIES
        .iter()
        .map(|b| Path::new(PREFIX).join("bin").join(b))
        .chain(
            GUEST_ASSETS
                .iter()
                .map(|a| Path::new(PREFIX).join("share/guest").join(a)),
        )
        .collect();
    want.extend(rec.manifest.dropin.clone());
    for p in want {
        if !rec.host(&p).is_file() {
            return Err(format!("{} is missing", p.display()));
        }
    }
    Ok(())
}

/// Runs the uninstall.
pub fn uninstall(args: &UninstallArgs) -> Result<(), InstallError> {
    let say = |m: &str| println!("accordion uninstall: {m}");
    let root = &args.root;
    if !Recorder::exists(root) {
        say(&format!(
            "nothing installed under {} (no {})",
            root.display(),
            manifest::MANIFEST_PATH
        ));
        return Ok(());
    }
    let rec = Recorder::open(root)?;
    if let Some(label) = &rec.manifest.node_label {
        // The label goes first: no new pod is scheduled here while the runtime goes away.
        match kube::Api::in_cluster(&label.node)
            .and_then(|api| api.label(&label.node, &label.key, None))
        {
            Ok(()) => say(&format!(
                "removed label {} from node {}",
                label.key, label.node
            )),
            Err(e) => say(&format!("warning: {e}; remove the label by hand")),
        }
    }
    for entry in rec.manifest.entries.iter().rev() {
        let main = rec.manifest.containerd_config.as_ref() == Some(&entry.path);
        let now = fs::read(rec.host(&entry.path)).ok();
        if main && Recorder::written(entry).is_some() && now != Recorder::written(entry) {
            // containerd's config changed since the install: keep those changes, take out
            // only our import.
            if let (Some(now), Some(dropin)) = (now, &rec.manifest.dropin) {
                let text = containerd::without_import(
                    &entry.path,
                    &String::from_utf8_lossy(&now),
                    dropin,
                )?;
                let mode = mode_or_default(&rec.host(&entry.path));
                manifest::write_atomic(&rec.host(&entry.path), text.as_bytes(), mode)?;
                say(&format!(
                    "{} changed after the install: removed only accordion's import from it",
                    entry.path.display()
                ));
            }
            continue;
        }
        rec.restore(entry)?;
    }
    rec.remove()?;
    for kept in rec.remove_created_dirs() {
        say(&format!(
            "warning: kept {} (other files are in it)",
            kept.display()
        ));
    }
    say("files removed, containerd's config restored");
    restart(root, args.restart)?;
    Ok(())
}

/// `install --wait`: blocks until SIGTERM or SIGINT.
pub fn wait_for_signal() -> Result<nix::sys::signal::Signal, InstallError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(InstallError::Signal)?;
    set.wait().map_err(InstallError::Signal)
}

#[cfg(test)]
mod tests;
