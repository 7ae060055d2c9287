//! The OCI runtime spec as the host sends it: parsed, checked and adjusted before libcontainer
//! sees it, so a malformed spec is an INVALID_ARGUMENT with a reason, never a half-made container.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::CGROUP_PARENT;

/// Errors of a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not JSON, or not an OCI runtime spec.
    #[error("The spec is not a valid OCI runtime spec")]
    Parse(#[source] serde_json::Error),
    /// A required part is missing or unusable.
    #[error("Invalid spec: {0}")]
    Invalid(String),
    /// The adjusted spec could not be serialised again (not expected).
    #[error("Cannot serialise the spec")]
    Serialise(#[source] serde_json::Error),
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

/// The cgroup of container `id`, as a spec's cgroupsPath (relative to the cgroup v2 mount).
pub fn cgroups_path(id: &str) -> PathBuf {
    Path::new("/").join(CGROUP_PARENT).join(id)
}

/// Parses `json` and checks what the agent relies on: a root inside the bundle (relative, no
/// ".."), a process with arguments and an absolute cwd, a `linux` section. Then adjusts it: the
/// process gets a terminal exactly when `tty`, and the cgroup is the agent's
/// (`/accordion/<id>`), whatever the host asked for — Update and Stats read it there.
pub fn prepare(json: &[u8], id: &str, tty: bool) -> Result<Spec, SpecError> {
    let mut spec: Spec = serde_json::from_slice(json).map_err(SpecError::Parse)?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid("root is missing"))?;
    let root_path = root.path();
    if root_path.as_os_str().is_empty()
        || !root_path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(format!(
            "root.path {root_path:?} must be relative to the bundle, without \"..\""
        )));
    }
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| invalid("process is missing"))?;
    match process.args() {
        Some(args) if args.first().is_some_and(|a| !a.is_empty()) => {}
        _ => return Err(invalid("process.args is empty")),
    }
    if !process.cwd().is_absolute() {
        return Err(invalid(format!(
            "process.cwd {:?} is not absolute",
            process.cwd()
        )));
    }
    if process
        .env()
        .iter()
        .flatten()
        .any(|e| !e.contains('=') || e.contains('\0'))
    {
        return Err(invalid("process.env entries must be KEY=VALUE"));
    }
    process.set_terminal(Some(tty));
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| invalid("linux is missing"))?;
    linux.set_cgroups_path(Some(cgroups_path(id)));
    Ok(spec)
}

/// Most network sysctls one spec may carry (kubelet passes a handful).
const MAX_NET_SYSCTLS: usize = 64;
/// Longest sysctl value accepted (ip_local_port_range and the like are a few bytes).
const MAX_SYSCTL_VALUE: usize = 256;

/// Takes the network sysctls (`net.*`) out of a spec whose container shares the guest's network
/// (no network namespace of its own: the host drops the pod's, because the VM is the pod's
/// network). libcontainer refuses them there ("not allowed in host network namespace"), yet they
/// are the pod's to set: containerd 2.x puts `net.ipv4.ping_group_range` and
/// `net.ipv4.ip_unprivileged_port_start` on every pod, and Kubernetes pods may ask for more.
/// [`set_network_sysctls`] sets them on the guest's network, which only this pod uses.
/// Names are checked here: `net.` and dot-separated words of `[A-Za-z0-9_-]`.
pub fn take_network_sysctls(spec: &mut Spec) -> Result<Vec<(String, String)>, SpecError> {
    let Some(linux) = spec.linux_mut().as_mut() else {
        return Ok(Vec::new());
    };
    let own_network = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|ns| ns.typ() == LinuxNamespaceType::Network);
    let Some(sysctls) = linux.sysctl_mut().as_mut().filter(|_| !own_network) else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = sysctls
        .keys()
        .filter(|k| k.starts_with("net.") || k.starts_with("net/"))
        .cloned()
        .collect();
    if names.len() > MAX_NET_SYSCTLS {
        return Err(invalid(format!(
            "{} network sysctls, at most {MAX_NET_SYSCTLS}",
            names.len()
        )));
    }
    let mut taken = Vec::with_capacity(names.len());
    for name in names {
        let value = sysctls.remove(&name).unwrap_or_default();
        // Kubernetes also accepts `/` as the separator (for names with a dot in a segment).
        let dotted = name.replace('/', ".");
        let words_ok = dotted.split('.').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if !words_ok {
            return Err(invalid(format!("sysctl name {name:?} is not valid")));
        }
        if value.len() > MAX_SYSCTL_VALUE || value.contains(['\0', '\n']) {
            return Err(invalid(format!(
                "sysctl {name}: the value must be one line of at most {MAX_SYSCTL_VALUE} bytes"
            )));
        }
        taken.push((dotted, value));
    }
    taken.sort();
    Ok(taken)
}

