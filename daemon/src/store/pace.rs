//! A shared send-rate limit (`--max-rate`), for emulating a slow link on hosts without `tc`.
//!
//! A virtual-time token bucket: each send reserves its bytes on one timeline shared by every
//! connection, and waits until its reservation starts. Bursts up to [`BURST`] pass at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time's worth of bytes that may pass at once: 2 ms keeps the shaped rate smooth at the
/// 1-20 ms RTTs this emulates, without one sleep per small write.
pub(crate) const BURST: Duration = Duration::from_millis(2);
/// Bytes written per paced piece.
pub(crate) const PIECE: usize = 64 << 10;

/// Limits the rate of all sends that share it.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    /// A limiter at `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Reserves `n` bytes at `now`; returns how long to wait before sending them.
    pub fn reserve(&self, n: usize, now: Instant) -> Duration {
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
        *next = start + cost;
        start.saturating_duration_since(now)
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: usize) {
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_rate() {
        let p = Pacer::new(1_000_000);
        let t0 = Instant::now();
        // 1 MB at 1 MB/s in 10 kB pieces: the last piece starts 990 ms in.
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            last = p.reserve(10_000, t0);
        }
        let expect = Duration::from_millis(990);
        assert!(
            last >= expect - Duration::from_millis(3) && last <= expect + Duration::from_millis(3),
            "{last:?}"
        );
        // After idling, credit does not pile up beyond the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(1000, later), Duration::ZERO);
        assert!(p.reserve(1_000_000, later) <= Duration::from_millis(1));
        assert!(p.reserve(1000, later) >= Duration::from_millis(990));
    }
}
