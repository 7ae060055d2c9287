//! A writer for the newc ("070701") cpio format the kernel unpacks as an initramfs.
//! Hand-written because it is ~60 lines and keeps packing independent of the host's cpio version.

use std::io::{self, Write};
use std::path::Path;

const TRAILER: &str = "TRAILER!!!";

pub struct Writer<W: Write> {
    out: W,
    written: u64,
    ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            ino: 1,
        }
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.raw(&[0u8; 3][..pad])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0, // uid: root
            0, // gid: root
            1, // nlink
            0, // mtime: fixed, so identical inputs give identical archives
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.raw(header.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad4()?;
        self.raw(data)?;
        self.pad4()
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, 0o040755, &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | perm, data)
    }

    pub fn file_from(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        let data = std::fs::read(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        self.file(name, perm, &data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120777, target.as_bytes())
    }

    /// Ends the archive, padded to 512 bytes so another segment may be appended after it
    /// (the kernel only finds an uncompressed segment at an aligned offset).
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, &[])?;
        let pad = (512 - (self.written % 512) as usize) % 512;
        self.raw(&vec![0u8; pad])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_archive_is_newc_aligned_and_terminated() {
        let mut w = Writer::new(Vec::new());
        w.dir("bin").unwrap();
        w.file("bin/x", 0o755, b"hello").unwrap();
        w.symlink("sh", "bin/x").unwrap();
        let bytes = w.finish().unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file's data starts on a 4-byte boundary right after its padded name.
        let pos = text.find("hello").unwrap();
        assert_eq!(pos % 4, 0);
    }
}
