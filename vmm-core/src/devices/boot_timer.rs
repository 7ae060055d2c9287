//! The boot timer (Firecracker's idea): the guest's init writes one byte to this register and
//! the VMM records how long the guest took to get there since `Vm::start`. Exact, and independent
//! of how slow the console is.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::MmioDevice;

/// Shared with the `Vm` so it can report the time.
pub type BootTime = Arc<Mutex<Option<Duration>>>;

/// The boot timer register.
pub struct BootTimer {
    start: Instant,
    recorded: BootTime,
}

impl BootTimer {
    /// A timer counting from `start`, recording into `recorded`.
    pub fn new(start: Instant, recorded: BootTime) -> Self {
        Self { start, recorded }
    }
}

impl MmioDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 1 {
            return;
        }
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        // Only the first write counts: later ones (a re-run init) would not be boot time.
        if recorded.is_none() {
            let elapsed = self.start.elapsed();
            log::info!("Guest boot time: {} ms", elapsed.as_millis());
            *recorded = Some(elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_first_byte_write_records_elapsed_time_and_later_writes_do_not() {
        let recorded = BootTime::default();
        let start = Instant::now() - Duration::from_millis(50);
        let mut timer = BootTimer::new(start, recorded.clone());
        timer.write(0, &[1]);
        let first = recorded.lock().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        timer.write(0, &[1]);
        assert!(first >= Duration::from_millis(50));
        assert_eq!(recorded.lock().unwrap().unwrap(), first);
    }

    #[test]
    fn test_wide_write_is_not_a_boot_mark() {
        let recorded = BootTime::default();
        let mut timer = BootTimer::new(Instant::now(), recorded.clone());
        timer.write(0, &[1, 0, 0, 0]);
        assert_eq!(*recorded.lock().unwrap(), None);
    }
}
