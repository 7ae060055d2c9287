//! OCI containers in the guest (`accordion.agent.v1.Containers`), run with libcontainer (youki).
//!
//! Everything the host names is checked here before it reaches the filesystem: ids are plain file
//! names, bundles are directories under [`BUNDLES_ROOT`], specs are parsed and adjusted
//! ([`spec`]), and resources become cgroup v2 file writes ([`cgroup`]). The service itself
//! ([`service`]) keeps the containers' processes, stdio and exit statuses; [`events`] waits for
//! the kernel's cgroup notifications (the freezer) and [`oom`] turns them into OOM events.

pub mod cgroup;
pub mod console;
pub mod events;
pub mod oom;
pub mod service;
pub mod spec;

use std::path::{Component, Path, PathBuf};

pub use service::ContainersService;

/// Where bundles must live: the host prepares them here (through Exec or a shared filesystem).
pub const BUNDLES_ROOT: &str = "/run/accordion/containers";
/// The agent's own bundle of each container: its config.json, whose root.path points into the
/// host's bundle (which may be read-only).
pub const OWN_BUNDLES_ROOT: &str = "/run/accordion/bundles";
/// libcontainer's state directory (one subdirectory per container).
pub const STATE_ROOT: &str = "/run/accordion/state";
/// The parent cgroup of every container, relative to the cgroup v2 mount.
pub const CGROUP_PARENT: &str = "accordion";
/// Where init mounts cgroup v2.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// Longest container id accepted.
pub const MAX_ID_LEN: usize = 64;

/// Errors of checking what the host sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateError {
    /// The id is empty, too long, "." / "..", or has a character outside [A-Za-z0-9_.+-].
    #[error("Invalid container id {0:?}: 1-64 characters of [A-Za-z0-9_.+-], not . or ..")]
    Id(String),
    /// The bundle is not a normalised absolute path under [`BUNDLES_ROOT`].
    #[error("Bundle {0:?} is not a directory path under {BUNDLES_ROOT}")]
    Bundle(String),
}

/// Checks a container id: it names a state directory and a cgroup, so it must be a plain file
/// name (libcontainer's own rule, plus a length limit).
pub fn validate_id(id: &str) -> Result<&str, ValidateError> {
    let shown = || ValidateError::Id(id.chars().take(MAX_ID_LEN).collect());
    if id.is_empty() || id.len() > MAX_ID_LEN || id == "." || id == ".." {
        return Err(shown());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'))
    {
        return Err(shown());
    }
    Ok(id)
}

/// Checks a bundle path lexically: absolute, strictly below `root`, only normal components (no
/// "..", ".", or repeated separators that could hide one). The caller still resolves symlinks
/// (see [`service`]) since a component could be a link that points elsewhere.
pub fn validate_bundle(bundle: &str, root: &Path) -> Result<PathBuf, ValidateError> {
    let err = || ValidateError::Bundle(bundle.chars().take(256).collect());
    if bundle.contains('\0') {
        return Err(err());
    }
    let path = Path::new(bundle);
    let rest = path.strip_prefix(root).map_err(|_| err())?;
    if rest.as_os_str().is_empty() || !rest.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(err());
    }
    // Rebuilt from the components: a trailing slash or "//" is gone, so the string compared with
    // the canonical path later is exact.
    Ok(root.join(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_id_accepts_plain_names() {
        assert_eq!(validate_id("abc-1_2.3+x"), Ok("abc-1_2.3+x"));
    }

    #[test]
    fn test_validate_id_rejects_paths_and_specials() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\0b", "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id(&"a".repeat(65)).is_err());
        assert!(validate_id(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn test_validate_bundle_under_root() {
        let root = Path::new(BUNDLES_ROOT);
        assert_eq!(
            validate_bundle("/run/accordion/containers/c1", root),
            Ok(PathBuf::from("/run/accordion/containers/c1"))
        );
        assert_eq!(
            validate_bundle("/run/accordion/containers/pod/c1/", root),
            Ok(PathBuf::from("/run/accordion/containers/pod/c1"))
        );
    }

    #[test]
    fn test_validate_bundle_rejects_traversal_and_outside() {
        let root = Path::new(BUNDLES_ROOT);
        for bad in [
            "/run/accordion/containers",
            "/run/accordion/containers/",
            "/run/accordion/containers/../../etc",
            "/run/accordion/containers/c1/../../x",
            "/run/accordion/containersX/c1",
            "run/accordion/containers/c1",
            "/etc",
            "",
            "/run/accordion/containers/c\0",
        ] {
            assert!(validate_bundle(bad, root).is_err(), "{bad:?}");
        }
    }
}
