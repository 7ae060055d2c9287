//! Kernel modules the guest needs before the agent can serve: on a distribution kernel (Debian's
//! stock arm64 build) virtio-mmio and vsock are modules, while our minimal kernel has them built in.
//!
//! The initramfs carries `/lib/modules/<release>/insmod.list`: module files relative to that
//! directory, dependencies first (the host resolves modules.dep when it packs the initramfs, so the
//! guest needs no modprobe).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Errors loading one module.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("Cannot open module {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("Cannot load module {0}")]
    Load(PathBuf, #[source] std::io::Error),
}

/// The module list for `release` under `root`, if the initramfs has one.
pub fn list_path(root: &Path, release: &str) -> PathBuf {
    root.join("lib/modules").join(release).join("insmod.list")
}

/// The modules named by an insmod.list, as absolute paths, in load order.
pub fn parse_list(dir: &Path, text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| dir.join(l))
        .collect()
}

/// Loads one module with finit_module(2); an already loaded module is not an error.
pub fn load(path: &Path) -> Result<(), ModuleError> {
    let file = File::open(path).map_err(|e| ModuleError::Open(path.to_path_buf(), e))?;
    let params = CString::default();
    // SAFETY: finit_module reads the module from a valid open fd and a NUL-terminated (empty)
    // parameter string that outlives the call; it does not touch our memory otherwise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(ModuleError::Load(path.to_path_buf(), err))
}

/// Loads every module of this kernel's insmod.list (none on a kernel without one); returns the
/// names loaded and the errors, so init can log them and go on serving.
pub fn load_all() -> (Vec<String>, Vec<ModuleError>) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let list = list_path(Path::new("/"), &release);
    let Ok(text) = std::fs::read_to_string(&list) else {
        return (Vec::new(), Vec::new());
    };
    let dir = list.parent().unwrap_or(Path::new("/")).to_path_buf();
    let (mut loaded, mut errors) = (Vec::new(), Vec::new());
    for module in parse_list(&dir, &text) {
        match load(&module) {
            Ok(()) => loaded.push(module.display().to_string()),
            Err(e) => errors.push(e),
        }
    }
    (loaded, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_list_keeps_order_and_skips_blanks_and_comments() {
        let dir = Path::new("/lib/modules/6.12.0");
        let list = parse_list(dir, "kernel/a.ko\n\n# note\n kernel/b.ko \n");
        assert_eq!(
            list,
            [dir.join("kernel/a.ko"), dir.join("kernel/b.ko")].to_vec()
        );
    }

    #[test]
    fn test_load_missing_module_is_open_error() {
        let err = load(Path::new("/nonexistent/x.ko")).unwrap_err();
        assert!(matches!(err, ModuleError::Open(..)), "{err}");
    }
}
