//! The virtio-mmio transport (modern, version 2): the register block the guest's virtio_mmio
//! driver programs, in front of one `VirtioDevice`.
//!
//! Everything the driver writes is guest-controlled: bad values leave the device unactivated (and,
//! after activation failures, flagged DEVICE_NEEDS_RESET); nothing here panics on them, and every
//! line a guest can make us log is rate-limited. Queue registers are checked here rather than by
//! virtio-queue's setters, which log every refused value.
//!
//! Register accesses run on the vCPU thread that exited. Activating the device (spawning its
//! back-end thread, the vhost-user handshake) is only recorded there and done by
//! [`MmioTransport::service`] on the device manager's thread, which the transport's waker wakes
//! (docs/architecture.md, "Device manager"); queue notifications that arrive between DRIVER_OK
//! and the activation are kept and delivered right after it. A reset stays synchronous: Linux's
//! virtio_mmio does not wait for it before it frees the rings, so the device must have stopped
//! using them when the vCPU's write returns.

use std::sync::Arc;

use log::Level;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{VirtioDevice, VirtioInterrupt, INTERRUPT_CONFIG, VIRTIO_F_VERSION_1};
use crate::bus::MmioDevice;
use crate::log_limited;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID reported to the guest: "ACCD".
const VENDOR_ID: u32 = 0x4443_4341;
/// Start of the device-specific configuration space.
const CONFIG_SPACE: u64 = 0x100;
/// Offset of QueueNotify: devices served outside the VMM (vhost-user) get a KVM ioeventfd here
/// per queue, with the queue index as datamatch.
pub const QUEUE_NOTIFY: u64 = 0x050;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// DRIVER_OK was set; [`Self::service`] activates the device.
    activation_pending: bool,
    /// Queues notified while activation was deferred (bit per queue index).
    early_notifies: u64,
    /// Wakes the thread that calls [`Self::service`].
    waker: Option<Waker>,
}

/// Wakes the device manager's thread to service a transport (set once it is attached).
pub type Waker = Box<dyn Fn() + Send>;

