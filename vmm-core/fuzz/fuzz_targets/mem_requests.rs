//! virtio-mem's request queue on fuzzed rings in fuzzed guest memory, interleaved with host
//! resizes: the device answers whatever the guest queues (plug, unplug, unplug-all, state, any
//! type, any range) against a 128 MiB region backed by a real memfd.
//!
//! Input: a little-endian u16 length and that many bytes of guest memory image (queue 0's rings
//! as in `Ring::nth(0)`), then actions, one byte each plus operands.
//! Checked on every input: no panic, no allocation above MAX_ALLOCATION; the plugged size is a
//! whole number of blocks inside the region and matches the block map; a plug never takes the
//! plugged size above the requested size; a host resize out of range changes nothing; and no
//! unplugged block keeps data: the harness writes into every plugged block (as the guest would),
//! so a discard that missed or hit the wrong range shows as data in an unplugged block.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use accordion_vmm::devices::irq::IrqLine;
use accordion_vmm::devices::virtio::mem::{Mem, MemoryControl, BLOCK_SIZE, REGION_ALIGN};
use accordion_vmm::devices::virtio::VirtioInterrupt;
use accordion_vmm_fuzz::{guest_memory, guest_write, Input, Ring, MEMORY};
use libfuzzer_sys::fuzz_target;

const QUEUE: Ring = Ring::nth(0);
const MAX_ACTIONS: usize = 128;
const REGION_BASE: u64 = 1 << 30;
const REGION: u64 = REGION_ALIGN;

fn memfd() -> File {
    // SAFETY: a valid NUL-terminated name and flags; the kernel returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(REGION).expect("size the memfd");
    file
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let image_len = usize::from(input.u16());
    let memory = guest_memory(input.bytes(image_len));
    let region = Arc::new(memfd());
    let device = Mem::new(REGION_BASE, REGION, region.clone()).expect("a valid region");
    let control = device.control();
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).expect("eventfd")));
    let mut backend = device
        .backend_for_fuzzing(memory.clone(), QUEUE.queue(), interrupt)
        .expect("a back end");
    for _ in 0..MAX_ACTIONS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 4 {
            0 => {
                let at = u64::from(input.u16()) % MEMORY as u64;
                let len = usize::from(input.u8());
                guest_write(&memory, at, input.bytes(len));
            }
            1 => QUEUE.offer(&memory, input.u16()),
            2 => {
                // Any size, in or out of the region: out of it must change nothing.
                let before = control.snapshot().requested;
                let bytes = u64::from(input.u16()) * (BLOCK_SIZE / 2);
                match control.set_requested(bytes) {
                    Ok(set) => assert!(set >= bytes && set <= REGION),
                    Err(_) => assert_eq!(control.snapshot().requested, before),
                }
            }
            _ => {
                let before = control.snapshot();
                backend.process();
                let after = control.snapshot();
                if after.plugged > before.plugged {
                    assert!(
                        after.plugged <= after.requested,
                        "plugged beyond the request"
                    );
                }
                check_region(&control, &region);
            }
        }
    }
});

/// The sizes agree with the block map, and no unplugged block holds data; then the harness
/// writes into every plugged block, as the guest would.
fn check_region(control: &MemoryControl, region: &File) {
    let s = control.snapshot();
    assert!(s.plugged <= REGION && s.plugged % BLOCK_SIZE == 0);
    assert!(s.requested <= REGION && s.requested % BLOCK_SIZE == 0);
    let map = control.plugged_blocks();
    assert_eq!(
        map.iter().filter(|p| **p).count() as u64 * BLOCK_SIZE,
        s.plugged,
        "the plugged size disagrees with the block map"
    );
    for (block, plugged) in (0u64..).zip(&map) {
        let mut byte = [0u8; 1];
        let last = (block + 1) * BLOCK_SIZE - 1;
        if *plugged {
            // The guest uses its plugged memory, up to the block's last byte.
            region
                .write_all_at(b"x", block * BLOCK_SIZE)
                .expect("write");
            region.write_all_at(b"x", last).expect("write");
        } else {
            for at in [block * BLOCK_SIZE, last] {
                region.read_exact_at(&mut byte, at).expect("read");
                assert_eq!(byte, [0], "unplugged block {block} still holds data");
            }
        }
    }
}
