//! Every finished resize of a sandbox, counted and timed by kind, direction and outcome: the
//! cumulative histograms `accordion metrics` exports (the history beside it keeps only the last
//! few). Superseded requests are not counted, like in the history.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds: from a no-op answer (milliseconds) to a memory
/// shrink that waits for the guest to migrate pages (tens of seconds).
pub const BUCKETS_SECONDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// What was resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Vcpus,
    Memory,
}

/// Which way the target lay from the size before the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Grow,
    Shrink,
    None,
}

impl Direction {
    /// The direction from `current` to `target`.
    pub fn of<T: Ord>(current: T, target: T) -> Self {
        match target.cmp(&current) {
            std::cmp::Ordering::Greater => Direction::Grow,
            std::cmp::Ordering::Less => Direction::Shrink,
            std::cmp::Ordering::Equal => Direction::None,
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    Error,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Vcpus => "vcpus",
            Kind::Memory => "memory",
        }
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Grow => "grow",
            Direction::Shrink => "shrink",
            Direction::None => "none",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        }
    }
}

/// One histogram: count, total latency, and per bound of [`BUCKETS_SECONDS`] how many took at
/// most that long.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    pub count: u64,
    pub sum: Duration,
    pub buckets: [u64; BUCKETS_SECONDS.len()],
}

impl Histogram {
    fn observe(&mut self, latency: Duration) {
        self.count += 1;
        self.sum = self.sum.saturating_add(latency);
        let seconds = latency.as_secs_f64();
        for (bound, bucket) in BUCKETS_SECONDS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
    }
}

/// The key of one histogram.
pub type Key = (Kind, Direction, Outcome);

/// All histograms of one sandbox.
#[derive(Debug, Default)]
pub struct ResizeStats(Mutex<BTreeMap<Key, Histogram>>);

impl ResizeStats {
    pub fn observe(&self, key: Key, latency: Duration) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .observe(latency);
    }

    /// Every histogram that has a resize in it, in key order.
    pub fn snapshot(&self) -> Vec<(Key, Histogram)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, h)| (*k, h.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_buckets_are_cumulative_and_the_sum_adds_up() {
        let stats = ResizeStats::default();
        let key = (Kind::Vcpus, Direction::Grow, Outcome::Ok);
        for ms in [3, 40, 40, 900, 45_000] {
            stats.observe(key, Duration::from_millis(ms));
        }
        stats.observe(
            (Kind::Memory, Direction::Shrink, Outcome::Error),
            Duration::from_secs(2),
        );
        let snap = stats.snapshot();
        assert_eq!(snap.len(), 2);
        let (k, h) = &snap[0];
        assert_eq!(*k, key);
        assert_eq!(h.count, 5);
        assert_eq!(h.sum, Duration::from_millis(3 + 40 + 40 + 900 + 45_000));
        // <= 5 ms: 1; <= 50 ms: 3; <= 1 s: 4; <= 30 s: 4 (45 s is only in +Inf = count).
        assert_eq!(h.buckets, [1, 1, 1, 3, 3, 3, 3, 4, 4, 4, 4, 4]);
        assert_eq!(snap[1].1.buckets[8], 1);
        assert_eq!(snap[1].1.buckets[7], 0);
    }

    #[test]
    fn test_direction_compares_target_with_the_size_before() {
        assert_eq!(Direction::of(1, 4), Direction::Grow);
        assert_eq!(Direction::of(4, 1), Direction::Shrink);
        assert_eq!(Direction::of(2u64, 2), Direction::None);
    }
}