impl MmioTransport {
    /// Wraps `device`; `interrupt` is its line to the GIC.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // Queue::new only fails for sizes that are not a power of two; a device bug.
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        Self {
            device,
            memory,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            activation_pending: false,
            early_notifies: 0,
            waker: None,
        }
    }

    /// Sets what wakes the thread that services this transport.
    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    /// Activates the device if the driver set DRIVER_OK since the last call, then delivers the
    /// queue notifications that came before. Called on the device manager's thread; a no-op
    /// when nothing is pending.
    pub fn service(&mut self) {
        if !std::mem::take(&mut self.activation_pending) {
            return;
        }
        let early = std::mem::take(&mut self.early_notifies);
        self.activate();
        if self.activated {
            for index in (0..64u16).filter(|i| early & (1 << i) != 0) {
                self.device.queue_notify(index);
            }
        }
    }

    /// The device status byte as the driver last set it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers may only change before DRIVER_OK (virtio 1.2 §4.2.2.3).
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let half = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => half(self.device.features(), self.device_features_select),
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => {
                let broken = if self.interrupt.needs_reset() {
                    status::DEVICE_NEEDS_RESET
                } else {
                    0
                };
                self.status | broken
            }
            reg::CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            // No device has shared memory regions. A length of -1 says so (virtio 1.2 §4.2.2);
            // 0 would describe an empty region at address 0, which Linux's virtio-fs with DAX
            // (Debian's kernel) then fails to reserve, failing the probe with EBUSY.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                log_limited!(
                    Level::Debug,
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_u32(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => self.set_driver_features(value),
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Zero, too large or not a power of 2: the size stays as it was.
                    let size = u16::try_from(value).ok();
                    if size.is_none_or(|size| q.try_set_size(size).is_err()) {
                        log_limited!(Level::Warn, "virtio-mmio: refusing queue size {value}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                self.set_queue_address(Ring::Desc, offset == reg::QUEUE_DESC_HIGH, value)
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                self.set_queue_address(Ring::Avail, offset == reg::QUEUE_DRIVER_HIGH, value)
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                self.set_queue_address(Ring::Used, offset == reg::QUEUE_DEVICE_HIGH, value)
            }
            reg::QUEUE_NOTIFY => match u16::try_from(value) {
                Ok(index) if usize::from(index) < self.queues.len() => {
                    if self.activated {
                        self.device.queue_notify(index);
                    } else if self.activation_pending && index < 64 {
                        self.early_notifies |= 1 << index;
                    }
                }
                _ => {}
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(value),
            _ => log_limited!(
                Level::Debug,
                "virtio-mmio: write of read-only or unknown register {offset:#x}"
            ),
        }
    }

    /// Sets the low or high half of one of the selected queue's ring addresses; a misaligned
    /// address is refused (the ring keeps its old one).
    fn set_queue_address(&mut self, ring: Ring, high: bool, value: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        let state = q.state();
        let old = match ring {
            Ring::Desc => state.desc_table,
            Ring::Avail => state.avail_ring,
            Ring::Used => state.used_ring,
        };
        let new = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        let set = match ring {
            Ring::Desc => q.try_set_desc_table_address(GuestAddress(new)),
            Ring::Avail => q.try_set_avail_ring_address(GuestAddress(new)),
            Ring::Used => q.try_set_used_ring_address(GuestAddress(new)),
        };
        if set.is_err() {
            log_limited!(
                Level::Warn,
                "virtio-mmio: refusing misaligned {ring:?} ring address {new:#x}"
            );
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        // Features are frozen once FEATURES_OK is set.
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        let mut accepted = value;
        if new_bits & status::FEATURES_OK != 0 {
            // The driver may only accept what was offered, and must speak virtio 1.
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log_limited!(
                    Level::Warn,
                    "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.driver_features
                );
                accepted &= !status::FEATURES_OK;
            }
        }
        self.status = accepted;
        if new_bits & status::DRIVER_OK != 0 && !self.activated && !self.activation_pending {
            self.activation_pending = true;
            if let Some(wake) = &self.waker {
                wake();
            }
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            self.fail("DRIVER_OK without FEATURES_OK".into());
            return;
        }
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !rings_in_memory(q, &self.memory))
        {
            self.fail(format!("queue {i} is not valid in guest memory"));
            return;
        }
        // The device gets its own copies; the transport keeps the registers' view for reads.
        let queues: Vec<Queue> = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect()
        {
            Ok(queues) => queues,
            Err(e) => {
                self.fail(format!("bad queue configuration: {e}"));
                return;
            }
        };
        match self.device.activate(
            self.memory.clone(),
            self.driver_features,
            queues,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(e.to_string()),
        }
    }

    /// Flags the device as broken for the driver (DEVICE_NEEDS_RESET + config interrupt).
    fn fail(&mut self, why: String) {
        log_limited!(
            Level::Error,
            "virtio device {} cannot start: {why}",
            self.device.device_type()
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.raise(INTERRUPT_CONFIG);
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            log_limited!(
                Level::Warn,
                "virtio device {} cannot be reset; it stays stopped",
                self.device.device_type()
            );
        }
        self.activated = false;
        // An activation still pending goes with the state it was for.
        self.activation_pending = false;
        self.early_notifies = 0;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.interrupt.clear();
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// A queue's three rings.
#[derive(Debug, Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// Whether `q`'s rings lie in guest memory (virtio-queue's `is_valid` says the same, but logs).
fn rings_in_memory(q: &Queue, memory: &GuestMemoryMmap) -> bool {
    let state = q.state();
    let size = u64::from(state.size);
    // Descriptor table 16 bytes per entry; avail and used rings: flags, idx, the ring, an event.
    [
        (state.desc_table, 16 * size),
        (state.avail_ring, 6 + 2 * size),
        (state.used_ring, 6 + 8 * size),
    ]
    .iter()
    .all(|&(addr, len)| memory.check_range(GuestAddress(addr), len as usize))
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such (virtio 1.2 §4.2.2.2).
        let value = if data.len() == 4 && offset % 4 == 0 {
            self.read_u32(offset)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_u32(offset, u32::from_le_bytes(bytes)),
            _ => log_limited!(
                Level::Debug,
                "virtio-mmio: ignoring {}-byte write at {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::IrqLine;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// Records what the transport does to it.
    #[derive(Default)]
    struct Record {
        activated: Option<(u64, Vec<u16>)>,
        notified: Vec<u16>,
        resets: usize,
    }

    struct Dummy(Arc<Mutex<Record>>);

    const QUEUE_SIZES: [u16; 2] = [256, 128];

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &QUEUE_SIZES
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0x1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = 3u64.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            features: u64,
            queues: Vec<Queue>,
            _: Arc<VirtioInterrupt>,
        ) -> Result<(), super::super::ActivateError> {
            self.0.lock().unwrap().activated =
                Some((features, queues.iter().map(|q| q.size()).collect()));
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.0.lock().unwrap().notified.push(index);
        }
        fn reset(&mut self) -> bool {
            self.0.lock().unwrap().resets += 1;
            true
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>, IrqLine) {
        let record = Arc::new(Mutex::new(Record::default()));
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x4000_0000), 1 << 20)]).unwrap();
        let line = IrqLine::new(16).unwrap();
        let observer = line.try_clone().unwrap();
        let t = MmioTransport::new(
            Box::new(Dummy(record.clone())),
            memory,
            Arc::new(VirtioInterrupt::new(line)),
        );
        (t, record, observer)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A register write, then what the device manager's thread does before the vCPU's next
    /// access (in the tests' own thread).
    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
        t.service();
    }

    /// What Linux's virtio_mmio does to bring a device up, with queues in guest RAM.
    fn bring_up(t: &mut MmioTransport, driver_features_high: u32) {
        set_up(t, driver_features_high);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Everything of [`bring_up`] before DRIVER_OK.
    fn set_up(t: &mut MmioTransport, driver_features_high: u32) {
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, driver_features_high);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 0x1);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for (i, size) in [(0u32, 256u32), (1, 64)] {
            let base = 0x4000_0000 + u64::from(i) * 0x4000;
            w(t, reg::QUEUE_SEL, i);
            w(t, reg::QUEUE_NUM, size);
            w(t, reg::QUEUE_DESC_LOW, base as u32);
            w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            w(t, reg::QUEUE_READY, 1);
        }
    }

    #[test]
    fn test_activation_waits_for_the_device_manager_and_gets_earlier_notifies() {
        let (mut t, record, _) = transport();
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = wakes.clone();
        t.set_waker(Box::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        set_up(&mut t, 1);
        let driver_ok =
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        // The vCPU's writes only: DRIVER_OK, then kicks of both queues (one twice, one bogus).
        t.write(reg::STATUS, &driver_ok.to_le_bytes());
        for queue in [1u32, 0, 1, 7] {
            t.write(reg::QUEUE_NOTIFY, &queue.to_le_bytes());
        }
        assert_eq!(wakes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            record.lock().unwrap().activated.is_none(),
            "activated on the vCPU"
        );
        assert!(record.lock().unwrap().notified.is_empty());
        assert_eq!(r(&mut t, reg::STATUS), driver_ok);

        t.service();
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.activated,
            Some((VIRTIO_F_VERSION_1 | 0x1, vec![256, 64]))
        );
        assert_eq!(
            rec.notified,
            vec![0, 1],
            "each kicked queue once, none other"
        );
        drop(rec);
        t.service();
        assert_eq!(
            record.lock().unwrap().notified,
            vec![0, 1],
            "serviced twice"
        );
    }

    #[test]
    fn test_reset_before_the_device_manager_ran_drops_the_activation() {
        let (mut t, record, _) = transport();
        set_up(&mut t, 1);
        let driver_ok =
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        t.write(reg::STATUS, &driver_ok.to_le_bytes());
        t.write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
        t.write(reg::STATUS, &0u32.to_le_bytes());
        t.service();
        let rec = record.lock().unwrap();
        assert!(rec.activated.is_none());
        assert!(rec.notified.is_empty());
        assert_eq!(rec.resets, 0, "nothing was running to reset");
    }

    #[test]
    fn test_identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 19);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 128);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
    }

    #[test]
    fn test_linux_style_bring_up_activates_with_negotiated_features_and_queue_sizes() {
        let (mut t, record, _) = transport();
        bring_up(&mut t, 1);
        assert_eq!(
            record.lock().unwrap().activated,
            Some((VIRTIO_F_VERSION_1 | 1, vec![256, 64]))
        );
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn test_driver_without_version_1_gets_no_features_ok_and_no_activation() {
        let (mut t, record, _) = transport();
        bring_up(&mut t, 0);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(record.lock().unwrap().activated.is_none());
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn test_queue_outside_guest_memory_fails_activation_with_needs_reset_and_interrupt() {
        let (mut t, record, irq) = transport();
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        bring_up(&mut t, 1);
        // bring_up rewrote only the low half of queue 0's descriptor address.
        assert!(record.lock().unwrap().activated.is_none());
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn test_notify_reaches_device_only_after_activation_and_for_existing_queues() {
        let (mut t, record, _) = transport();
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        bring_up(&mut t, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 7);
        assert_eq!(record.lock().unwrap().notified, vec![1]);
    }

    #[test]
    fn test_status_zero_resets_device_and_queues() {
        let (mut t, record, _) = transport();
        bring_up(&mut t, 1);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn test_device_error_shows_as_needs_reset_until_the_driver_resets() {
        let (mut t, _, _) = transport();
        bring_up(&mut t, 1);
        t.interrupt.device_error();
        let broken = r(&mut t, reg::STATUS);
        w(&mut t, reg::STATUS, 0);
        assert_ne!(broken & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn test_shared_memory_regions_read_as_absent() {
        let (mut t, _, _) = transport();
        w(&mut t, 0x0ac, 0);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
    }

    #[test]
    fn test_config_space_reads_go_to_the_device() {
        let (mut t, _, _) = transport();
        let mut cid = [0u8; 8];
        t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
    }

    #[test]
    fn test_queue_size_past_16_bits_is_refused_not_truncated() {
        let (mut t, _, _) = transport();
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 0x1_0010);
        w(&mut t, reg::QUEUE_NUM, 3);
        assert_eq!(t.queues[0].size(), 256);
    }

    #[test]
    fn test_misaligned_ring_addresses_are_refused() {
        let (mut t, _, _) = transport();
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x4000_1008);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x4000_2001);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x4000_3002);
        w(&mut t, reg::QUEUE_DEVICE_HIGH, 1);
        let state = t.queues[0].state();
        assert_eq!(
            (state.desc_table, state.avail_ring, state.used_ring),
            (0, 0, 0x1_0000_0000)
        );
    }

    #[test]
    fn test_byte_access_to_a_register_is_ignored() {
        let (mut t, _, _) = transport();
        let mut b = [0xffu8; 1];
        t.read(reg::MAGIC, &mut b);
        t.write(reg::STATUS, &[1]);
        assert_eq!(b, [0]);
        assert_eq!(t.status(), 0);
    }
}
