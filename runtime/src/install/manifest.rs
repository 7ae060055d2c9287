//! What `accordion install` changed on a host, so `accordion uninstall` can put every byte back.
//!
//! Before the installer first touches a path it records what was there (nothing, a file with its
//! bytes and mode, or a symlink), and every directory it creates; the manifest is saved after each
//! record, so an install that dies half-way can still be undone. Paths are host paths ("/etc/…");
//! the installer resolves them under its `--root`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// Where the manifest lives on the host.
pub const MANIFEST_PATH: &str = "/opt/accordion/install-manifest.json";
const FORMAT: u32 = 1;

/// Errors reading or writing the manifest, or restoring what it recorded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("Cannot {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    #[error("Corrupt install manifest {0}: {1}")]
    Corrupt(PathBuf, String),
}

/// What was at a path before the installer changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Original {
    Absent,
    /// A small file, kept inline.
    File {
        mode: u32,
        data: String,
    },
    /// A large file (a binary, a kernel), moved aside to `backup` (a host path).
    Backup {
        mode: u32,
        backup: PathBuf,
    },
    Symlink {
        target: PathBuf,
    },
}

/// Files larger than this are kept as a backup file rather than inside the manifest.
const INLINE_MAX: u64 = 256 * 1024;
/// Where large originals wait for uninstall.
const BACKUP_DIR: &str = "/opt/accordion/originals";

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: PathBuf,
    pub original: Original,
    /// The bytes the installer wrote, kept for files the host may edit later (containerd's
    /// config): uninstall restores the original only if they are still there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<String>,
}

/// The node label the installer set, removed on uninstall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLabel {
    pub node: String,
    pub key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Paths changed, in the order they were first changed.
    pub entries: Vec<Entry>,
    /// Directories created, parents first.
    pub created_dirs: Vec<PathBuf>,
    /// containerd's main config and the drop-in the installer imports into it.
    pub containerd_config: Option<PathBuf>,
    pub dropin: Option<PathBuf>,
    pub node_label: Option<NodeLabel>,
    /// Set once every step of an install succeeded (`accordion install --check`).
    pub complete: bool,
}

/// A manifest bound to the root it describes.
#[derive(Debug)]
pub struct Recorder {
    root: PathBuf,
    pub manifest: Manifest,
}

/// `host` (absolute) under `root`.
pub fn under(root: &Path, host: &Path) -> PathBuf {
    root.join(host.strip_prefix("/").unwrap_or(host))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ManifestError + 'a {
    move |e| ManifestError::Io(what, path.to_path_buf(), e)
}

