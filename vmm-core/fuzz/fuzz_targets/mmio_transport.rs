//! The virtio-mmio transport driven by any sequence of register reads and writes (any offset,
//! width and value) interleaved with the device manager's servicing (which activates), in front
//! of a device that checks what the transport hands it.
//!
//! Checked on every input: no panic, no allocation above MAX_ALLOCATION; the device is activated
//! only with the features it offered (VERSION_1 among them), only once between resets, and only
//! with ready queues of a valid size whose rings lie in guest memory; the identification
//! registers never change.
#![no_main]

use std::sync::{Arc, Mutex};

use accordion_vmm::bus::MmioDevice;
use accordion_vmm::devices::irq::IrqLine;
use accordion_vmm::devices::virtio::mmio::MmioTransport;
use accordion_vmm::devices::virtio::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use accordion_vmm_fuzz::{Input, MEMORY};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const SIZES: [u16; 2] = [16, 8];
const FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b101;
const MAX_ACCESSES: usize = 256;

/// A device that asserts the transport's promises.
struct Checker {
    active: Arc<Mutex<bool>>,
}

impl VirtioDevice for Checker {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &SIZES
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        accordion_vmm::devices::virtio::read_config_space(&3u64.to_le_bytes(), offset, data);
    }
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        acked: u64,
        queues: Vec<Queue>,
        _: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut active = self.active.lock().expect("not poisoned");
        assert!(!*active, "activated twice without a reset");
        assert_eq!(acked & !FEATURES, 0, "features never offered");
        assert_ne!(acked & VIRTIO_F_VERSION_1, 0, "activated without VERSION_1");
        assert_eq!(queues.len(), SIZES.len());
        for (q, &max) in queues.iter().zip(&SIZES) {
            assert!(
                q.size() <= max && q.size().is_power_of_two(),
                "queue size {}",
                q.size()
            );
            if q.ready() {
                assert!(q.is_valid(&memory), "a ready queue outside guest memory");
            }
        }
        *active = true;
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        assert!(usize::from(index) < SIZES.len(), "notify of queue {index}");
        assert!(
            *self.active.lock().expect("not poisoned"),
            "notify before activation"
        );
    }
    fn reset(&mut self) -> bool {
        *self.active.lock().expect("not poisoned") = false;
        true
    }
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
    let active = Arc::new(Mutex::new(false));
    let device = Box::new(Checker {
        active: active.clone(),
    });
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(16).expect("eventfd")));
    let mut t = MmioTransport::new(device, memory, interrupt);
    for _ in 0..MAX_ACCESSES {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        if op >= 0xf0 {
            // The device manager's thread gets its turn between two register accesses.
            t.service();
            continue;
        }
        // Mostly the register block (0x000..0x100), sometimes the config space behind it.
        let offset = u64::from(input.u16() % 0x180);
        let width = [4usize, 1, 2, 8][usize::from(op >> 1) % 4];
        if op & 1 == 1 {
            let value = u64::from(input.u32()) | (u64::from(input.u32()) << 32);
            t.write(offset, &value.to_le_bytes()[..width]);
        } else {
            let mut data = vec![0u8; width];
            t.read(offset, &mut data);
        }
        assert_eq!(read32(&mut t, 0x000), 0x7472_6976, "MagicValue");
        assert_eq!(read32(&mut t, 0x004), 2, "Version");
        assert_eq!(read32(&mut t, 0x008), 19, "DeviceID");
    }
});
