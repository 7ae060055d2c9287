//! `cargo xtask node --containerd[=1.7|2.1]`: Debian's containerd (trixie's 1.7 or sid's 2.1), runc
//! and CNI plugins in the node (scripts/containerd-node.sh builds the tree), their configuration, and
//! the start/stop script that wraps the node command. See README.md ("containerd in the node").

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::node::SHARE_DIR;
use crate::{root, XResult};

/// Accordion's runtime in CRI: the handler a RuntimeClass names.
pub const RUNTIME_NAME: &str = "accordion";
/// Its runtime type, also what `ctr run --runtime` takes.
pub const RUNTIME_TYPE: &str = "io.containerd.accordion.v2";
/// The shim binary containerd looks up on its PATH for RUNTIME_TYPE: `io.containerd.<name>.<version>`
/// runs `containerd-shim-<name>-<version>`. The node has it in /usr/local/bin with our other binaries.
pub const SHIM_BINARY: &str = "containerd-shim-accordion-v2";

/// The containerd a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Version {
    /// Debian trixie's containerd 1.7 (config schema 2, CRI plugin io.containerd.grpc.v1.cri).
    #[value(name = "1.7")]
    V1_7,
    /// Debian sid's containerd 2.1 (config schema 3, CRI split into io.containerd.cri.v1.*).
    #[value(name = "2.1")]
    V2_1,
}

impl Version {
    /// As written on the command line and in ACCORDION_CONTAINERD in the node.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1_7 => "1.7",
            Version::V2_1 => "2.1",
        }
    }

    fn suite(self) -> &'static str {
        match self {
            Version::V1_7 => "trixie",
            Version::V2_1 => "sid",
        }
    }

    /// The sandbox image name this containerd's CRI plugin expects by default.
    pub fn pause_image(self) -> &'static str {
        match self {
            Version::V1_7 => "registry.k8s.io/pause:3.8",
            Version::V2_1 => "registry.k8s.io/pause:3.10",
        }
    }
}

/// Runs scripts/containerd-node.sh (cached; progress on stderr) and returns the root to pack at /.
pub fn tree(version: Version) -> XResult<PathBuf> {
    let out = Command::new(root().join("scripts/containerd-node.sh"))
        .args(["--suite", version.suite()])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/containerd-node.sh: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("containerd-node: "))
        .filter(|_| out.status.success())
        .ok_or("scripts/containerd-node.sh failed")?;
    Ok(PathBuf::from(dir.trim()).join("root"))
}

/// /etc/containerd/config.toml for `version`: the CRI plugin with Debian's CNI plugin directory and
/// two runtimes: runc, the default (cgroupfs: the node has no systemd) and the peer of benchmarks,
/// and Accordion's shim, whose table is the one `accordion install` writes for that schema
/// (docs/install.md).
pub fn config_toml(version: Version) -> String {
    match version {
        Version::V1_7 => config_v2(version.pause_image()),
        Version::V2_1 => config_v3(version.pause_image()),
    }
}

/// containerd 1.x's version 2 schema.
fn config_v2(pause: &str) -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNTIME_NAME}]
      runtime_type = "{RUNTIME_TYPE}"
      pod_annotations = ["accordion.dev/*"]
"#
    )
}

/// containerd 2.x's version 3 schema: images (sandbox image, snapshotter) and runtime (CNI,
/// runtimes) are separate CRI plugins.
fn config_v3(pause: &str) -> String {
    format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{RUNTIME_NAME}]
      runtime_type = "{RUNTIME_TYPE}"
      pod_annotations = ["accordion.dev/*"]
"#
    )
}

/// /etc/accordion/config.toml (runtime/src/config.rs, docs/configuration.md): the guest kernel and
/// agent initramfs the node packs under SHARE_DIR, and sandboxes of 1 vCPU that can grow to 8, with
/// 512 MiB.
pub fn accordion_config_toml() -> String {
    format!(
        r#"# cargo xtask node --containerd (xtask/src/containerd.rs)
[guest]
kernel = "{SHARE_DIR}/guest/Image"
initrd = "{SHARE_DIR}/guest/agent-initrd.cpio"

[vcpus]
default = 1
min = 1
max = 8

[memory]
default_mib = 512
"#
    )
}

