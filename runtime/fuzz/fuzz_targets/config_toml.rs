//! config.toml (or a runtime option's inline ConfigBody) through parsing and validation.
//!
//! Invariants: nothing panics; a configuration that parses is within every documented bound, and
//! sizes a pod without resources to its defaults.

#![no_main]

use std::path::Path;

use accordion_runtime::config::{
    Config, CONSOLE_MAX_KIB, CONSOLE_MIN_KIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB, VCPU_LIMIT,
};
use accordion_runtime::shim::pod::PodSize;
use accordion_runtime::shim::spec::SandboxResources;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(Path::new("/etc/accordion/config.toml"), text) else {
        return;
    };
    let v = &config.vcpus;
    assert!(1 <= v.min && v.min <= v.default && v.default <= v.max && v.max <= VCPU_LIMIT);
    assert!((MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory.default_mib));
    assert!((CONSOLE_MIN_KIB..=CONSOLE_MAX_KIB).contains(&config.console.max_kib));
    assert_eq!(config.console_max_bytes(), config.console.max_kib * 1024);
    let t = &config.timeouts;
    assert!(
        t.agent_ready_secs >= 1
            && t.agent_call_secs >= 1
            && t.container_call_secs >= 1
            && t.resize_secs >= 1
    );
    assert!(config.guest.kernel.is_absolute() && config.guest.initrd.is_absolute());
    assert!(config.virtiofsd.path.is_absolute());
    let size =
        PodSize::of(&SandboxResources::default(), None, &config).expect("defaults size a pod");
    assert_eq!(size.vcpus, v.default);
    assert_eq!(size.memory_mib, config.memory.default_mib);
    // memory.max_mib gives room to grow in whole 128 MiB blocks, or none.
    if let Some(max) = size.max_memory_mib {
        assert!(max > size.memory_mib && max <= config.memory.max_mib);
        assert_eq!((max - size.memory_mib) % 128, 0);
    }
});
