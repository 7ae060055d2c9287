//! virtio-net's TX (and RX) paths on fuzzed rings in fuzzed guest memory, with a datagram socket
//! pair standing in for the tap (a frame per read or write, as a tap is).
//!
//! Input: a little-endian u16 length and that many bytes of guest memory image, then actions.
//! Checked on every input: no panic, no allocation above MAX_ALLOCATION, and every frame that
//! reaches the "tap" carries a header the device wrote (all zero), never the guest's.
#![no_main]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use accordion_vmm::devices::fuzzing::{NetBackend, NET_MAX_FRAME};
use accordion_vmm::devices::irq::IrqLine;
use accordion_vmm::devices::virtio::net::tap::VNET_HDR_LEN;
use accordion_vmm::devices::virtio::VirtioInterrupt;
use accordion_vmm_fuzz::{guest_memory, guest_write, Input, Ring};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const RX: Ring = Ring::nth(0);
const TX: Ring = Ring::nth(1);
const MAX_ACTIONS: usize = 128;

/// Every frame the tap side has received: a zero header, at most MAX_FRAME bytes.
fn check_wire(wire: &UnixDatagram) {
    let mut frame = vec![0u8; NET_MAX_FRAME + 1];
    while let Ok(n) = wire.recv(&mut frame) {
        assert!(n <= NET_MAX_FRAME, "a {n}-byte frame reached the tap");
        assert!(
            n >= VNET_HDR_LEN,
            "a frame without its header reached the tap"
        );
        assert_eq!(
            frame[..VNET_HDR_LEN],
            [0u8; VNET_HDR_LEN],
            "the guest's header reached the tap"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let image_len = usize::from(input.u16());
    let memory = guest_memory(input.bytes(image_len));
    let (ours, wire) = UnixDatagram::pair().expect("a socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    wire.set_nonblocking(true).expect("non-blocking");
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).expect("eventfd")));
    let (stop, kick) = (
        EventFd::new(0).expect("eventfd"),
        EventFd::new(0).expect("eventfd"),
    );
    let queues = vec![RX.queue(), TX.queue()];
    let mut backend = NetBackend::new(
        OwnedFd::from(ours),
        memory.clone(),
        queues,
        interrupt,
        &stop,
        &kick,
    )
    .expect("a virtio-net back end");
    for _ in 0..MAX_ACTIONS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 => backend.process_tx(),
            1 => backend.process_rx(),
            2 => {
                let b = input.u8();
                let ring = if b & 1 == 0 { RX } else { TX };
                ring.offer(&memory, u16::from(b >> 1));
            }
            3 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8() % 64);
                guest_write(&memory, addr, input.bytes(len));
            }
            // The host side sends a frame: its header (flags, gso_type, ...) is the fuzzer's.
            4 => {
                let len = usize::from(input.u16() % 2048);
                let _ = wire.send(input.bytes(len));
            }
            _ => check_wire(&wire),
        }
    }
    check_wire(&wire);
});
