//! The installer image (`make image`, `cargo xtask image`): what the chart's DaemonSet runs. FROM
//! scratch: no registry is reachable here for a base image, and none is needed: the aarch64
//! binaries are static. Layout (what `accordion install --source /accordion` reads):
//!
//!   /accordion/bin/accordion                      the CLI, whose `install` the DaemonSet runs
//!   /accordion/bin/containerd-shim-accordion-v2   the shim
//!   /accordion/share/guest/Image                  the guest kernel
//!   /accordion/share/guest/agent-initrd.cpio      the guest initramfs (the agent is its /init)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::assets::{self, Kernels};
use crate::cross::Artifact;
use crate::{containerd, root, XResult};

/// The image's name; its tag is the workspace version.
pub const NAME: &str = "localhost/accordion-installer";

/// The image reference, `NAME:<version>`.
pub fn reference() -> String {
    format!("{NAME}:{}", env!("CARGO_PKG_VERSION"))
}

/// Lays out the image's one layer under `dir` (stripped binaries, kernel, agent initramfs).
pub fn stage(dir: &Path, bins: &[Artifact], k: &Kernels, busybox: &Path) -> XResult<()> {
    let built = |name: &str| {
        bins.iter()
            .find(|a| a.name == name)
            .map(|a| a.path.as_path())
            .ok_or_else(|| format!("the aarch64 build made no {name}"))
    };
    let bin = dir.join("accordion/bin");
    let guest = dir.join("accordion/share/guest");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&guest)?;
    for name in ["accordion", containerd::SHIM_BINARY] {
        let dest = bin.join(name);
        std::fs::rename(assets::stripped(built(name)?, &dest)?, &dest)?;
    }
    std::fs::copy(k.minimal(), guest.join("Image"))?;
    assets::write_agent_initrd(
        k,
        busybox,
        built("accordion-agent")?,
        &guest.join("agent-initrd.cpio"),
    )?;
    Ok(())
}

/// Packs a staged layer as an OCI image-layout archive at `out` (scripts/oci-image.sh).
pub fn pack(layer: &Path, out: &Path) -> XResult<()> {
    let status = Command::new(root().join("scripts/oci-image.sh"))
        .arg(reference())
        .arg(out)
        .args(["--entrypoint", r#"["/accordion/bin/accordion"]"#])
        .args(["--cmd", r#"["install","--help"]"#])
        .arg(layer)
        .status()
        .map_err(|e| format!("cannot run scripts/oci-image.sh: {e}"))?;
    if !status.success() {
        return Err(format!("scripts/oci-image.sh failed ({status})").into());
    }
    Ok(())
}

/// Builds the image archive at `out` from `bins`; the staging directory is removed afterwards.
pub fn build(out: &Path, bins: &[Artifact], k: &Kernels, busybox: &Path) -> XResult<()> {
    let layer = out.with_extension("layer");
    let _ = std::fs::remove_dir_all(&layer);
    let result = stage(&layer, bins, k, busybox).and_then(|()| pack(&layer, out));
    let _ = std::fs::remove_dir_all(&layer);
    result
}

/// Where `cargo xtask image` writes the archive by default.
pub fn default_out() -> PathBuf {
    root().join("target/image").join(format!(
        "accordion-installer-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}
