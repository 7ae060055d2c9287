//! Rate limits for log lines a guest can trigger at will (a refused eject, a malformed ring, a
//! flood of events): a hostile guest must not be able to fill the host's logs. Hand-written: the
//! `log` crate has no rate limiting, and a dependency for thirty lines is not worth it.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Admits at most `burst` events per `window`; counts the rest so the next admitted line can say
/// how many were dropped.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current window began (None: no event yet).
    start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl RateLimiter {
    /// `burst` events per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(Window {
                start: None,
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// `burst` events per minute.
    pub const fn per_minute(burst: u32) -> Self {
        Self::new(burst, Duration::from_secs(60))
    }

    /// Whether an event happening now may be logged: `Some(n)` with the number of events
    /// suppressed since the last admitted one, or `None` to drop it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            w.start = Some(now);
            w.admitted = 0;
        }
        if w.admitted < self.burst {
            w.admitted += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed = w.suppressed.saturating_add(1);
            None
        }
    }
}

/// `log::log!` through a limiter of its own call site: at most `burst` lines a minute (default
/// 10), and the next admitted line is preceded by how many were dropped.
///
/// `log_limited!(log::Level::Warn, "vsock: {what}")`, or with a burst:
/// `log_limited!(burst = 3, log::Level::Error, "...")`.
#[macro_export]
macro_rules! log_limited {
    (burst = $burst:expr, $level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter =
            $crate::ratelimit::RateLimiter::per_minute($burst);
        if let Some(dropped) = LIMITER.admit() {
            if dropped > 0 {
                ::log::log!($level, "{} similar messages suppressed", dropped);
            }
            ::log::log!($level, $($arg)+);
        }
    }};
    ($level:expr, $($arg:tt)+) => {
        $crate::log_limited!(burst = 10, $level, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_limiter_admits_a_burst_then_drops_until_the_window_ends() {
        let limiter = RateLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let first: Vec<_> = (0..5).map(|_| limiter.admit_at(t0)).collect();
        let later = limiter.admit_at(t0 + Duration::from_secs(10));
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        assert_eq!(later, Some(2));
    }

    #[test]
    fn test_limiter_counts_a_flood_without_overflowing() {
        let limiter = RateLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let admitted = (0..100_000)
            .filter(|_| limiter.admit_at(t0).is_some())
            .count();
        assert_eq!(admitted, 1);
        assert_eq!(limiter.admit_at(t0 + Duration::from_secs(61)), Some(99_999));
    }
}
