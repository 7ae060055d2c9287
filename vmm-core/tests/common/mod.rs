//! Helpers shared by the node tests that boot real guests (boot.rs, vsock.rs).
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]
// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where the node keeps the guest kernels and initramfs (`ACCORDION_SHARE_DIR` overrides it).
pub fn guest_dir() -> PathBuf {
    let share =
        std::env::var_os("ACCORDION_SHARE_DIR").unwrap_or_else(|| "/opt/accordion/share".into());
    PathBuf::from(share).join("guest")
}

/// One newc cpio entry.
pub fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let header = format!(
        "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        0,
        mode,
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A console sink the test reads back.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The value of the first `key=value` line.
    pub fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.text()
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()).map(str::to_string))
    }
}
