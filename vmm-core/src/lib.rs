//! Accordion's microVM core: an ARM64 KVM virtual machine as a Rust API.
//!
//! ```no_run
//! use accordion_vmm::{Vm, VmConfig};
//! let mut config = VmConfig::new("/opt/accordion/share/guest/Image");
//! config.initrd = Some("/opt/accordion/share/guest/initrd.cpio".into());
//! config.max_vcpus = 128;
//! let vm = Vm::start(config)?;
//! println!("guest stopped: {:?}", vm.wait());
//! # Ok::<(), accordion_vmm::VmError>(())
//! ```

pub mod acpi;
pub mod arch;
pub mod bus;
pub mod config;
#[cfg(target_arch = "aarch64")]
mod device_manager;
pub mod devices;
pub mod exit;
#[cfg(target_arch = "aarch64")]
mod machine;
pub mod memory;
pub mod platform;
pub mod ratelimit;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

/// An error and its sources on one line (`a: b: c`), for log lines and error messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub use config::{ConfigError, FsConfig, InputFile, NetConfig, VmConfig, VsockConfig};
pub use devices::cpu_hotplug::{CpuHotplugError, HotplugRequest};
pub use exit::{ExitReason, ExitWatch};
pub use vcpu::{VcpuEvent, VcpuState};
pub use vm::{MemoryRequest, MemoryResizeError, Vm, VmError, VmMemory};
