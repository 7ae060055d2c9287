//! `accordion install` / `uninstall` on a node with real containerd 1.7, run the way the Helm
//! chart's DaemonSet runs it: the installer image (`make image`, here built from the node's
//! binaries) in a privileged container with the node's root at /host (`cargo xtask node-test
//! --containerd`).
//!
//! The node comes with Accordion already registered in containerd; the test first takes it away
//! (shim off PATH, runtime out of containerd's config, no /etc/accordion) and puts everything back
//! at the end, whatever happens in between.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use accordion_tests::containerd::{
    containerd_ready, ctr, leftovers, restart_containerd, wait_for, RUNTIME, TEST_IMAGE,
};
use accordion_tests::{assert_code, can_run, one_vm, text};

const ARCHIVE: &str = "/opt/accordion-installer/accordion-installer.oci.tar";
const SHIM_LINK: &str = "/usr/local/bin/containerd-shim-accordion-v2";
const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const ACCORDION_CONFIG: &str = "/etc/accordion/config.toml";
const SAVED: &str = "/run/accordion-install-test";

/// The node as the test found it, put back on drop (also when an assertion fails).
struct NodeState {
    containerd_config: Vec<u8>,
}

impl NodeState {
    /// Takes Accordion out of the node: the shim off containerd's PATH, the `accordion` runtime
    /// out of containerd's config, /etc/accordion/config.toml aside; containerd restarted.
    fn strip() -> Self {
        std::fs::create_dir_all(SAVED).expect("mkdir");
        let containerd_config = std::fs::read(CONTAINERD_CONFIG).expect("read containerd config");
        // From here on, a panic puts the node back (drop).
        let state = Self { containerd_config };
        move_file(SHIM_LINK, &format!("{SAVED}/shim")).expect("move the shim away");
        move_file(ACCORDION_CONFIG, &format!("{SAVED}/config.toml")).expect("move config");
        let pristine: String = String::from_utf8_lossy(&state.containerd_config)
            .lines()
            .filter(|l| {
                !l.contains("runtimes.accordion]")
                    && !l.contains(RUNTIME)
                    && !l.contains("accordion.dev/")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!pristine.contains("accordion"), "{pristine}");
        std::fs::write(CONTAINERD_CONFIG, pristine).expect("write containerd config");
        restart_containerd();
        state
    }
}

/// rename(2), or copy and remove across filesystems (/run is a tmpfs).
fn move_file(from: &str, to: &str) -> std::io::Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)?;
    std::fs::remove_file(from)
}

impl Drop for NodeState {
    fn drop(&mut self) {
        // Whatever an install left (a failed test), then the node's own files.
        let _ = Command::new("accordion")
            .args(["uninstall", "--restart", "none"])
            .output();
        let _ = move_file(&format!("{SAVED}/shim"), SHIM_LINK);
        let _ = std::fs::create_dir_all("/etc/accordion");
        let _ = move_file(&format!("{SAVED}/config.toml"), ACCORDION_CONFIG);
        let _ = std::fs::write(CONTAINERD_CONFIG, &self.containerd_config);
        let _ = std::fs::remove_dir_all(SAVED);
        restart_containerd();
    }
}

/// Every file under the directories an install touches: path → bytes (symlinks as their target).
fn files_under(dirs: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap_or_default();
                out.push((p, t.to_string_lossy().as_bytes().to_vec()));
            } else if m.is_dir() {
                out.push((p.clone(), Vec::new()));
                walk(&p, out);
            } else if p.starts_with("/opt/accordion/tests") {
                // The test binaries themselves: present, not compared byte for byte (large).
                out.push((p, m.len().to_le_bytes().to_vec()));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(Path::new(d), &mut out);
    }
    out.sort();
    out
}

const WATCHED: [&str; 4] = [
    "/etc/containerd",
    "/etc/accordion",
    "/opt/accordion",
    "/usr/local/bin",
];

/// Runs the installer image like the DaemonSet does: privileged, the node's root at /host.
fn installer(name: &str, args: &[&str]) -> Output {
    let mut cmd = vec![
        "run",
        "--rm",
        "--privileged",
        "--mount",
        "type=bind,src=/,dst=/host,options=rbind:rw",
        "localhost/accordion-installer:0.1.0",
        name,
        "/accordion/bin/accordion",
    ];
    cmd.extend_from_slice(args);
    ctr(&cmd)
}

/// `accordion-cri runp` of a pod with runtime handler `accordion`, stopped and removed again.
fn cri_pod_runs(name: &str) -> Result<(), String> {
    let config = format!("/tmp/install-pod-{name}.json");
    let pod = serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 1},
        "log_directory": format!("/tmp/pods/{name}"),
    });
    std::fs::write(&config, pod.to_string()).expect("write pod config");
    let out = Command::new("accordion-cri")
        .args(["runp", "--runtime", "accordion", &config])
        .stdin(Stdio::null())
        .output()
        .expect("run accordion-cri");
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    let id = text(&out.stdout).trim().to_string();
    for verb in ["stopp", "rmp"] {
        let out = Command::new("accordion-cri")
            .args([verb, &id])
            .output()
            .expect("run accordion-cri");
        assert_code(&out, 0);
    }
    Ok(())
}

