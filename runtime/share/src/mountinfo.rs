//! What is mounted where (this process's /proc/self/mountinfo), and the two things done with it:
//! unmounting everything under a directory, and removing a directory only when nothing is
//! mounted under it.

use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::sys;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Mount points at or below `dir` in this process's mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    // mountinfo has resolved paths, so `dir` is resolved too: a run directory named through a
    // symlink (/var/run/...) must not look empty when /run/... has mounts.
    let dir = match std::fs::canonicalize(dir) {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => dir.to_owned(),
        Err(e) => return Err(e),
    };
    let info = std::fs::read_to_string(MOUNTINFO)?;
    let mut points: Vec<PathBuf> = mount_points(&info)
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(points)
}

/// Lazily unmounts every mount at or below `dir`, deepest first (a process may still hold a file
/// open in one). Mount points come from mountinfo and are unmounted with UMOUNT_NOFOLLOW. A mount
/// already gone (its master's unmount propagated to it) is not an error; anything else is logged.
pub fn unmount_all_under(dir: &Path) {
    let points = match mounts_under(dir) {
        Ok(points) => points,
        Err(e) => {
            log::warn!("cannot read {MOUNTINFO} to unmount {}: {e}", dir.display());
            return;
        }
    };
    for point in points {
        match sys::unmount_path(&point) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
            Err(e) => log::warn!("cannot unmount {}: {e}", point.display()),
        }
    }
}

/// Removes directory `dir` and everything in it, but only when nothing is mounted at or below it
/// (removing through a live mount would delete a container's files in containerd's snapshot, or a
/// volume's on the host). Otherwise `dir` is left in place and the reason logged. Returns whether
/// `dir` was removed.
pub fn remove_dir_unless_mounted(dir: &Path) -> bool {
    match mounts_under(dir) {
        Ok(points) if points.is_empty() => {}
        Ok(points) => {
            log::warn!(
                "{} left in place: {} is still mounted{}",
                dir.display(),
                points[points.len() - 1].display(),
                match points.len() {
                    1 => String::new(),
                    n => format!(" (and {} more below it)", n - 1),
                }
            );
            return false;
        }
        Err(e) => {
            log::warn!(
                "{} left in place: cannot read {MOUNTINFO} to check for mounts: {e}",
                dir.display()
            );
            return false;
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            log::warn!("cannot remove {}: {e}", dir.display());
            false
        }
    }
}

/// Mount points strictly below `dir`, relative to it, shallowest first, each with whether it is
/// mounted read-only (its per-mount options, the sixth field).
pub fn submounts(dir: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
    let dir = std::fs::canonicalize(dir)?;
    let info = std::fs::read_to_string(MOUNTINFO)?;
    Ok(submounts_in(&info, &dir))
}

fn submounts_in(info: &str, dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut below: Vec<(PathBuf, bool)> = info
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ').skip(4);
            let point = unescape(fields.next()?);
            let readonly = fields.next()?.split(',').any(|o| o == "ro");
            let relative = point.strip_prefix(dir).ok()?.to_owned();
            (!relative.as_os_str().is_empty()).then_some((relative, readonly))
        })
        .collect();
    below.sort_by_key(|(p, _)| p.components().count());
    // A path mounted over several times: the last (topmost) one counts.
    let mut seen = std::collections::BTreeMap::new();
    for (p, ro) in below {
        seen.insert(p, ro);
    }
    let mut out: Vec<(PathBuf, bool)> = seen.into_iter().collect();
    out.sort_by_key(|(p, _)| p.components().count());
    out
}

/// The mount point (fifth field) of every mountinfo line.
fn mount_points(info: &str) -> impl Iterator<Item = PathBuf> + '_ {
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c));
        if bytes[i] == b'\\' && octal {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_unescape_octal_escapes_decoded_others_kept() {
        assert_eq!(
            unescape(r"/run/a\040b/c\134d"),
            PathBuf::from("/run/a b/c\\d")
        );
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape(r"/end\04"), PathBuf::from(r"/end\04"));
    }

    #[test]
    fn test_submounts_are_relative_shallowest_first_with_their_read_only_flag() {
        let info = "90 30 0:40 / /run/p/mounts/c/mounts/0 ro shared:5 - tmpfs tmpfs rw\n\
                    91 90 0:41 / /run/p/mounts/c/mounts/0/a/b rw shared:6 - tmpfs tmpfs rw\n\
                    92 90 0:42 / /run/p/mounts/c/mounts/0/sub rw,nosuid shared:7 - tmpfs tmpfs rw\n\
                    93 90 0:43 / /run/p/mounts/c/mounts/0/sub ro shared:8 - tmpfs tmpfs rw\n\
                    94 30 0:44 / /run/p/mounts/c/mounts/01 rw shared:9 - tmpfs tmpfs rw\n";
        assert_eq!(
            submounts_in(info, Path::new("/run/p/mounts/c/mounts/0")),
            vec![(PathBuf::from("sub"), true), (PathBuf::from("a/b"), false),]
        );
    }

    #[test]
    fn test_mount_points_are_the_fifth_field() {
        let info = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                    90 30 0:40 / /run/accordion/p/mounts rw shared:5 - tmpfs tmpfs rw\n\
                    91 30 0:40 / /run/accordion/p/share ro master:5 - tmpfs tmpfs rw\n";
        let points: Vec<PathBuf> = mount_points(info).collect();
        assert_eq!(
            points,
            vec![
                PathBuf::from("/proc"),
                PathBuf::from("/run/accordion/p/mounts"),
                PathBuf::from("/run/accordion/p/share"),
            ]
        );
    }
}
