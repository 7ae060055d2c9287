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
