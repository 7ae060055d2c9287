//! Install and uninstall against temporary roots holding real containerd configs
//! (testdata/: `containerd config default` of Debian's 1.7.24 and 2.1.9, and kubeadm-style custom
//! ones). containerd itself loading the results is checked by xtask/tests/installer.rs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use super::*;

const V17_DEFAULT: &str = include_str!("testdata/containerd-1.7-default.toml");
const V17_CUSTOM: &str = include_str!("testdata/containerd-1.7-custom.toml");
const V17_CONFD: &str = include_str!("testdata/containerd-1.7-conf.d-mirror.toml");
const V21_DEFAULT: &str = include_str!("testdata/containerd-2.1-default.toml");
const V21_CUSTOM: &str = include_str!("testdata/containerd-2.1-custom.toml");
const V21_EXTRA: &str = include_str!("testdata/containerd-2.1-extra.toml");

/// Everything under a root: path → (mode, bytes or link target).
type Snapshot = BTreeMap<PathBuf, (u32, Vec<u8>)>;

fn snapshot(root: &Path) -> Snapshot {
    fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.insert(rel, (0, t.to_string_lossy().as_bytes().to_vec()));
            } else if m.is_dir() {
                out.insert(rel, (m.permissions().mode(), Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (m.permissions().mode(), fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Snapshot::new();
    walk(root, root, &mut out);
    out
}

struct Host {
    dir: PathBuf,
}

impl Host {
    /// A scratch dir holding `root/` (the host: virtiofsd, containerd's config files) and
    /// `src/` (what the installer image carries).
    fn new(name: &str, files: &[(&str, &str)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("accordion-install-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("root");
        fs::create_dir_all(root.join("usr/libexec")).unwrap();
        fs::write(root.join("usr/libexec/virtiofsd"), "#!/bin/sh\n").unwrap();
        for (path, text) in files {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        for b in BINARIES {
            let p = dir.join("src/bin").join(b);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("binary {b}")).unwrap();
        }
        for a in GUEST_ASSETS {
            let p = dir.join("src/share/guest").join(a);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("asset {a}")).unwrap();
        }
        Self { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn args(&self) -> InstallArgs {
        InstallArgs {
            root: self.root(),
            source: Some(self.dir.join("src")),
            config: None,
            containerd_config: PathBuf::from("/etc/containerd/config.toml"),
            containerd_version: "auto".into(),
            restart: Restart::None,
            node_label: None,
            node_name: None,
            skip_kvm_check: true,
            check: false,
            wait: false,
            uninstall_on_exit: false,
        }
    }

    fn uninstall(&self) {
        uninstall(&UninstallArgs {
            root: self.root(),
            restart: Restart::None,
        })
        .unwrap();
    }

    fn read(&self, path: &str) -> String {
        fs::read_to_string(self.root().join(path)).unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Install, install again (nothing changes), uninstall (the root is back byte for byte).
fn round_trip(host: &Host, args: &InstallArgs) -> Snapshot {
    let before = snapshot(&host.root());
    install(args).unwrap();
    let once = snapshot(&host.root());
    assert!(check(&host.root()).is_ok());
    install(args).unwrap();
    assert_eq!(
        snapshot(&host.root()),
        once,
        "a second install changed something"
    );
    host.uninstall();
    assert_eq!(
        snapshot(&host.root()),
        before,
        "uninstall did not restore the root"
    );
    assert!(check(&host.root()).is_err());
    // Uninstalling again is a no-op.
    host.uninstall();
    once
}

fn dropin(host: &Host) -> toml::Table {
    host.read("etc/containerd/conf.d/accordion.toml")
        .parse()
        .unwrap()
}

#[test]
fn test_containerd_1_7_default_config_round_trip() {
    let host = Host::new("v17", &[("etc/containerd/config.toml", V17_DEFAULT)]);
    let before = host.read("etc/containerd/config.toml");
    let args = host.args();
    install(&args).unwrap();
    let main: toml::Table = host.read("etc/containerd/config.toml").parse().unwrap();
    assert_eq!(
        main["imports"].as_array().unwrap()[0].as_str(),
        Some("/etc/containerd/conf.d/accordion.toml")
    );
    // Only the imports line changed.
    let after = host.read("etc/containerd/config.toml");
    let changed: Vec<_> = before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    let d = dropin(&host);
    let runtimes = &d["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(
        runtimes["accordion"]["runtime_type"].as_str(),
        Some(containerd::RUNTIME_TYPE)
    );
    assert!(
        runtimes.get("runc").is_some(),
        "the CRI section's runc is carried over"
    );
    assert_eq!(
        fs::read_link(
            host.root()
                .join("usr/local/bin/containerd-shim-accordion-v2")
        )
        .unwrap(),
        Path::new("/opt/accordion/bin/containerd-shim-accordion-v2")
    );
    assert_eq!(host.read("opt/accordion/bin/accordion"), "binary accordion");
    let mode = fs::metadata(
        host.root()
            .join("opt/accordion/bin/containerd-shim-accordion-v2"),
    )
    .unwrap()
    .permissions()
    .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(host.read("etc/accordion/config.toml").contains("[vcpus]"));
    host.uninstall();
    assert_eq!(host.read("etc/containerd/config.toml"), before);
    round_trip(&host, &args);
}

#[test]
fn test_containerd_1_7_custom_config_with_imports_round_trip() {
    let host = Host::new(
        "v17c",
        &[
            ("etc/containerd/config.toml", V17_CUSTOM),
            ("etc/containerd/conf.d/mirror.toml", V17_CONFD),
        ],
    );
    let once = round_trip(&host, &host.args());
    // conf.d/*.toml already loads the drop-in: the main config is untouched.
    let main = once.get(Path::new("etc/containerd/config.toml")).unwrap();
    assert_eq!(main.1, V17_CUSTOM.as_bytes());
    let d = once
        .get(Path::new("etc/containerd/conf.d/accordion.toml"))
        .unwrap();
    let d: toml::Table = String::from_utf8_lossy(&d.1).parse().unwrap();
    let cri = &d["plugins"]["io.containerd.grpc.v1.cri"];
    assert_eq!(
        cri["sandbox_image"].as_str(),
        Some("registry.k8s.io/pause:3.10")
    );
    assert_eq!(
        cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
        Some(true)
    );
    assert!(cri["containerd"]["runtimes"].get("runsc").is_some());
    assert_eq!(
        cri["registry"]["config_path"].as_str(),
        Some("/etc/containerd/certs.d")
    );
}

#[test]
fn test_containerd_2_default_and_custom_configs_round_trip() {
    let host = Host::new("v21", &[("etc/containerd/config.toml", V21_DEFAULT)]);
    round_trip(&host, &host.args());
    let host = Host::new(
        "v21c",
        &[
            ("etc/containerd/config.toml", V21_CUSTOM),
            ("etc/containerd/extra.toml", V21_EXTRA),
        ],
    );
    let args = host.args();
    install(&args).unwrap();
    let main: toml::Table = host.read("etc/containerd/config.toml").parse().unwrap();
    assert_eq!(
        main["imports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>(),
        [
            "/etc/containerd/extra.toml",
            "/etc/containerd/conf.d/accordion.toml"
        ]
    );
    let d = dropin(&host);
    assert_eq!(d["version"].as_integer(), Some(3));
    assert_eq!(d["plugins"].as_table().unwrap().len(), 1);
    host.uninstall();
    round_trip(&host, &args);
}

#[test]
fn test_no_containerd_config_is_created_then_removed() {
    let host = Host::new("none2", &[]);
    let mut args = host.args();
    args.containerd_version = "2".into();
    install(&args).unwrap();
    let main: toml::Table = host.read("etc/containerd/config.toml").parse().unwrap();
    assert_eq!(main["version"].as_integer(), Some(3));
    host.uninstall();
    assert!(!host.root().join("etc/containerd").exists());
    round_trip(&host, &args);
}

#[test]
fn test_no_containerd_1_config_and_no_binary_for_its_defaults_is_refused() {
    // containerd 1.x replaces the built-in CRI section with the drop-in's: without `containerd
    // config default` to copy from, installing would lose runc. (xtask installer-test runs this
    // with a real containerd in the root.)
    let host = Host::new("none1", &[]);
    let mut args = host.args();
    args.containerd_version = "1".into();
    let before = snapshot(&host.root());
    let err = install(&args).unwrap_err().to_string();
    assert!(
        err.contains("containerd config default > /etc/containerd/config.toml"),
        "{err}"
    );
    assert_eq!(snapshot(&host.root()), before);
}

#[test]
fn test_no_config_and_no_containerd_binary_asks_for_the_version() {
    let host = Host::new("nobin", &[]);
    let before = snapshot(&host.root());
    let err = install(&host.args()).unwrap_err().to_string();
    assert!(err.contains("--containerd-version"), "{err}");
    assert_eq!(snapshot(&host.root()), before);
}

#[test]
fn test_given_config_is_installed_and_a_bad_one_changes_nothing() {
    let host = Host::new("cfg", &[("etc/containerd/config.toml", V21_DEFAULT)]);
    let cfg = host.dir.join("chart-config.toml");
    fs::write(&cfg, "[vcpus]\ndefault = 2\nmax = 16\n").unwrap();
    let mut args = host.args();
    args.config = Some(cfg.clone());
    install(&args).unwrap();
    assert_eq!(
        host.read("etc/accordion/config.toml"),
        "[vcpus]\ndefault = 2\nmax = 16\n"
    );
    host.uninstall();

    let before = snapshot(&host.root());
    fs::write(&cfg, "[vcpus]\nbogus_key = 1\n").unwrap();
    let err = install(&args).unwrap_err().to_string();
    assert!(err.contains("bogus_key"), "{err}");
    assert_eq!(snapshot(&host.root()), before);
}

#[test]
fn test_a_host_config_is_kept_and_restored() {
    let mine = "# mine\n[memory]\ndefault_mib = 1024\n";
    let host = Host::new(
        "keep",
        &[
            ("etc/containerd/config.toml", V21_DEFAULT),
            ("etc/accordion/config.toml", mine),
        ],
    );
    round_trip(&host, &host.args());
    assert_eq!(host.read("etc/accordion/config.toml"), mine);
}

#[test]
fn test_missing_virtiofsd_or_source_refuses_and_changes_nothing() {
    let host = Host::new("novfs", &[("etc/containerd/config.toml", V21_DEFAULT)]);
    fs::remove_file(host.root().join("usr/libexec/virtiofsd")).unwrap();
    let before = snapshot(&host.root());
    let err = install(&host.args()).unwrap_err().to_string();
    assert!(
        err.contains("virtiofsd is not at /usr/libexec/virtiofsd"),
        "{err}"
    );
    assert_eq!(snapshot(&host.root()), before);

    let host = Host::new("nosrc", &[("etc/containerd/config.toml", V21_DEFAULT)]);
    fs::remove_file(host.dir.join("src/share/guest/Image")).unwrap();
    let err = install(&host.args()).unwrap_err().to_string();
    assert!(err.contains("share/guest/Image"), "{err}");
}

#[test]
fn test_bad_label_or_missing_node_name_refuses() {
    let host = Host::new("label", &[("etc/containerd/config.toml", V21_DEFAULT)]);
    let mut args = host.args();
    args.node_label = Some("Not A Key".into());
    assert!(install(&args)
        .unwrap_err()
        .to_string()
        .contains("Not A Key"));
    args.node_label = Some("accordion.dev/installed".into());
    args.node_name = Some("../x".into());
    assert!(install(&args).unwrap_err().to_string().contains("../x"));
    assert!(!host.root().join("opt").exists());
}

#[test]
fn test_uninstall_after_the_operator_edited_containerd_config_keeps_the_edit() {
    let host = Host::new(
        "edited",
        &[
            ("etc/containerd/config.toml", V21_CUSTOM),
            ("etc/containerd/extra.toml", V21_EXTRA),
        ],
    );
    install(&host.args()).unwrap();
    let edited = format!(
        "{}\n[debug]\n  level = \"debug\"\n",
        host.read("etc/containerd/config.toml")
    );
    fs::write(host.root().join("etc/containerd/config.toml"), &edited).unwrap();
    host.uninstall();
    let now = host.read("etc/containerd/config.toml");
    assert!(now.contains("level = \"debug\""), "{now}");
    assert!(!now.contains("accordion"), "{now}");
    assert!(
        now.contains("imports = [\"/etc/containerd/extra.toml\"]"),
        "{now}"
    );
}

#[test]
fn test_check_reports_an_incomplete_install() {
    let host = Host::new("incomplete", &[("etc/containerd/config.toml", V21_DEFAULT)]);
    install(&host.args()).unwrap();
    fs::remove_file(host.root().join("opt/accordion/share/guest/Image")).unwrap();
    let err = check(&host.root()).unwrap_err();
    assert!(err.contains("Image is missing"), "{err}");
    host.uninstall();
}
