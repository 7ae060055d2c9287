//! virtio-net over a tap with a real guest (run in the ARM64 node: `cargo xtask node-test --filter
//! net`): the guest's interface has the MAC and MTU given, answers ping from the host side of the
//! tap, and a TCP stream from the guest arrives intact.
//!
//! Skipped without KVM or the guest assets, unless ACCORDION_REQUIRE_KVM=1.

// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use accordion_vmm::devices::virtio::net::tap::Tap;
use accordion_vmm::{ExitReason, NetConfig, Vm, VmConfig};

mod common;
use common::{guest_dir, initrd_with, kvm_available, one_vm_at_a_time, Console};

const TIMEOUT: Duration = Duration::from_secs(120);
const MAC: [u8; 6] = [0x02, 0xac, 0xc0, 0x00, 0x00, 0x02];

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Configures eth0, pings the host side, sends 512 KiB over TCP and prints their sha256.
const GUEST_SCRIPT: &str = r#"#!/bin/sh
ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0 || { echo "IFUP=failed"; exit 1; }
echo "MAC=$(cat /sys/class/net/eth0/address)"
echo "MTU=$(cat /sys/class/net/eth0/mtu)"
ping -c 3 -W 5 10.99.0.1 > /dev/null && echo "PING=ok" || echo "PING=failed"
dd if=/dev/urandom of=/payload bs=1024 count=512 2>/dev/null
echo "SENTSUM=$(sha256sum /payload | cut -d' ' -f1)"
nc 10.99.0.1 5000 < /payload && echo "SENT=ok" || echo "SENT=failed"
"#;

#[test]
fn test_guest_on_a_tap_has_the_mac_and_mtu_answers_ping_and_streams_tcp() {
    let _serial = one_vm_at_a_time();
    if !kvm_available() {
        return;
    }
    let tap = Tap::open("accnet0").unwrap();
    ip(&["addr", "add", "10.99.0.1/24", "dev", "accnet0"]);
    ip(&["link", "set", "accnet0", "up"]);
    let listener = TcpListener::bind("10.99.0.1:5000").unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut data = Vec::new();
        stream.read_to_end(&mut data).unwrap();
        data
    });

    let console = Console::default();
    let mut config = VmConfig::new(guest_dir().join("Image"));
    config.initrd = Some(initrd_with(GUEST_SCRIPT, "net").into());
    config.console = Box::new(console.clone());
    config.net = vec![NetConfig {
        tap: tap.into_fd(),
        mac: MAC,
        mtu: 1400,
    }];
    let vm = Vm::start(config).unwrap();
    let reason = vm.wait_timeout(TIMEOUT);
    drop(vm);
    let out = console.text();
    assert_eq!(reason, Some(ExitReason::PowerOff), "{out}");
    assert_eq!(
        console.value("MAC").as_deref(),
        Some("02:ac:c0:00:00:02"),
        "{out}"
    );
    assert_eq!(console.value("MTU").as_deref(), Some("1400"), "{out}");
    assert_eq!(console.value("PING").as_deref(), Some("ok"), "{out}");
    assert_eq!(console.value("SENT").as_deref(), Some("ok"), "{out}");
    let data = receiver.join().unwrap();
    assert_eq!(data.len(), 512 * 1024, "{out}");
    let sum = {
        let path = std::env::temp_dir().join("accordion-net-received");
        std::fs::write(&path, &data).unwrap();
        let out = Command::new("sha256sum").arg(&path).output().unwrap();
        let _ = std::fs::remove_file(&path);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(console.value("SENTSUM"), Some(sum), "{out}");
    // The tap was the device's: it is gone with the VM.
    assert!(!std::path::Path::new("/sys/class/net/accnet0").exists());
}