/// /etc/cni/net.d/10-accordion.conflist: a bridge with host-local IPAM, dual stack (10.88.0.0/16 and
/// fd88::/64, so pods get an IPv6 address too). No ipMasq and no portmap:
/// both need iptables, which the node does not have. containerd adds the loopback plugin itself.
pub const CNI_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "accordion",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "10.88.0.0/16" }], [{ "subnet": "fd88::/64" }]],
        "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }]
      }
    }
  ]
}
"#;

/// /accordion/containerd.sh start|stop: the node command runs between the two.
/// `start` waits until `ctr version` answers (deadline ACCORDION_CONTAINERD_DEADLINE, 90 s: TCG is
/// slow) and imports every image archive into the `default` and `k8s.io` namespaces; on failure it
/// prints containerd's log tail and exits 125 (a harness failure, like xtask's own). containerd logs
/// at ACCORDION_CONTAINERD_LOG_LEVEL (info; at debug it also passes `-debug` to the shims it starts).
pub const CONTROL_SCRIPT: &str = r#"#!/bin/sh
LOG=/var/log/containerd.log
PIDFILE=/run/containerd.pid
up() { cut -d' ' -f1 /proc/uptime; }
say() { [ -n "${ACCORDION_NODE_QUIET:-}" ] || echo "node: $*" >&2; }
fail() {
    echo "node: containerd: $*; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    [ -f "$PIDFILE" ] && kill -9 "$(cat "$PIDFILE")" 2>/dev/null
    exit 125
}
case "$1" in
start)
    t0=$(up)
    mkdir -p /var/log /var/lib/containerd /run/containerd /var/lib/cni
    # Appending (O_APPEND): the import logs below go into the same file while containerd writes it.
    : > "$LOG"
    containerd --config /etc/containerd/config.toml --log-level "${ACCORDION_CONTAINERD_LOG_LEVEL:-info}" >> "$LOG" 2>&1 &
    pid=$!
    echo "$pid" > "$PIDFILE"
    deadline=$(awk -v t="$t0" -v d="${ACCORDION_CONTAINERD_DEADLINE:-90}" 'BEGIN { print t + d }')
    # ctr blocks while it cannot connect: bound each try by the time left (at most 5 s), so the
    # deadline is checked between tries.
    left() { awk -v n="$(up)" -v d="$deadline" 'BEGIN { l = int(d - n + 0.999); print (l < 1 ? 1 : (l > 5 ? 5 : l)) }'; }
    until timeout "$(left)" ctr version > /dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || fail "containerd exited before answering"
        awk -v n="$(up)" -v d="$deadline" 'BEGIN { exit !(n > d) }' &&
            fail "no answer to 'ctr version' within ${ACCORDION_CONTAINERD_DEADLINE:-90}s"
        sleep 0.2
    done
    t1=$(up)
    # One import chain per namespace, the two in parallel (the node has two CPUs; each import is
    # mostly ctr starting up and unpacking under TCG).
    imports=
    for ns in default k8s.io; do
        : > "/run/import-$ns.log"
        (
            for img in /opt/accordion/images/*.oci.tar; do
                [ -f "$img" ] || continue
                ctr -n "$ns" images import "$img" >> "/run/import-$ns.log" 2>&1 ||
                    { echo "ctr -n $ns images import $img failed" >> "/run/import-$ns.log"; exit 1; }
            done
        ) &
        imports="$imports $!"
    done
    ok=1
    for job in $imports; do wait "$job" || ok=; done
    cat /run/import-default.log /run/import-k8s.io.log >> "$LOG"
    [ -n "$ok" ] || fail "image import failed"
    say "containerd ready after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s, images imported in $(awk -v a="$t1" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')s (log $LOG)"
    ;;
stop)
    [ -f "$PIDFILE" ] || exit 0
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null
    n=0
    while kill -0 "$pid" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
    kill -9 "$pid" 2>/dev/null
    rm -f "$PIDFILE"
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
"#;

/// The node's cmd.sh body around the (already quoted) command: containerd up, the command, down.
pub fn wrap_command(cmd: &str) -> String {
    format!(
        "/accordion/containerd.sh start || exit 125\n{cmd}\nrc=$?\n/accordion/containerd.sh stop\nexit $rc\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A fresh scratch directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// A base layer (busybox and a link to it) and a marker layer, as the accordion-test image has.
    fn layers(dir: &Path) -> (PathBuf, PathBuf) {
        let (base, top) = (dir.join("base"), dir.join("top"));
        std::fs::create_dir_all(base.join("bin")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(base.join("bin/busybox"), "not really busybox").unwrap();
        std::os::unix::fs::symlink("busybox", base.join("bin/sh")).unwrap();
        std::fs::write(top.join("etc/accordion-test"), "accordion-test\n").unwrap();
        (base, top)
    }

    /// scripts/oci-image.sh NAME DIR/<file>.oci.tar --cmd ["sh"] LAYERS…, unpacked; returns the
    /// unpacked layout's directory.
    fn oci_image(dir: &Path, file: &str, name: &str, layers: &[&Path]) -> PathBuf {
        let archive = dir.join(format!("{file}.oci.tar"));
        run(Command::new(root().join("scripts/oci-image.sh"))
            .args([name, &archive.to_string_lossy(), "--cmd", r#"["sh"]"#])
            .args(layers));
        let out = dir.join(file);
        std::fs::create_dir_all(&out).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&out));
        out
    }

    /// The blob `digest` of an unpacked layout, checked against its digest.
    fn blob(layout: &Path, digest: &str) -> PathBuf {
        let path = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        let sum = run(Command::new("sha256sum").arg(&path));
        assert_eq!(
            format!("sha256:{}", &sum[..64]),
            digest,
            "{}",
            path.display()
        );
        path
    }

    fn json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn test_oci_image_archive_has_the_layout_ctr_imports() {
        let dir = scratch("oci-layout");
        let (base, top) = layers(&dir);

        let img = oci_image(&dir, "t", "localhost/t:latest", &[&base, &top]);

        let listing = run(Command::new("tar").arg("-tf").arg(dir.join("t.oci.tar")));
        assert!(
            listing.starts_with("oci-layout\nindex.json\nblobs/\nblobs/sha256/\n"),
            "{listing}"
        );
        // The two layers, the config and the manifest.
        assert_eq!(listing.lines().count(), 4 + 4, "{listing}");
        assert_eq!(json(&img.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
        let index = &json(&img.join("index.json"))["manifests"][0];
        assert_eq!(
            index["annotations"]["io.containerd.image.name"],
            "localhost/t:latest"
        );
        assert_eq!(index["platform"]["architecture"], "arm64");
        let manifest = json(&blob(&img, index["digest"].as_str().unwrap()));
        let config = json(&blob(&img, manifest["config"]["digest"].as_str().unwrap()));
        let layer = |i: usize| manifest["layers"][i]["digest"].as_str().unwrap();
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!([layer(0), layer(1)])
        );
        let base_tar = run(Command::new("tar").arg("-tvf").arg(blob(&img, layer(0))));
        let top_tar = run(Command::new("tar").arg("-tf").arg(blob(&img, layer(1))));
        assert!(base_tar.contains("./bin/sh -> busybox"), "{base_tar}");
        assert!(top_tar.contains("./etc/accordion-test"), "{top_tar}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_oci_image_of_the_same_base_dir_shares_its_layer_digest() {
        let dir = scratch("oci-shared");
        let (base, top) = layers(&dir);

        let alone = oci_image(&dir, "alone", "localhost/a:latest", &[&base]);
        let stacked = oci_image(&dir, "stacked", "localhost/b:latest", &[&base, &top]);

        let first_layer = |img: &Path| {
            let index = json(&img.join("index.json"));
            let manifest = json(&blob(
                img,
                index["manifests"][0]["digest"].as_str().unwrap(),
            ));
            manifest["layers"][0]["digest"].clone()
        };
        assert_eq!(first_layer(&alone), first_layer(&stacked));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_config_names_the_pause_image_and_debian_cni_dir() {
        let c = config_toml(Version::V1_7);
        assert!(c.contains("sandbox_image = \"registry.k8s.io/pause:3.8\""));
        assert!(c.contains("bin_dir = \"/usr/lib/cni\""));
        assert!(c.starts_with("version = 2\n"));
        let c: toml::Table = config_toml(Version::V2_1).parse().unwrap();
        assert_eq!(c["version"].as_integer(), Some(3));
        let images = &c["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(
            images["pinned_images"]["sandbox"].as_str(),
            Some("registry.k8s.io/pause:3.10")
        );
        let cni = &c["plugins"]["io.containerd.cri.v1.runtime"]["cni"];
        assert_eq!(cni["bin_dirs"][0].as_str(), Some("/usr/lib/cni"));
    }

    #[test]
    fn test_config_registers_the_accordion_runtime_and_keeps_runc_the_default() {
        for (version, plugin) in [
            (Version::V1_7, "io.containerd.grpc.v1.cri"),
            (Version::V2_1, "io.containerd.cri.v1.runtime"),
        ] {
            let c: toml::Table = config_toml(version).parse().expect("config.toml is TOML");
            let cri = &c["plugins"][plugin]["containerd"];
            assert_eq!(cri["default_runtime_name"].as_str(), Some("runc"));
            assert_eq!(
                cri["runtimes"]["runc"]["runtime_type"].as_str(),
                Some("io.containerd.runc.v2")
            );
            let accordion = &cri["runtimes"]["accordion"];
            assert_eq!(
                accordion["runtime_type"].as_str(),
                Some("io.containerd.accordion.v2")
            );
            assert_eq!(
                accordion["pod_annotations"][0].as_str(),
                Some("accordion.dev/*")
            );
        }
    }

    #[test]
    fn test_shim_binary_is_the_one_containerd_derives_from_the_runtime_type() {
        // containerd: "io.containerd.<name>.<version>" -> "containerd-shim-<name>-<version>".
        let parts: Vec<&str> = RUNTIME_TYPE.split('.').collect();
        assert_eq!(parts[..2], ["io", "containerd"]);
        assert_eq!(
            SHIM_BINARY,
            format!("containerd-shim-{}-{}", parts[2], parts[3])
        );
    }

    #[test]
    fn test_accordion_config_points_at_the_node_guest_assets() {
        let c: toml::Table = accordion_config_toml()
            .parse()
            .expect("accordion config is TOML");
        assert_eq!(
            c["guest"]["kernel"].as_str(),
            Some("/opt/accordion/share/guest/Image")
        );
        assert_eq!(
            c["guest"]["initrd"].as_str(),
            Some("/opt/accordion/share/guest/agent-initrd.cpio")
        );
        assert_eq!(c["vcpus"]["default"].as_integer(), Some(1));
        assert_eq!(c["vcpus"]["max"].as_integer(), Some(8));
        assert_eq!(c["memory"]["default_mib"].as_integer(), Some(512));
    }

    #[test]
    fn test_cni_conflist_is_json_with_bridge_and_host_local() {
        let v: serde_json::Value = serde_json::from_str(CNI_CONFLIST).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local");
    }

    #[test]
    fn test_wrap_command_keeps_the_command_status() {
        let s = wrap_command("sh -c 'exit 7'");
        assert!(
            s.starts_with("/accordion/containerd.sh start || exit 125\nsh -c 'exit 7'\nrc=$?\n")
        );
        assert!(s.ends_with("/accordion/containerd.sh stop\nexit $rc\n"));
    }
}