impl Recorder {
    /// The root's manifest, or an empty one when nothing is installed there.
    pub fn open(root: &Path) -> Result<Self, ManifestError> {
        let path = under(root, Path::new(MANIFEST_PATH));
        let manifest = match fs::read(&path) {
            Ok(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|e| ManifestError::Corrupt(path.clone(), e.to_string()))?;
                if m.format != FORMAT {
                    return Err(ManifestError::Corrupt(
                        path,
                        format!("format {} (this installer reads {FORMAT})", m.format),
                    ));
                }
                m
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                format: FORMAT,
                ..Manifest::default()
            },
            Err(e) => return Err(ManifestError::Io("read", path, e)),
        };
        Ok(Self {
            root: root.to_path_buf(),
            manifest,
        })
    }

    /// Whether a manifest exists under the root.
    pub fn exists(root: &Path) -> bool {
        under(root, Path::new(MANIFEST_PATH)).exists()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `host` under this recorder's root.
    pub fn host(&self, host: &Path) -> PathBuf {
        under(&self.root, host)
    }

    /// Saves the manifest (atomically), creating its directory (recorded) if needed.
    pub fn save(&mut self) -> Result<(), ManifestError> {
        let host = Path::new(MANIFEST_PATH);
        if let Some(dir) = host.parent() {
            self.ensure_dir(dir)?;
        }
        let mut text = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| ManifestError::Corrupt(host.to_path_buf(), e.to_string()))?;
        text.push(b'\n');
        write_atomic(&self.host(host), &text, 0o644)
    }

    /// Deletes the manifest file.
    pub fn remove(&self) -> Result<(), ManifestError> {
        let path = self.host(Path::new(MANIFEST_PATH));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ManifestError::Io("remove", path, e))
            }
            _ => Ok(()),
        }
    }

    /// Creates `dir` and its missing parents, recording each one created.
    pub fn ensure_dir(&mut self, dir: &Path) -> Result<(), ManifestError> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if p.as_os_str().is_empty() || self.host(p).is_dir() {
                break;
            }
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        for p in missing.into_iter().rev() {
            let real = self.host(&p);
            fs::create_dir(&real).map_err(io("create directory", &real))?;
            if !self.manifest.created_dirs.contains(&p) {
                self.manifest.created_dirs.push(p);
            }
        }
        Ok(())
    }

    /// Records what is at `host` now, unless it was recorded before (the first original wins, so
    /// installing twice still restores what preceded the first install).
    pub fn record(&mut self, host: &Path) -> Result<(), ManifestError> {
        if self.entry(host).is_some() {
            return Ok(());
        }
        let real = self.host(host);
        let original = match fs::symlink_metadata(&real) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Original::Absent,
            Err(e) => return Err(ManifestError::Io("inspect", real, e)),
            Ok(m) if m.file_type().is_symlink() => Original::Symlink {
                target: fs::read_link(&real).map_err(io("read link", &real))?,
            },
            Ok(m) if m.is_file() && m.len() <= INLINE_MAX => Original::File {
                mode: m.permissions().mode() & 0o7777,
                data: B64.encode(fs::read(&real).map_err(io("read", &real))?),
            },
            Ok(m) if m.is_file() => {
                let dir = Path::new(BACKUP_DIR);
                self.ensure_dir(dir)?;
                let backup = dir.join(self.manifest.entries.len().to_string());
                let to = self.host(&backup);
                fs::copy(&real, &to).map_err(io("back up", &real))?;
                Original::Backup {
                    mode: m.permissions().mode() & 0o7777,
                    backup,
                }
            }
            Ok(_) => {
                return Err(ManifestError::Io(
                    "replace",
                    real,
                    std::io::Error::other("it is not a regular file or a symlink"),
                ))
            }
        };
        self.manifest.entries.push(Entry {
            path: host.to_path_buf(),
            original,
            written: None,
        });
        self.save()
    }

    pub fn entry(&self, host: &Path) -> Option<&Entry> {
        self.manifest.entries.iter().find(|e| e.path == host)
    }

    /// Writes `bytes` to `host` (recorded first; parents created), atomically.
    pub fn write(
        &mut self,
        host: &Path,
        bytes: &[u8],
        mode: u32,
        keep_written: bool,
    ) -> Result<(), ManifestError> {
        if let Some(dir) = host.parent() {
            self.ensure_dir(dir)?;
        }
        self.record(host)?;
        if keep_written {
            if let Some(e) = self.manifest.entries.iter_mut().find(|e| e.path == host) {
                e.written = Some(B64.encode(bytes));
            }
            self.save()?;
        }
        let real = self.host(host);
        if fs::read(&real).is_ok_and(|now| now == bytes)
            && fs::symlink_metadata(&real)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o7777 == mode)
        {
            return Ok(());
        }
        write_atomic(&real, bytes, mode)
    }

    /// Makes `host` a symlink to `target` (recorded first).
    pub fn symlink(&mut self, host: &Path, target: &Path) -> Result<(), ManifestError> {
        if let Some(dir) = host.parent() {
            self.ensure_dir(dir)?;
        }
        self.record(host)?;
        let real = self.host(host);
        if fs::read_link(&real).is_ok_and(|t| t == target) {
            return Ok(());
        }
        let tmp = tmp_path(&real);
        let _ = fs::remove_file(&tmp);
        symlink(target, &tmp).map_err(io("create symlink", &tmp))?;
        fs::rename(&tmp, &real).map_err(io("rename into place", &real))
    }

    /// Puts back what was at an entry's path before the install.
    pub fn restore(&self, entry: &Entry) -> Result<(), ManifestError> {
        let real = self.host(&entry.path);
        match &entry.original {
            Original::Absent => match fs::remove_file(&real) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(ManifestError::Io("remove", real, e))
                }
                _ => Ok(()),
            },
            Original::File { mode, data } => {
                let bytes = B64.decode(data).map_err(|e| {
                    ManifestError::Corrupt(entry.path.clone(), format!("original bytes: {e}"))
                })?;
                write_atomic(&real, &bytes, *mode)
            }
            Original::Backup { mode, backup } => {
                let from = self.host(backup);
                fs::set_permissions(&from, fs::Permissions::from_mode(*mode))
                    .map_err(io("chmod", &from))?;
                fs::rename(&from, &real).map_err(io("restore", &real))
            }
            Original::Symlink { target } => {
                let tmp = tmp_path(&real);
                let _ = fs::remove_file(&tmp);
                symlink(target, &tmp).map_err(io("create symlink", &tmp))?;
                fs::rename(&tmp, &real).map_err(io("rename into place", &real))
            }
        }
    }

    /// The bytes the installer wrote at an entry's path, if it kept them.
    pub fn written(entry: &Entry) -> Option<Vec<u8>> {
        entry.written.as_ref().and_then(|w| B64.decode(w).ok())
    }

    /// The original bytes of a file entry (None if the path was absent or a symlink).
    pub fn original_bytes(entry: &Entry) -> Option<Vec<u8>> {
        match &entry.original {
            Original::File { data, .. } => B64.decode(data).ok(),
            _ => None,
        }
    }

    /// Removes the directories the install created, deepest first, where they are empty.
    /// Returns those left because something else now lives in them.
    pub fn remove_created_dirs(&self) -> Vec<PathBuf> {
        let mut kept = Vec::new();
        for d in self.manifest.created_dirs.iter().rev() {
            let real = self.host(d);
            match fs::remove_dir(&real) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => kept.push(d.clone()),
            }
        }
        kept
    }
}

