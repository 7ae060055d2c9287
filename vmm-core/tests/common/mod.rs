//! Helpers shared by the node tests that boot real guests (boot.rs, hotplug.rs, vsock.rs).
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]
// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where the node keeps the guest kernels and initramfs (`ACCORDION_SHARE_DIR` overrides it).
pub fn guest_dir() -> PathBuf {
    let share =
        std::env::var_os("ACCORDION_SHARE_DIR").unwrap_or_else(|| "/opt/accordion/share".into());
    PathBuf::from(share).join("guest")
}

/// One VM at a time: the node has two CPUs, and the leak checks count this process's threads.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Hold this while a test's VM runs.
pub fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether KVM is usable here; skips (or fails under ACCORDION_REQUIRE_KVM=1) when it is not.
pub fn kvm_available() -> bool {
    match accordion_vmm::platform::open_kvm() {
        Ok(_) if guest_dir().join("initrd.cpio").exists() => true,
        result => {
            let why = match result {
                Err(e) => format!("no usable KVM: {e}"),
                Ok(_) => format!("no guest assets in {}", guest_dir().display()),
            };
            assert!(!accordion_vmm::platform::kvm_required(), "{why}");
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

/// The default initramfs plus a segment holding `script` as /accordion/cmd. The segment starts
/// 512-aligned: the kernel only finds an uncompressed segment at an aligned offset.
pub fn initrd_with(script: &str, name: &str) -> PathBuf {
    let mut image = std::fs::read(guest_dir().join("initrd.cpio")).unwrap();
    image.resize(image.len().next_multiple_of(512), 0);
    newc_entry(&mut image, "accordion", 0o040755, &[]);
    newc_entry(&mut image, "accordion/cmd", 0o100755, script.as_bytes());
    newc_entry(&mut image, "TRAILER!!!", 0, &[]);
    let path =
        std::env::temp_dir().join(format!("accordion-test-{}-{name}.cpio", std::process::id()));
    std::fs::write(&path, image).unwrap();
    path
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

/// A line for the node log that the test harness does not capture.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Threads of this process (a leak check).
pub fn tasks() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Open descriptors of this process (a leak check).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
