//! The OCI spec containerd wrote for the host, turned into the one the guest runs.
//!
//! The container's root filesystem and every host bind mount reach the guest through the pod's
//! virtio-fs share: the shim mounts them in the container's directory of the share on the host
//! (`rootfs/`, `mounts/N`), and the spec the agent gets names their guest paths under
//! [`GUEST_SHARE`]. What only makes sense on the
//! host goes: the network namespace (the VM is the pod's network boundary), hooks (host
//! binaries), AppArmor and SELinux labels (the guest has neither).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

/// Where the guest agent mounts the pod's share (`accordion.share=` on the kernel command line);
/// each container's bundle is a directory in it.
pub const GUEST_SHARE: &str = "/run/accordion/containers";

/// CRI annotations (containerd's `io.kubernetes.cri.*`).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's own annotation: the most guest memory its VM may grow to (e.g. `2Gi`). containerd
/// passes it to the shim because the runtime's `pod_annotations` lists `accordion.dev/*`.
pub const MAX_MEMORY: &str = "accordion.dev/max-memory";

/// The pod's network, as the sandbox's spec names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetworkMode {
    /// A namespace CNI prepared (`path`): its interfaces go into the VM.
    Netns(PathBuf),
    /// A new, empty namespace (`ctr run` without a network): the VM has only `lo`.
    Isolated,
    /// No network namespace: the host's (hostNetwork pods, `ctr run --net-host`).
    Host,
}

/// How the pod's sandbox (its first container) is networked.
pub fn network_mode(spec: &Spec) -> PodNetworkMode {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|nss| {
            nss.iter()
                .find(|n| n.typ() == LinuxNamespaceType::Network)
                .cloned()
        });
    match ns {
        None => PodNetworkMode::Host,
        Some(n) => match n.path() {
            Some(p) if !p.as_os_str().is_empty() => PodNetworkMode::Netns(p.clone()),
            _ => PodNetworkMode::Isolated,
        },
    }
}

/// Errors in a container's spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("Malformed OCI spec {0}")]
    Load(PathBuf, #[source] oci_spec::OciSpecError),
    #[error("The OCI spec has no root (root.path)")]
    NoRoot,
    #[error("Mount {destination}: its source {host_path} does not exist on the host")]
    MissingSource {
        destination: String,
        host_path: String,
    },
    #[error("Mount {0}: a bind mount needs an absolute source path")]
    RelativeSource(String),
    #[error("Cannot serialize the guest's spec")]
    Serialize(#[source] serde_json::Error),
    #[error("Annotation {MAX_MEMORY}: {0}")]
    MaxMemory(String),
}

/// What a container is to CRI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A pod's sandbox (pause) container: the pod's VM boots for it.
    Sandbox,
    /// A container of the pod with this sandbox id: it joins that pod's VM.
    PodMember { sandbox_id: String },
    /// No CRI annotations (`ctr run`): a VM of its own.
    Standalone,
}

/// The role the annotations give a container.
pub fn role(annotations: Option<&HashMap<String, String>>) -> Role {
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    match (get(CONTAINER_TYPE), get(SANDBOX_ID)) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(id)) if !id.is_empty() => Role::PodMember {
            sandbox_id: id.to_string(),
        },
        _ => Role::Standalone,
    }
}

/// A host path the shim bind-mounts into the container's directory of the share for the guest
/// (at `mounts/N`; read-only means read-only submounts included).
pub use accordion_share::HostBind;

/// The spec for the guest, and the binds to make on the host before the guest sees it.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Spec,
    pub binds: Vec<HostBind>,
}

/// Reads `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|e| SpecError::Load(path, e))
}

/// Rewrites `spec` for the guest, whose bundle is `guest_dir`. `kind` tells, for a host path, whether it is a directory
/// (`Some(true)`), a file (`Some(false)`) or missing (`None`).
pub fn for_guest(
    mut spec: Spec,
    tty: bool,
    guest_dir: &str,
    kind: impl Fn(&Path) -> Option<bool>,
) -> Result<GuestSpec, SpecError> {
    let mut root = spec.root().clone().ok_or(SpecError::NoRoot)?;
    let readonly = root.readonly().unwrap_or(false);
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(readonly));
    spec.set_root(Some(root));

    let mut binds = Vec::new();
    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for m in mounts {
            out.push(guest_mount(m, guest_dir, &kind, &mut binds)?);
        }
        spec.set_mounts(Some(out));
    }

    if let Some(mut process) = spec.process().clone() {
        process.set_terminal(Some(tty));
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
        spec.set_process(Some(process));
    }
    spec.set_hooks(None);
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(namespaces) = linux.namespaces().clone() {
            let kept = namespaces
                .into_iter()
                .filter(|ns| ns.typ() != LinuxNamespaceType::Network)
                .collect();
            linux.set_namespaces(Some(kept));
        }
        linux.set_mount_label(None);
        spec.set_linux(Some(linux));
    }
    Ok(GuestSpec { spec, binds })
}

