//! The OCI runtime spec as the host sends it: parsed, checked and adjusted before libcontainer
//! sees it, so a malformed spec is an INVALID_ARGUMENT with a reason, never a half-made container.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

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
}
