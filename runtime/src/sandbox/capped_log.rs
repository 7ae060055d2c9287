//! Logs a guest fills at will, capped on disk, and a bounded read of their tail: the guest's
//! serial console, and virtiofsd's output (which the guest's requests can make it write).
//!
//! The guest writes its console at will (a hostile one floods it), and the logs live under /run,
//! a tmpfs shared with containerd and every other pod. So a log is two files that together never
//! exceed the configured cap: `<name>` takes writes until the next one would pass half the cap,
//! then its content moves to `<name>.1` (replacing the older half) and `<name>` starts again
//! empty. What a user reads in an error message is only the tail, read from the ends of those
//! files with a fixed-size buffer.
//!
//! Both files are opened once, at creation; rotating copies between the open files and truncates
//! (no path is looked up, renamed or opened again). The console is written from the vCPU that
//! wrote the UART's register, and that keeps the calls it makes to ones on open files.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How many bytes of a log's end an error message reads at most.
pub const TAIL_BYTES: usize = 16 * 1024;

/// The older half of the log at `path`: `<path>.1`.
fn rotated_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".1");
    PathBuf::from(name)
}

/// A log of at most `max_bytes` on disk (both files together).
#[derive(Debug)]
pub struct CappedLog {
    /// `None` after a rotation failed: output is dropped rather than written past the cap.
    file: Option<File>,
    /// `<name>.1`, the older half.
    older: File,
    /// Bytes in `file`.
    len: u64,
    /// The most one file may hold: half the cap.
    half: u64,
}