/// JSON of the guest's spec, for the agent.
pub fn to_json(spec: &Spec) -> Result<Vec<u8>, SpecError> {
    serde_json::to_vec(spec).map_err(SpecError::Serialize)
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn guest_mount(
    m: Mount,
    guest_dir: &str,
    kind: &impl Fn(&Path) -> Option<bool>,
    binds: &mut Vec<HostBind>,
) -> Result<Mount, SpecError> {
    if !is_bind(&m) {
        return Ok(m);
    }
    let destination = m.destination().display().to_string();
    // The pod's /dev/shm is a host tmpfs that cannot be shared with a VM: the guest gets its
    // own. (Containers of one pod still share IPC through the pod's IPC namespace.)
    if m.destination() == Path::new("/dev/shm") {
        return Ok(MountBuilder::default()
            .destination("/dev/shm")
            .typ("tmpfs")
            .source("shm")
            .options(
                ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                    .map(String::from)
                    .to_vec(),
            )
            .build()
            .unwrap_or(m));
    }
    let source = m.source().clone().unwrap_or_default();
    if !source.is_absolute() {
        return Err(SpecError::RelativeSource(destination));
    }
    let is_dir = kind(&source).ok_or_else(|| SpecError::MissingSource {
        destination: destination.clone(),
        host_path: source.display().to_string(),
    })?;
    let has = |option: &str| {
        m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == option))
    };
    let recursive_readonly = has("rro");
    let readonly = recursive_readonly || has("ro");
    let target = PathBuf::from(format!("mounts/{}", binds.len()));
    let mut guest = m;
    guest.set_source(Some(Path::new(guest_dir).join(&target)));
    binds.push(HostBind {
        source,
        target,
        is_dir,
        readonly,
        recursive_readonly,
    });
    Ok(guest)
}

/// Adds to the guest's spec, right after each (non-recursively) read-only bind, a bind of each
/// submount `submounts_of` finds below it on the host, with its own flags. The guest must make
/// them itself: a virtio-fs submount the guest mounts when a path first crosses it takes the
/// read-only flag of the mount it appears under, so under the container's read-only bind a
/// writable host submount would turn read-only.
pub fn add_submount_binds(
    spec: &mut Spec,
    guest_dir: &str,
    binds: &[HostBind],
    submounts_of: impl Fn(&HostBind) -> Vec<(PathBuf, bool)>,
) {
    let Some(mounts) = spec.mounts().clone() else {
        return;
    };
    let mut out = Vec::with_capacity(mounts.len());
    for m in mounts {
        let bind = binds.iter().find(|b| {
            b.readonly
                && !b.recursive_readonly
                && m.source().as_deref() == Some(Path::new(guest_dir).join(&b.target).as_path())
        });
        let extra: Vec<Mount> = match bind {
            Some(b) => submounts_of(b)
                .into_iter()
                .filter_map(|(relative, readonly)| {
                    let flag = if readonly { "ro" } else { "rw" };
                    MountBuilder::default()
                        .destination(m.destination().join(&relative))
                        .typ("bind")
                        .source(Path::new(guest_dir).join(&b.target).join(&relative))
                        .options(vec!["rbind".to_string(), flag.to_string()])
                        .build()
                        .ok()
                })
                .collect(),
            None => Vec::new(),
        };
        out.push(m);
        out.extend(extra);
    }
    spec.set_mounts(Some(out));
}

/// The pod's CPU and memory from the sandbox annotations containerd's CRI plugin sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxResources {
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub memory_bytes: Option<u64>,
}

impl SandboxResources {
    pub fn from_annotations(annotations: Option<&HashMap<String, String>>) -> Self {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
        Self {
            cpu_quota: get(SANDBOX_CPU_QUOTA).and_then(|v| v.parse().ok()),
            cpu_period: get(SANDBOX_CPU_PERIOD).and_then(|v| v.parse().ok()),
            cpu_shares: get(SANDBOX_CPU_SHARES).and_then(|v| v.parse().ok()),
            memory_bytes: get(SANDBOX_MEMORY)
                .and_then(|v| v.parse().ok())
                .filter(|&m| m > 0),
        }
    }