fn tmp_path(real: &Path) -> PathBuf {
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    real.with_file_name(format!(".{name}.accordion-tmp"))
}

/// Writes a file through a temporary beside it and a rename, so readers (containerd starting, a
/// shim being exec'd) never see half a file.
pub fn write_atomic(real: &Path, bytes: &[u8], mode: u32) -> Result<(), ManifestError> {
    let tmp = tmp_path(real);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    // The umask may have trimmed the mode given to open.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, real).map_err(io("rename into place", real))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("accordion-manifest-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_write_then_restore_puts_back_original_bytes_mode_and_absence() {
        let root = scratch("restore");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/existing"), b"before\n").unwrap();
        fs::set_permissions(root.join("etc/existing"), fs::Permissions::from_mode(0o600)).unwrap();

        let mut r = Recorder::open(&root).unwrap();
        r.write(Path::new("/etc/existing"), b"after\n", 0o644, false)
            .unwrap();
        r.write(Path::new("/opt/x/y/new"), b"new\n", 0o755, false)
            .unwrap();
        r.symlink(Path::new("/etc/link"), Path::new("/opt/x/y/new"))
            .unwrap();
        assert_eq!(fs::read(root.join("etc/existing")).unwrap(), b"after\n");
        assert_eq!(
            r.manifest.created_dirs,
            [
                PathBuf::from("/opt"),
                // The manifest's own directory, made by the first record.
                PathBuf::from("/opt/accordion"),
                PathBuf::from("/opt/x"),
                PathBuf::from("/opt/x/y")
            ]
        );

        // A second recorder (a later `uninstall`) reads what the first saved.
        let r2 = Recorder::open(&root).unwrap();
        assert_eq!(r2.manifest.entries, r.manifest.entries);
        for e in &r2.manifest.entries {
            r2.restore(e).unwrap();
        }
        r2.remove().unwrap();
        assert_eq!(r2.remove_created_dirs(), Vec::<PathBuf>::new());
        assert_eq!(fs::read(root.join("etc/existing")).unwrap(), b"before\n");
        let mode = fs::metadata(root.join("etc/existing"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!root.join("etc/link").exists());
        assert!(!root.join("opt").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_a_large_original_is_backed_up_and_moved_back() {
        let root = scratch("backup");
        fs::create_dir_all(root.join("bin")).unwrap();
        let big = vec![7u8; (INLINE_MAX + 1) as usize];
        fs::write(root.join("bin/big"), &big).unwrap();
        let mut r = Recorder::open(&root).unwrap();
        r.write(Path::new("/bin/big"), b"small now", 0o755, false)
            .unwrap();
        assert!(matches!(
            r.manifest.entries[0].original,
            Original::Backup { .. }
        ));
        for e in &r.manifest.entries {
            r.restore(e).unwrap();
        }
        r.remove().unwrap();
        r.remove_created_dirs();
        assert_eq!(fs::read(root.join("bin/big")).unwrap(), big);
        assert!(!root.join("opt").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_first_original_wins_over_a_later_record() {
        let root = scratch("first");
        let mut r = Recorder::open(&root).unwrap();
        r.write(Path::new("/f"), b"one", 0o644, false).unwrap();
        r.write(Path::new("/f"), b"two", 0o644, false).unwrap();
        assert_eq!(r.manifest.entries.len(), 1);
        assert_eq!(r.manifest.entries[0].original, Original::Absent);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_a_dir_where_a_file_goes_is_refused_not_replaced() {
        let root = scratch("dir");
        fs::create_dir_all(root.join("etc/thing")).unwrap();
        let mut r = Recorder::open(&root).unwrap();
        let err = r
            .write(Path::new("/etc/thing"), b"x", 0o644, false)
            .unwrap_err();
        assert!(err.to_string().contains("/etc/thing"), "{err}");
        assert!(root.join("etc/thing").is_dir());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_corrupt_manifest_is_an_error_naming_the_file() {
        let root = scratch("corrupt");
        fs::create_dir_all(root.join("opt/accordion")).unwrap();
        fs::write(root.join("opt/accordion/install-manifest.json"), "{nope").unwrap();
        let err = Recorder::open(&root).unwrap_err().to_string();
        assert!(err.contains("install-manifest.json"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }
}