impl CappedLog {
    /// Creates (truncates) the log at `path` and its older half `<path>.1` (a stale one from
    /// an earlier run is emptied). `max_bytes` is the cap of both files together; odd bytes are
    /// not used.
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let older = open_new(&rotated_path(path))?;
        let file = open_new(path)?;
        Ok(Self {
            file: Some(file),
            older,
            len: 0,
            half: max_bytes / 2,
        })
    }

    /// The two open files (current, older) and the cap, to hand to another process, which
    /// continues the log with [`CappedLog::from_files`].
    pub fn into_files(self) -> io::Result<(File, File, u64)> {
        let current = self
            .file
            .ok_or_else(|| io::Error::other("the log could not be rotated"))?;
        Ok((current, self.older, self.half * 2))
    }

    /// Continues a log from its two open files (as [`CappedLog::into_files`] gave them).
    pub fn from_files(mut current: File, older: File, max_bytes: u64) -> io::Result<Self> {
        let len = current.seek(SeekFrom::End(0))?;
        Ok(Self {
            file: Some(current),
            older,
            len,
            half: max_bytes / 2,
        })
    }

    /// Moves the current half's content into the older one and starts the current one over.
    fn rotate(&mut self) -> io::Result<()> {
        // Taken first: should anything below fail, there is no file to write to and nothing
        // is written past the cap.
        let Some(mut current) = self.file.take() else {
            return Err(io::Error::other("the log could not be rotated"));
        };
        self.older.set_len(0)?;
        self.older.seek(SeekFrom::Start(0))?;
        current.seek(SeekFrom::Start(0))?;
        // File to file: the kernel copies (copy_file_range), no buffer of half the cap here.
        io::copy(&mut (&current).take(self.len), &mut self.older)?;
        current.set_len(0)?;
        current.seek(SeekFrom::Start(0))?;
        self.file = Some(current);
        self.len = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.half == 0 {
            return Ok(buf.len());
        }
        // One write bigger than a half keeps only its end (never the case for the UART, which
        // writes a byte at a time).
        let half = usize::try_from(self.half).unwrap_or(usize::MAX);
        let data = &buf[buf.len().saturating_sub(half)..];
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if self.len.saturating_add(len) > self.half {
            self.rotate()?;
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the log could not be rotated"))?;
        file.write_all(data)?;
        self.len += len;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A new, empty log file, owner-only; never through a symlink. Readable too: rotation copies
/// from it.
fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// The last `lines` lines of the log at `path`, read from at most [`TAIL_BYTES`] of the files'
/// ends: what a user needs when a guest fails to come up. Control characters the guest wrote are
/// shown escaped, so the text is safe to print on a terminal.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut window = vec![0u8; TAIL_BYTES];
    let (newest, newest_size) = read_end(path, &mut window);
    window.truncate(newest);
    // A short newest half is preceded by the end of the older one.
    let mut older = vec![0u8; TAIL_BYTES - newest];
    let (got, older_size) = read_end(&rotated_path(path), &mut older);
    older.truncate(got);
    older.extend_from_slice(&window);
    let mut bytes = older.as_slice();
    let cut = newest_size.saturating_add(older_size) > u64::try_from(bytes.len()).unwrap_or(0);
    if cut {
        // The window began inside a line: that fragment is not a line the guest wrote.
        if let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            bytes = &bytes[nl + 1..];
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let mut kept: Vec<String> = text.lines().rev().take(lines).map(printable).collect();
    kept.reverse();
    let tail = kept.join("\n");
    if tail.trim().is_empty() {
        "(the log is empty)".to_string()
    } else {
        tail
    }
}

/// Reads the last `buf.len()` bytes of `path` (fewer if it is shorter) into the start of `buf`.
/// Returns how many, and the file's size. A missing or unreadable file reads as empty.
fn read_end(path: &Path, buf: &mut [u8]) -> (usize, u64) {
    let Ok(mut file) = File::open(path) else {
        return (0, 0);
    };
    let Ok(size) = file.metadata().map(|m| m.len()) else {
        return (0, 0);
    };
    let want = u64::try_from(buf.len()).unwrap_or(u64::MAX).min(size);
    if file.seek(SeekFrom::Start(size - want)).is_err() {
        return (0, size);
    }
    let want = usize::try_from(want).unwrap_or(buf.len());
    let mut got = 0;
    while got < want {
        match file.read(&mut buf[got..want]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (got, size)
}

/// `line` with carriage returns dropped and other control characters escaped.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        match c {
            '\r' => {}
            '\t' => out.push(c),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("accordion-console-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }
    }

    impl TempDir {
        /// The log under test.
        fn log(&self) -> PathBuf {
            self.0.join("console.log")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn on_disk(dir: &TempDir) -> u64 {
        [dir.log(), rotated_path(&dir.log())]
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum()
    }

    #[test]
    fn test_console_flood_byte_by_byte_never_exceeds_the_cap_and_keeps_newest_lines() {
        let dir = TempDir::new("flood");
        const CAP: u64 = 64 * 1024;
        let mut log = CappedLog::create(&dir.log(), CAP).expect("create");
        let mut largest = 0;
        // 2 MiB of lines, 32x the cap, one byte per write as the UART writes them.
        for i in 0..60_000u32 {
            for byte in format!("guest line {i:08} xxxxxxxxxxxxxxx\r\n").bytes() {
                assert_eq!(log.write(&[byte]).expect("write"), 1);
            }
            if i % 64 == 0 {
                largest = largest.max(on_disk(&dir));
            }
        }
        largest = largest.max(on_disk(&dir));
        assert!(largest <= CAP, "{largest} bytes on disk, cap {CAP}");
        assert!(largest > CAP / 2, "the older half was not kept: {largest}");
        assert_eq!(
            tail(&dir.log(), 3),
            "guest line 00059997 xxxxxxxxxxxxxxx\n\
             guest line 00059998 xxxxxxxxxxxxxxx\n\
             guest line 00059999 xxxxxxxxxxxxxxx"
        );
    }

    #[test]
    fn test_console_tail_joins_the_rotated_half_and_the_new_one() {
        let dir = TempDir::new("join");
        // Halves of 40 bytes: the third line starts a new file.
        let mut log = CappedLog::create(&dir.log(), 80).expect("create");
        for line in ["one 0123456789\n", "two 0123456789\n", "three 01234567\n"] {
            log.write_all(line.as_bytes()).expect("write");
        }
        assert_eq!(
            std::fs::read_to_string(rotated_path(&dir.log())).expect("rotated"),
            "one 0123456789\ntwo 0123456789\n"
        );
        assert_eq!(
            tail(&dir.log(), 25),
            "one 0123456789\ntwo 0123456789\nthree 01234567"
        );
        assert_eq!(tail(&dir.log(), 1), "three 01234567");
    }

    #[test]
    fn test_console_write_larger_than_half_keeps_its_end() {
        let dir = TempDir::new("big-write");
        let mut log = CappedLog::create(&dir.log(), 16).expect("create");
        let data = b"0123456789abcdefXYZW\n";
        assert_eq!(log.write(data).expect("write"), data.len());
        assert!(on_disk(&dir) <= 16);
        assert_eq!(tail(&dir.log(), 5), "defXYZW");
    }

    #[test]
    fn test_console_tail_of_a_huge_log_reads_only_its_end() {
        let dir = TempDir::new("huge");
        // A 1 TiB (sparse) log: reading it whole could not even be allocated.
        let mut file = File::create(dir.log()).expect("create");
        file.set_len(1 << 40).expect("sparse file");
        file.seek(SeekFrom::End(0)).expect("seek");
        file.write_all(b"\nKernel panic - not syncing: VFS\n---[ end ]---\n")
            .expect("write");
        assert_eq!(
            tail(&dir.log(), 2),
            "Kernel panic - not syncing: VFS\n---[ end ]---"
        );
    }

    #[test]
    fn test_console_tail_drops_a_line_cut_by_the_window() {
        let dir = TempDir::new("cut");
        let long = "x".repeat(TAIL_BYTES);
        std::fs::write(dir.log(), format!("{long}\nlast\n")).expect("write");
        assert_eq!(tail(&dir.log(), 25), "last");
    }

    #[test]
    fn test_console_tail_escapes_control_characters() {
        let dir = TempDir::new("escape");
        std::fs::write(dir.log(), "ok\r\n\x1b[2J\x1b]0;owned\x07title\tend\r\n").expect("write");
        assert_eq!(
            tail(&dir.log(), 25),
            "ok\n\\u{1b}[2J\\u{1b}]0;owned\\u{7}title\tend"
        );
    }

    #[test]
    fn test_console_tail_of_missing_or_empty_log_says_empty() {
        let dir = TempDir::new("empty");
        assert_eq!(tail(&dir.log(), 25), "(the log is empty)");
        CappedLog::create(&dir.log(), 1024).expect("create");
        assert_eq!(tail(&dir.log(), 25), "(the log is empty)");
    }

    #[test]
    fn test_console_rotation_keeps_writing_after_the_files_were_renamed_away() {
        // The files are never looked up by name after creation: someone moving them (or a
        // symlink planted at the name) changes nothing about where the output goes.
        let dir = TempDir::new("moved");
        let mut log = CappedLog::create(&dir.log(), 40).expect("create");
        log.write_all(
            b"first 0123456789
",
        )
        .expect("write");
        let moved = dir.0.join("moved.log");
        std::fs::rename(dir.log(), &moved).expect("rename");
        std::os::unix::fs::symlink("/etc/passwd", dir.log()).expect("symlink");
        log.write_all(
            b"second 012345678
",
        )
        .expect("rotates");
        assert_eq!(
            std::fs::read_to_string(&moved).expect("moved"),
            "second 012345678\n"
        );
        assert_eq!(
            std::fs::read_to_string(rotated_path(&dir.log())).expect("older"),
            "first 0123456789\n"
        );
    }

    #[test]
    fn test_console_create_removes_a_stale_rotated_half() {
        let dir = TempDir::new("stale");
        std::fs::write(rotated_path(&dir.log()), "old boot\n").expect("write");
        let mut log = CappedLog::create(&dir.log(), 1024).expect("create");
        log.write_all(b"new boot\n").expect("write");
        assert_eq!(tail(&dir.log(), 25), "new boot");
    }
}
