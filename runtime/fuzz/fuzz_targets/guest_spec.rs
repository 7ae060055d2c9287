//! An OCI spec (a bundle's config.json, as containerd writes it) through everything the shim
//! reads from it: role, network mode, pod resources and size, and the translation into the spec
//! the guest runs.
//!
//! Invariants: nothing panics; every bind mount the guest gets names a path inside the
//! container's share directory (`<guest_dir>/mounts/N`, one per host bind, no `..`); what only
//! the host has (hooks, the network namespace, the mount label) is gone; the guest's JSON parses
//! back into the same spec.

#![no_main]

use std::path::{Component, Path};

use accordion_runtime::config::Config;
use accordion_runtime::resize::policy::CpuShape;
use accordion_runtime::shim::pod::PodSize;
use accordion_runtime::shim::spec::{self, SandboxResources};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

const GUEST_DIR: &str = "/run/accordion/containers/fuzz";

/// A host path's kind, decided by the path itself so runs are reproducible: a directory, a file
/// or missing.
fn kind(path: &Path) -> Option<bool> {
    let sum = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0u32, |a, &b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    match sum % 5 {
        0 => None,
        1 | 2 => Some(false),
        _ => Some(true),
    }
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Only plain names below: no root, no `.`, no `..`.
fn plain_relative(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let Ok(oci) = serde_json::from_slice::<Spec>(data) else {
        return;
    };

    // What the shim reads from a bundle before it boots or joins a pod.
    let annotations = oci.annotations().clone();
    let _ = spec::role(annotations.as_ref());
    let _ = spec::network_mode(&oci);
    let config = Config::default();
    let max_memory = spec::max_memory_mib(annotations.as_ref()).unwrap_or(None);
    for resources in [
        SandboxResources::from_annotations(annotations.as_ref()),
        SandboxResources::from_spec(&oci),
    ] {
        if let Ok(size) = PodSize::of(&resources, max_memory, &config) {
            assert!(size.vcpus >= config.vcpus.min && size.vcpus <= config.vcpus.max);
            assert!(size.memory_mib >= config.memory.default_mib);
            // Room to grow is whole 128 MiB memory blocks, never none.
            if let Some(max) = size.max_memory_mib {
                assert!(max > size.memory_mib && (max - size.memory_mib) % 128 == 0);
            }
        }
    }
    if let Some(resources) = oci.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        let _ = CpuShape::from_resources(resources);
    }

    // The spec the guest runs.
    let tty = data.len().is_multiple_of(2);
    let Ok(guest) = spec::for_guest(oci, tty, GUEST_DIR, kind) else {
        return;
    };
    let s = &guest.spec;
    assert_eq!(
        s.root().as_ref().map(|r| r.path().as_path()),
        Some(Path::new("rootfs"))
    );
    assert!(s.hooks().is_none(), "hooks reach the guest");
    if let Some(linux) = s.linux() {
        assert!(linux.mount_label().is_none());
        let namespaces = linux.namespaces().as_deref().unwrap_or_default();
        assert!(
            namespaces
                .iter()
                .all(|ns| ns.typ() != LinuxNamespaceType::Network),
            "the host's network namespace reaches the guest"
        );
    }
    if let Some(process) = s.process() {
        assert_eq!(process.terminal(), Some(tty));
        assert!(process.apparmor_profile().is_none());
    }
    for bind in &guest.binds {
        assert!(bind.target.starts_with("mounts"), "{bind:?}");
        assert!(plain_relative(&bind.target), "{bind:?}");
        assert!(bind.source.is_absolute(), "{bind:?}");
    }
    let mounts = s.mounts().as_deref().unwrap_or_default();
    let guest_binds: Vec<&Mount> = mounts.iter().filter(|m| is_bind(m)).collect();
    assert_eq!(guest_binds.len(), guest.binds.len());
    for (m, bind) in guest_binds.iter().zip(&guest.binds) {
        let source = m.source().as_deref().unwrap_or(Path::new(""));
        let inside = source
            .strip_prefix(GUEST_DIR)
            .unwrap_or_else(|_| panic!("{} is outside {GUEST_DIR}", source.display()));
        assert!(plain_relative(inside), "{}", source.display());
        assert_eq!(inside, bind.target);
    }

    let json = spec::to_json(s).expect("the guest's spec serializes");
    let back: Spec = serde_json::from_slice(&json).expect("the guest's spec parses back");
    assert_eq!(&back, s);

    // The submounts of read-only binds, as the shim adds them after mounting: each one more
    // bind inside the share, below its bind's directory.
    let mut with_submounts = guest.spec.clone();
    spec::add_submount_binds(&mut with_submounts, GUEST_DIR, &guest.binds, |_| {
        vec![("sub".into(), false), ("sub/deep".into(), true)]
    });
    let mounts = with_submounts.mounts().as_deref().unwrap_or_default();
    let read_only_binds = guest
        .binds
        .iter()
        .filter(|b| b.readonly && !b.recursive_readonly)
        .count();
    assert_eq!(
        mounts.iter().filter(|m| is_bind(m)).count(),
        guest.binds.len() + 2 * read_only_binds
    );
    for m in mounts.iter().filter(|m| is_bind(m)) {
        let source = m.source().as_deref().unwrap_or(Path::new(""));
        let inside = source
            .strip_prefix(GUEST_DIR)
            .unwrap_or_else(|_| panic!("{} is outside {GUEST_DIR}", source.display()));
        assert!(plain_relative(inside), "{}", source.display());
        assert!(inside.starts_with("mounts"), "{}", source.display());
    }
});