/// Sets `sysctls` (from [`take_network_sysctls`]) under `proc_sys` (/proc/sys).
pub fn set_network_sysctls(proc_sys: &Path, sysctls: &[(String, String)]) -> Result<(), SpecError> {
    for (name, value) in sysctls {
        let path = proc_sys.join(name.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| {
            invalid(match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("sysctl {name} does not exist in the guest kernel")
                }
                _ => format!("cannot set sysctl {name} to {value:?} in the guest: {e}"),
            })
        })?;
    }
    Ok(())
}

/// The process of an exec into a container: the container's own process settings (user,
/// capabilities, no_new_privileges, rlimits, apparmor) with the exec's arguments, its `env`
/// entries replacing or adding to the container's, its cwd (the container's when None) and a
/// terminal exactly when `tty`.
pub fn exec_process(
    base: &Spec,
    argv: Vec<String>,
    env: &[(String, String)],
    cwd: Option<PathBuf>,
    tty: bool,
) -> Result<Process, SpecError> {
    let mut process = base
        .process()
        .clone()
        .ok_or_else(|| invalid("the container's spec has no process"))?;
    if argv.first().is_none_or(String::is_empty) {
        return Err(invalid("argv is empty"));
    }
    let mut merged: Vec<String> = process
        .env()
        .iter()
        .flatten()
        .filter(|entry| {
            let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
            !env.iter().any(|(k, _)| k == key)
        })
        .cloned()
        .collect();
    merged.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    process.set_args(Some(argv));
    process.set_env(Some(merged));
    if let Some(cwd) = cwd {
        if !cwd.is_absolute() {
            return Err(invalid(format!("cwd {cwd:?} is not absolute")));
        }
        process.set_cwd(cwd);
    }
    process.set_terminal(Some(tty));
    process.set_console_size(None);
    Ok(process)
}