    /// From a container's own linux.resources (a standalone `ctr run` container is its pod).
    pub fn from_spec(spec: &Spec) -> Self {
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        let cpu = resources.as_ref().and_then(|r| r.cpu().clone());
        Self {
            cpu_quota: cpu.as_ref().and_then(|c| c.quota()),
            cpu_period: cpu.as_ref().and_then(|c| c.period()),
            cpu_shares: cpu.as_ref().and_then(|c| c.shares()),
            memory_bytes: resources
                .as_ref()
                .and_then(|r| r.memory().as_ref().and_then(|m| m.limit()))
                .and_then(|l| u64::try_from(l).ok())
                .filter(|&m| m > 0),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The pod's [`MAX_MEMORY`] annotation, MiB (None: not set). It needs a unit: Kubernetes reads a
/// bare number as bytes, which no VM would be sized in.
pub fn max_memory_mib(
    annotations: Option<&HashMap<String, String>>,
) -> Result<Option<u64>, SpecError> {
    let Some(value) = annotations.and_then(|a| a.get(MAX_MEMORY)) else {
        return Ok(None);
    };
    let value = value.trim();
    if value.chars().all(|c| c.is_ascii_digit()) {
        return Err(SpecError::MaxMemory(format!(
            "{value:?} needs a unit, e.g. 2Gi or 1536Mi"
        )));
    }
    crate::config::parse_size_mib(value)
        .map(Some)
        .map_err(SpecError::MaxMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const CRI_LIKE: &str = r#"{
        "ociVersion": "1.1.0",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/",
                    "apparmorProfile": "cri-containerd.apparmor.d"},
        "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs", "readonly": true},
        "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind", "ro"]},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                                 {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "mount"}],
                  "mountLabel": "x"}
    }"#;

    fn kinds(p: &Path) -> Option<bool> {
        match p.to_str() {
            Some("/var/lib/x/hosts") => Some(false),
            Some("/srv/data") => Some(true),
            _ => None,
        }
    }

    #[test]
    fn test_network_mode_of_cri_ctr_and_host_network_specs() {
        let spec = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}},
                    "linux": {{"namespaces": [{{"type": "pid"}}{ns}]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(
            network_mode(&spec(
                r#", {"type": "network", "path": "/var/run/netns/cni-1"}"#
            )),
            PodNetworkMode::Netns("/var/run/netns/cni-1".into())
        );
        assert_eq!(
            network_mode(&spec(r#", {"type": "network"}"#)),
            PodNetworkMode::Isolated
        );
        assert_eq!(network_mode(&spec("")), PodNetworkMode::Host);
    }

    #[test]
    fn test_guest_spec_rebases_root_and_binds_and_drops_host_only_parts() {
        let g = for_guest(spec(CRI_LIKE), true, "/run/accordion/containers/c1", kinds).unwrap();
        let s = &g.spec;
        assert_eq!(s.root().as_ref().unwrap().path(), Path::new("rootfs"));
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(true));
        assert!(s.hooks().is_none());
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.terminal(), Some(true));
        assert!(p.apparmor_profile().is_none());
        let ns: Vec<_> = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        assert_eq!(ns.len(), 3);
        // The pod's IPC namespace path is kept: it names the sandbox's guest pid.
        assert!(ns
            .iter()
            .any(|n| n.path().as_deref() == Some(Path::new("/proc/42/ns/ipc"))));
        assert_eq!(
            g.binds,
            vec![
                HostBind {
                    source: "/var/lib/x/hosts".into(),
                    target: "mounts/0".into(),
                    is_dir: false,
                    readonly: false,
                    recursive_readonly: false,
                },
                HostBind {
                    source: "/srv/data".into(),
                    target: "mounts/1".into(),
                    is_dir: true,
                    readonly: true,
                    recursive_readonly: false,
                },
            ]
        );
        let mounts = s.mounts().clone().unwrap();
        assert_eq!(mounts[2].typ().as_deref(), Some("tmpfs"));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/accordion/containers/c1/mounts/0"))
        );
        assert_eq!(
            mounts[3].source().as_deref(),
            Some(Path::new("/run/accordion/containers/c1/mounts/1"))
        );
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
    }

    #[test]
    fn test_read_only_binds_get_their_submounts_bound_in_the_guest_unless_recursive() {
        let s = spec(
            r#"{"ociVersion": "1.1.0", "root": {"path": "rootfs"},
                "mounts": [
                  {"destination": "/ro", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
                  {"destination": "/rro", "type": "bind", "source": "/srv/data", "options": ["rbind", "rro"]},
                  {"destination": "/rw", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
                  {"destination": "/proc", "type": "proc", "source": "proc"}
                ]}"#,
        );
        let mut g = for_guest(s, false, "/g", kinds).unwrap();
        let flags: Vec<(bool, bool)> = g
            .binds
            .iter()
            .map(|b| (b.readonly, b.recursive_readonly))
            .collect();
        assert_eq!(flags, [(true, false), (true, true), (false, false)]);
        add_submount_binds(&mut g.spec, "/g", &g.binds, |b| {
            assert_eq!(
                b.target,
                Path::new("mounts/0"),
                "asked only for the `ro` bind"
            );
            vec![("sub".into(), false), ("sub/deep".into(), true)]
        });
        let mounts: Vec<(String, String, Vec<String>)> = g
            .spec
            .mounts()
            .clone()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m.destination().display().to_string(),
                    m.source().clone().unwrap_or_default().display().to_string(),
                    m.options().clone().unwrap_or_default(),
                )
            })
            .collect();
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            mounts,
            vec![
                ("/ro".into(), "/g/mounts/0".into(), o(&["rbind", "ro"])),
                (
                    "/ro/sub".into(),
                    "/g/mounts/0/sub".into(),
                    o(&["rbind", "rw"])
                ),
                (
                    "/ro/sub/deep".into(),
                    "/g/mounts/0/sub/deep".into(),
                    o(&["rbind", "ro"])
                ),
                ("/rro".into(), "/g/mounts/1".into(), o(&["rbind", "rro"])),
                ("/rw".into(), "/g/mounts/2".into(), o(&["rbind", "rw"])),
                ("/proc".into(), "proc".into(), o(&[])),
            ]
        );
    }

    #[test]
    fn test_missing_bind_source_is_an_error_naming_it() {
        let s = spec(
            r#"{"ociVersion": "1.1.0", "root": {"path": "rootfs"},
                "mounts": [{"destination": "/v", "type": "bind", "source": "/nope", "options": ["rbind"]}]}"#,
        );
        let e = for_guest(s, false, "/g", kinds).unwrap_err().to_string();
        assert!(e.contains("/nope") && e.contains("/v"), "{e}");
    }

    #[test]
    fn test_spec_without_root_is_refused() {
        let s = spec(r#"{"ociVersion": "1.1.0"}"#);
        let s = {
            let mut s = s;
            s.set_root(None);
            s
        };
        assert!(matches!(
            for_guest(s, false, "/g", kinds),
            Err(SpecError::NoRoot)
        ));
    }

    #[test]
    fn test_role_from_cri_annotations() {
        let mut a = HashMap::new();
        assert_eq!(role(None), Role::Standalone);
        a.insert(CONTAINER_TYPE.to_string(), "sandbox".to_string());
        assert_eq!(role(Some(&a)), Role::Sandbox);
        a.insert(CONTAINER_TYPE.to_string(), "container".to_string());
        assert_eq!(role(Some(&a)), Role::Standalone);
        a.insert(SANDBOX_ID.to_string(), "pod1".to_string());
        assert_eq!(
            role(Some(&a)),
            Role::PodMember {
                sandbox_id: "pod1".into()
            }
        );
    }

    #[test]
    fn test_max_memory_annotation_needs_a_unit() {
        let with = |v: &str| HashMap::from([(MAX_MEMORY.to_string(), v.to_string())]);
        assert_eq!(max_memory_mib(None).unwrap(), None);
        assert_eq!(max_memory_mib(Some(&HashMap::new())).unwrap(), None);
        assert_eq!(max_memory_mib(Some(&with("2Gi"))).unwrap(), Some(2048));
        assert_eq!(max_memory_mib(Some(&with(" 1536Mi "))).unwrap(), Some(1536));
        assert_eq!(max_memory_mib(Some(&with("4G"))).unwrap(), Some(4096));
        for bad in [
            "2147483648",
            "",
            "lots",
            "-1Gi",
            "0Mi",
            "1.5Gi",
            "99999999999999999Gi",
        ] {
            let err = max_memory_mib(Some(&with(bad))).unwrap_err();
            assert!(err.to_string().contains(MAX_MEMORY), "{bad}: {err}");
        }
    }

    #[test]
    fn test_sandbox_resources_from_annotations() {
        let mut a = HashMap::new();
        assert!(SandboxResources::from_annotations(Some(&a)).is_empty());
        a.insert(SANDBOX_CPU_QUOTA.to_string(), "250000".to_string());
        a.insert(SANDBOX_CPU_PERIOD.to_string(), "100000".to_string());
        a.insert(SANDBOX_MEMORY.to_string(), "0".to_string());
        a.insert(SANDBOX_CPU_SHARES.to_string(), "garbage".to_string());
        let r = SandboxResources::from_annotations(Some(&a));
        assert_eq!(r.cpu_quota, Some(250000));
        assert_eq!(r.cpu_period, Some(100000));
        assert_eq!(r.cpu_shares, None);
        assert_eq!(r.memory_bytes, None);
    }
}