#[test]
fn test_install_from_the_image_runs_pods_and_uninstall_restores_every_byte() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let _vm = one_vm();
    let out = ctr(&["images", "import", ARCHIVE]);
    assert_code(&out, 0);
    let state = NodeState::strip();

    // Not installed: neither CRI nor ctr can use the runtime.
    let err = cri_pod_runs("before").expect_err("no accordion runtime before the install");
    assert!(err.contains("accordion"), "{err}");
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "before",
        "true",
    ]);
    assert!(!out.status.success(), "the shim is not on PATH yet");
    let before = files_under(&WATCHED);

    // Install from the image (the DaemonSet's command, but containerd restarted by the test:
    // the node has no systemd).
    let install = [
        "install",
        "--root",
        "/host",
        "--source",
        "/accordion",
        "--restart",
        "none",
    ];
    let out = installer("install-1", &install);
    assert_code(&out, 0);
    let log = text(&out.stdout);
    assert!(
        log.contains("runtime accordion (io.containerd.accordion.v2)"),
        "{log}"
    );
    restart_containerd();
    let once = files_under(&WATCHED);
    for added in [
        "/opt/accordion/bin/containerd-shim-accordion-v2",
        "/opt/accordion/install-manifest.json",
        "/etc/containerd/conf.d/accordion.toml",
        "/etc/accordion/config.toml",
        SHIM_LINK,
    ] {
        assert!(
            once.iter().any(|(p, _)| p == Path::new(added))
                && !before.iter().any(|(p, _)| p == Path::new(added)),
            "the install did not add {added}"
        );
    }
    let out = Command::new("accordion")
        .args(["install", "--check"])
        .output()
        .expect("accordion install --check");
    assert_code(&out, 0);

    // The containerd 1.7 drop-in kept the node's CRI settings (the pause image, runc's binary).
    let dump = Command::new("containerd")
        .args(["--config", CONTAINERD_CONFIG, "config", "dump"])
        .output()
        .expect("containerd config dump");
    assert_code(&dump, 0);
    let dump = text(&dump.stdout);
    assert!(
        dump.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.accordion]"),
        "{dump}"
    );
    assert!(dump.contains("BinaryName = \"/usr/sbin/runc\""), "{dump}");
    assert!(
        dump.contains("sandbox_image = \"registry.k8s.io/pause:3.8\""),
        "{dump}"
    );

    // Installed: a container through ctr, and a pod through CRI with handler `accordion`.
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        TEST_IMAGE,
        "installed",
        "sh",
        "-c",
        "uname -m; exit 5",
    ]);
    assert_code(&out, 5);
    assert_eq!(text(&out.stdout).trim(), "aarch64");
    cri_pod_runs("after").expect("a pod with runtime handler accordion after the install");

    // Installing again changes nothing.
    let out = installer("install-2", &install);
    assert_code(&out, 0);
    assert!(
        files_under(&WATCHED) == once,
        "a second install changed files"
    );

    // Uninstall: containerd's config is back byte for byte, and every added file is gone.
    let out = installer(
        "uninstall",
        &["uninstall", "--root", "/host", "--restart", "none"],
    );
    assert_code(&out, 0);
    restart_containerd();
    let after = files_under(&WATCHED);
    let changed: Vec<_> = after
        .iter()
        .filter(|f| !before.contains(f))
        .map(|f| f.0.display().to_string())
        .chain(
            before
                .iter()
                .filter(|f| !after.contains(f))
                .map(|f| format!("missing {}", f.0.display())),
        )
        .collect();
    assert!(
        changed.is_empty(),
        "uninstall left differences: {changed:?}"
    );
    let err = cri_pod_runs("uninstalled").expect_err("no accordion runtime after uninstall");
    assert!(err.contains("accordion"), "{err}");
    let left = wait_for(Duration::from_secs(30), || {
        let l = leftovers();
        l.is_empty().then_some(()).ok_or(l)
    });
    assert!(left.is_ok(), "left behind: {left:?}");
    drop(state);
}

#[test]
fn test_installer_refuses_bad_input_and_changes_nothing() {
    if !can_run() || !containerd_ready() {
        return;
    }
    let before = files_under(&WATCHED);
    let install = |extra: &[&str]| {
        let out = Command::new("accordion")
            .args(["install", "--restart", "none"])
            .args(extra)
            .output()
            .expect("accordion install");
        assert_code(&out, 1);
        text(&out.stderr)
    };
    // A source without the image's files.
    let err = install(&["--source", "/nonexistent"]);
    assert!(err.contains("/nonexistent lacks bin/accordion"), "{err}");

    // A complete source (the node's own files), but a config value out of range.
    let src = Path::new("/tmp/install-src");
    for (link, target) in [
        ("bin/accordion", "/usr/local/bin/accordion"),
        ("bin/containerd-shim-accordion-v2", SHIM_LINK),
        ("share/guest/Image", "/opt/accordion/share/guest/Image"),
        (
            "share/guest/agent-initrd.cpio",
            "/opt/accordion/share/guest/agent-initrd.cpio",
        ),
    ] {
        let p = src.join(link);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).expect("symlink");
    }
    std::fs::write("/tmp/bad-accordion.toml", "[vcpus]\nmax = 9999\n").expect("write");
    let err = install(&[
        "--source",
        "/tmp/install-src",
        "--config",
        "/tmp/bad-accordion.toml",
    ]);
    assert!(err.contains("vcpus.max"), "{err}");

    // A containerd config of schema 1.
    std::fs::write(
        "/tmp/containerd-v1.toml",
        "[plugins.cri]\n  sandbox_image = \"x\"\n",
    )
    .expect("write");
    let err = install(&[
        "--source",
        "/tmp/install-src",
        "--containerd-config",
        "/tmp/containerd-v1.toml",
    ]);
    assert!(err.contains("version 1 containerd config"), "{err}");

    assert!(
        files_under(&WATCHED) == before,
        "a refused install changed files"
    );
    let _ = std::fs::remove_dir_all(src);
}
