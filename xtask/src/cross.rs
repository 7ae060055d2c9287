//! Cross builds of the workspace for aarch64 with Debian's rustc-web (static binaries).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{root, XResult};

pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// An executable the build produced, with the name it gets on the node's PATH.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub name: String,
    pub path: PathBuf,
}

/// `cargo` for aarch64: natively on an ARM64 host, else Debian's cargo + rustc-web (rustup's
/// toolchain has no aarch64 std here and cannot download one).
pub fn cargo() -> Command {
    if cfg!(target_arch = "aarch64") {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.env_remove("RUSTFLAGS");
        c
    } else {
        let mut c = Command::new("/usr/bin/cargo");
        c.env("RUSTC", "/usr/bin/rustc")
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
                "qemu-aarch64-static",
            )
            // An env RUSTFLAGS would replace .cargo/config.toml's +crt-static.
            .env_remove("RUSTFLAGS")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO");
        c
    }
}

/// What to build: the workspace's binaries and examples, or its integration tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Binaries,
    IntegrationTests,
}

/// Builds for aarch64 and returns the executables, parsed from cargo's JSON messages.
pub fn build(kind: Kind, release: bool) -> XResult<Vec<Artifact>> {
    let mut cmd = cargo();
    cmd.current_dir(root());
    match kind {
        Kind::Binaries => cmd.args(["build", "--workspace", "--bins", "--examples"]),
        // xtask's own tests drive the node from the host; they are not node tests.
        Kind::IntegrationTests => cmd.args([
            "test",
            "--workspace",
            "--exclude",
            "xtask",
            "--tests",
            "--no-run",
        ]),
    };
    cmd.args([
        "--target",
        TARGET,
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let out = cmd
        .spawn()
        .map_err(|e| format!("cannot run the aarch64 cargo (run `make setup`?): {e}"))?
        .wait_with_output()?;
    if !out.status.success() {
        return Err(format!("aarch64 build failed ({})", out.status).into());
    }
    let mut artifacts = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let kinds: Vec<&str> = msg["target"]["kind"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        let wanted = match kind {
            Kind::Binaries => kinds.iter().any(|k| *k == "bin" || *k == "example"),
            // Unit tests (lib/bin) run under qemu-user; only tests/*.rs need the node.
            Kind::IntegrationTests => kinds.contains(&"test"),
        };
        if !wanted {
            continue;
        }
        let target_name = msg["target"]["name"].as_str().unwrap_or("unnamed");
        let name = match kind {
            Kind::Binaries => target_name.to_string(),
            Kind::IntegrationTests => {
                let pkg = package_name(&msg);
                format!("{pkg}-{target_name}")
            }
        };
        artifacts.push(Artifact {
            name,
            path: PathBuf::from(exe),
        });
    }
    Ok(artifacts)
}

/// The package of an artifact from its package_id: "path+file:///w/vmm-core#accordion-vmm@0.1.0",
/// or "path+file:///w/xtask#0.1.0" when the name is the directory's.
fn package_name(msg: &serde_json::Value) -> String {
    let id = msg["package_id"].as_str().unwrap_or("");
    let (url, frag) = id.rsplit_once('#').unwrap_or((id, ""));
    match frag.split_once('@') {
        Some((name, _)) => name.to_string(),
        None => url.rsplit('/').next().unwrap_or("pkg").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_package_name_from_both_package_id_forms() {
        let named =
            serde_json::json!({"package_id": "path+file:///w/vmm-core#accordion-vmm@0.1.0"});
        let plain = serde_json::json!({"package_id": "path+file:///w/xtask#0.1.0"});
        assert_eq!(package_name(&named), "accordion-vmm");
        assert_eq!(package_name(&plain), "xtask");
    }
}
