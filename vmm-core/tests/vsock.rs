//! vsock round trips through the hybrid Unix socket, with a real guest (run in the ARM64 node:
//! `cargo xtask node-test --filter vsock`). The guest half is the `vsock_peer` example, which the
//! node has on its PATH; the test copies it into the guest initramfs.
//!
//! Skipped without KVM, the guest assets or vsock_peer, unless ACCORDION_REQUIRE_KVM=1.

// Test helpers: any failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use accordion_vmm::{ExitReason, Vm, VmConfig, VsockConfig};

mod common;
use common::{guest_dir, newc_entry, Console};

const TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_CID: u64 = 3;

fn vsock_peer() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("vsock_peer"))
        .find(|p| p.exists())
}

/// The peer binary when KVM, the guest assets and the peer are all here.
fn prerequisites() -> Option<PathBuf> {
    let why = match (accordion_vmm::platform::open_kvm(), vsock_peer()) {
        (Err(e), _) => format!("no usable KVM: {e}"),
        (Ok(_), None) => "vsock_peer is not on PATH".to_string(),
        (Ok(_), Some(_)) if !guest_dir().join("initrd.cpio").exists() => {
            format!("no guest assets in {}", guest_dir().display())
        }
        (Ok(_), Some(peer)) => return Some(peer),
    };
    assert!(!accordion_vmm::platform::kvm_required(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

fn read_line(stream: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

fn round_trips(kernel: &str) {
    let Some(peer) = prerequisites() else { return };
    let dir = std::env::temp_dir().join(format!("accordion-vsock-{}-{kernel}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");

    // Guest → host: the guest connects to host port 6000, i.e. `<uds>_6000`.
    let host_service = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let service = std::thread::spawn(move || {
        let (stream, _) = host_service.accept().unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let line = read_line(&stream);
        (&stream).write_all(b"world\n").unwrap();
        line
    });

    let mut initrd = std::fs::read(guest_dir().join("initrd.cpio")).unwrap();
    initrd.resize(initrd.len().next_multiple_of(512), 0);
    let script = "#!/bin/sh\n/accordion/vsock_peer listen 5000 &\n/accordion/vsock_peer connect 2 6000 hello\nwait\n";
    newc_entry(&mut initrd, "accordion", 0o040755, &[]);
    newc_entry(&mut initrd, "accordion/cmd", 0o100755, script.as_bytes());
    newc_entry(
        &mut initrd,
        "accordion/vsock_peer",
        0o100755,
        &std::fs::read(peer).unwrap(),
    );
    newc_entry(&mut initrd, "TRAILER!!!", 0, &[]);
    let initrd_path = dir.join("initrd.cpio");
    std::fs::write(&initrd_path, initrd).unwrap();

    let console = Console::default();
    let mut config = VmConfig::new(guest_dir().join(kernel));
    config.initrd = Some(initrd_path.into());
    config.console = Box::new(console.clone());
    config.vsock = Some(VsockConfig {
        cid: GUEST_CID,
        uds_path: uds.clone(),
        listener: None,
    });
    let vm = Vm::start(config).unwrap();

    // Host → guest: once the guest listens on 5000, CONNECT through the device's socket.
    let deadline = Instant::now() + TIMEOUT;
    while !console.text().contains("listening on 5000") {
        assert!(
            Instant::now() < deadline,
            "guest never listened:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A port nobody listens on: the guest refuses (RST) and the VMM closes the socket.
    let refused = UnixStream::connect(&uds).unwrap();
    refused.set_read_timeout(Some(TIMEOUT)).unwrap();
    (&refused).write_all(b"CONNECT 5999\n").unwrap();
    let refused_answer = read_line(&refused);

    let stream = UnixStream::connect(&uds).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    (&stream).write_all(b"CONNECT 5000\n").unwrap();
    let ok = read_line(&stream);
    (&stream).write_all(b"ping\n").unwrap();
    let echo = read_line(&stream);

    let reason = vm.wait_timeout(TIMEOUT);
    let guest_line = service.join().unwrap();
    drop(vm);
    std::fs::remove_dir_all(&dir).unwrap();
    let console = console.text();
    assert_eq!(refused_answer, "", "{console}");
    assert!(
        ok.starts_with("OK ") && ok.ends_with('\n'),
        "{ok:?}\n{console}"
    );
    assert_eq!(echo, "echo: ping\n", "{console}");
    assert_eq!(guest_line, "hello\n", "{console}");
    assert!(console.contains("vsock_peer: reply=world"), "{console}");
    assert_eq!(reason, Some(ExitReason::PowerOff), "{console}");
}

#[test]
fn test_vsock_round_trips_both_ways_with_the_minimal_kernel() {
    round_trips("Image");
}

#[test]
fn test_vsock_round_trips_both_ways_with_the_debian_kernel() {
    round_trips("Image-debian");
}