/// The spec as config.json bytes.
pub fn to_json(spec: &Spec) -> Result<Vec<u8>, SpecError> {
    serde_json::to_vec_pretty(spec).map_err(SpecError::Serialise)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh", "-c", "echo hi"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": ["PATH=/bin"]},
            "hostname": "c1",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}],
                      "cgroupsPath": "/elsewhere"}
        })
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }

    #[test]
    fn test_prepare_minimal_forces_cgroup_and_terminal() {
        let spec = prepare(&bytes(&minimal()), "c1", true).expect("valid");
        let linux = spec.linux().as_ref().expect("linux");
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/accordion/c1"))
        );
        let process = spec.process().as_ref().expect("process");
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(spec.hostname().as_deref(), Some("c1"));
    }

    #[test]
    fn test_prepare_malformed_json_is_parse_error() {
        let err = prepare(b"{not json", "c1", false).expect_err("malformed");
        assert!(matches!(err, SpecError::Parse(_)), "{err:?}");
        let err = prepare(b"{\"process\": 3}", "c1", false).expect_err("wrong type");
        assert!(matches!(err, SpecError::Parse(_)), "{err:?}");
    }

    #[test]
    fn test_prepare_rejects_root_outside_bundle() {
        for root in ["/", "/etc", "../x", "rootfs/../../x", ""] {
            let mut v = minimal();
            v["root"]["path"] = root.into();
            let err = prepare(&bytes(&v), "c1", false).expect_err(root);
            assert!(matches!(err, SpecError::Invalid(_)), "{root}: {err:?}");
        }
    }

    #[test]
    fn test_prepare_rejects_missing_parts() {
        for key in ["root", "process", "linux"] {
            let mut v = minimal();
            v.as_object_mut().map(|o| o.remove(key));
            assert!(prepare(&bytes(&v), "c1", false).is_err(), "{key}");
        }
        let mut v = minimal();
        v["process"]["args"] = serde_json::json!([]);
        assert!(prepare(&bytes(&v), "c1", false).is_err());
        let mut v = minimal();
        v["process"]["cwd"] = "relative".into();
        assert!(prepare(&bytes(&v), "c1", false).is_err());
        let mut v = minimal();
        v["process"]["env"] = serde_json::json!(["NOEQUALS"]);
        assert!(prepare(&bytes(&v), "c1", false).is_err());
    }

    #[test]
    fn test_exec_process_keeps_user_and_overrides_env() {
        let mut v = minimal();
        v["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
        v["process"]["env"] = serde_json::json!(["PATH=/bin", "A=1"]);
        let spec = prepare(&bytes(&v), "c1", false).expect("valid");
        let p = exec_process(
            &spec,
            vec!["hostname".into()],
            &[("A".into(), "2".into()), ("B".into(), "3".into())],
            None,
            true,
        )
        .expect("process");
        assert_eq!(p.user().uid(), 1000);
        assert_eq!(p.args().as_deref(), Some(&["hostname".to_string()][..]));
        assert_eq!(
            p.env().as_deref(),
            Some(&["PATH=/bin".to_string(), "A=2".into(), "B=3".into()][..])
        );
        assert_eq!(p.cwd(), Path::new("/"));
        assert_eq!(p.terminal(), Some(true));
        assert!(exec_process(&spec, vec![], &[], None, false).is_err());
        assert!(exec_process(&spec, vec!["x".into()], &[], Some("rel".into()), false).is_err());
    }

    #[test]
    fn test_to_json_round_trips() {
        let spec = prepare(&bytes(&minimal()), "c1", false).expect("valid");
        let again: Spec = serde_json::from_slice(&to_json(&spec).expect("json")).expect("parse");
        assert_eq!(again, spec);
    }

    fn with_sysctls(sysctls: serde_json::Value, own_network: bool) -> Spec {
        let mut v = minimal();
        v["linux"]["sysctl"] = sysctls;
        if own_network {
            v["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"type": "network"}));
        }
        prepare(&bytes(&v), "c1", false).expect("valid")
    }

    #[test]
    fn test_network_sysctls_of_a_container_on_the_guests_network_are_taken_out_for_the_agent() {
        let mut spec = with_sysctls(
            serde_json::json!({"net.ipv4.ping_group_range": "0 2147483647",
                               "net/ipv4/conf/eth0/forwarding": "1",
                               "kernel.shm_rmid_forced": "1"}),
            false,
        );
        let taken = take_network_sysctls(&mut spec).unwrap();
        assert_eq!(
            taken,
            [
                ("net.ipv4.conf.eth0.forwarding".to_string(), "1".to_string()),
                (
                    "net.ipv4.ping_group_range".to_string(),
                    "0 2147483647".to_string()
                ),
            ]
        );
        // The IPC sysctl stays for libcontainer (the container's IPC namespace is its own).
        let left = spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(left.keys().collect::<Vec<_>>(), ["kernel.shm_rmid_forced"]);
    }

    #[test]
    fn test_a_container_with_its_own_network_namespace_keeps_its_sysctls() {
        let mut spec = with_sysctls(serde_json::json!({"net.ipv4.ip_forward": "1"}), true);
        assert!(take_network_sysctls(&mut spec).unwrap().is_empty());
        assert_eq!(
            spec.linux()
                .as_ref()
                .unwrap()
                .sysctl()
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn test_bad_sysctl_names_and_values_are_refused() {
        for (name, value) in [
            ("net.ipv4..x", "1"),
            ("net.ipv4.x/../../../etc", "1"),
            ("net.ipv4.x y", "1"),
            ("net.", "1"),
            ("net.ipv4.x", "1\n2"),
        ] {
            let mut spec = with_sysctls(serde_json::json!({ name: value }), false);
            let err = take_network_sysctls(&mut spec).unwrap_err();
            assert!(matches!(err, SpecError::Invalid(_)), "{name}: {err:?}");
        }
        let many: serde_json::Map<_, _> = (0..65)
            .map(|i| (format!("net.ipv4.x{i}"), serde_json::json!("1")))
            .collect();
        let mut spec = with_sysctls(serde_json::Value::Object(many), false);
        assert!(take_network_sysctls(&mut spec).is_err());
    }

    #[test]
    fn test_setting_sysctls_writes_their_files_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("agent-sysctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        std::fs::write(dir.join("net/ipv4/ping_group_range"), "1 0").unwrap();
        let set = [(
            "net.ipv4.ping_group_range".to_string(),
            "0 2147483647".to_string(),
        )];
        set_network_sysctls(&dir, &set).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("net/ipv4/ping_group_range")).unwrap(),
            "0 2147483647"
        );
        let missing = [("net.ipv9.nothing".to_string(), "1".to_string())];
        let err = set_network_sysctls(&dir, &missing).unwrap_err().to_string();
        assert!(err.contains("net.ipv9.nothing does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
