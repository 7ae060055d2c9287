//! The console: a 16550 UART (vm-superio) whose output goes to the caller's sink.
//!
//! 16550 rather than PL011 because vm-superio implements it and Debian's and our kernels bind it
//! from ACPI `PNP0501` + SPCR (ENVIRONMENT.md §9); a PL011 would only change the `_HID`.

use std::io::Write;

use vm_superio::Serial;

use super::irq::IrqLine;
use crate::bus::MmioDevice;

/// The 16550's eight byte-wide registers.
const REGISTER_COUNT: u64 = 8;

/// A 16550 on the MMIO bus.
pub struct SerialDevice {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    errors_logged: bool,
}

impl SerialDevice {
    /// A UART raising `irq` and writing the guest's output to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq, out),
            errors_logged: false,
        }
    }
}

impl MmioDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The registers are bytes; wider or out-of-range reads see zeros (as 8250 drivers expect
        // from an 8-bit part).
        if let ([byte], Ok(reg)) = (&mut *data, u8::try_from(offset)) {
            if offset < REGISTER_COUNT {
                *byte = self.uart.read(reg);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([value], Ok(reg)) = (data, u8::try_from(offset)) else {
            return;
        };
        if offset >= REGISTER_COUNT {
            return;
        }
        if let Err(e) = self.uart.write(reg, *value) {
            // A broken console sink must not stop the guest; say so once.
            if !self.errors_logged {
                log::warn!("Serial console output failed: {e}");
                self.errors_logged = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink tests can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_bytes_written_to_thr_reach_the_console_sink() {
        let sink = Capture::default();
        let mut uart = SerialDevice::new(IrqLine::new(1).unwrap(), Box::new(sink.clone()));
        for b in b"ok\n" {
            uart.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"ok\n");
    }

    #[test]
    fn test_enabling_thr_interrupt_raises_the_irq_line() {
        let irq = IrqLine::new(1).unwrap();
        let observer = irq.try_clone().unwrap();
        let mut uart = SerialDevice::new(irq, Box::new(std::io::sink()));
        uart.write(1, &[0x02]); // IER: THR empty interrupt
        assert_eq!(observer.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn test_line_status_reports_transmitter_empty() {
        let mut uart = SerialDevice::new(IrqLine::new(1).unwrap(), Box::new(std::io::sink()));
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn test_wide_access_is_ignored() {
        let sink = Capture::default();
        let mut uart = SerialDevice::new(IrqLine::new(1).unwrap(), Box::new(sink.clone()));
        uart.write(0, &[b'x', b'y', 0, 0]);
        let mut data = [0xffu8; 4];
        uart.read(5, &mut data);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(data, [0; 4]);
    }
}
