//! A shared send-rate limit (`--max-rate`), for emulating a slow link on hosts without `tc`.
//!
//! A virtual-time token bucket, like the `tc tbf` of `scripts/netns-link.sh`: each send reserves
//! its bytes on one timeline shared by every connection, and waits until its reservation starts.
//! Bursts up to [`BURST`] pass at once. The wait is precise to tens of microseconds: tokio's
//! timer rounds every sleep up to its next millisecond tick, and a sender that cannot go faster
//! than the rate (QUIC on a busy host near 10 Gbit/s) never wins back what a rounded-up sleep
//! lost, while the last piece of a transfer would end up to a millisecond late.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time's worth of bytes that may pass at once: the bucket of `scripts/netns-link.sh`'s tbf
/// (half a millisecond at line rate). Enough to absorb the waits' jitter; more would let a
/// fetch that starts on an idle link receive its first bytes faster than the link carries
/// them (with 2 ms, the bucket before precise waits, the last byte of 8 MB at 4 Gbit/s
/// arrived 1.1-1.5 ms before its transfer time).
pub(crate) const BURST: Duration = Duration::from_micros(500);
/// Bytes written per paced piece.
pub(crate) const PIECE: usize = 64 << 10;
/// How far ahead of a deadline tokio's timer may wake: one tick (1 ms) it rounds up to, and
/// as much again for the worker to be scheduled. Waits shorter than this sleep on a thread.
const TIMER_SLACK: Duration = Duration::from_micros(2_000);

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
        let now = Instant::now();
        let wait = self.reserve(n, now);
        if !wait.is_zero() {
            wait_until(now + wait).await;
        }
    }
}

/// Returns at `deadline` (never before), a few tens of microseconds after it at most on an idle
/// host: on tokio's timer until within [`TIMER_SLACK`] of it, then on a blocking thread, whose
/// sleep the kernel ends on time (it does not hold up a runtime worker meanwhile).
async fn wait_until(deadline: Instant) {
    if let Some(coarse) = deadline.checked_sub(TIMER_SLACK) {
        if coarse > Instant::now() {
            tokio::time::sleep_until(coarse.into()).await;
        }
    }
    let rest = deadline.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        // If the blocking pool is gone (runtime shutting down), the send is moot anyway.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
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
        // After idling, credit does not pile up beyond the burst: a second's worth sent at
        // once passes, and the next send waits for all of it but the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(1_000_000, later), Duration::ZERO);
        let wait = p.reserve(1000, later);
        let expect = Duration::from_secs(1) - BURST;
        assert!(
            wait.abs_diff(expect) < Duration::from_micros(10),
            "{wait:?}"
        );
    }

    #[tokio::test]
    async fn waits_never_end_early() {
        // Sub-millisecond waits (the thread path), one past the timer's slack (both paths),
        // and a deadline already passed.
        for micros in [0u64, 50, 300, 900, 2_500] {
            let deadline = Instant::now() + Duration::from_micros(micros);
            wait_until(deadline).await;
            assert!(Instant::now() >= deadline, "{micros} us wait ended early");
        }
    }

    #[tokio::test]
    async fn paced_sends_take_at_least_their_transfer_time() {
        // 16 pieces at 100 MB/s: the last may go once the 15 before it have had their time
        // (less the burst), ~9.8 ms, however the waits are made.
        let p = Pacer::new(100_000_000);
        let t0 = Instant::now();
        for _ in 0..16 {
            p.acquire(PIECE).await;
        }
        let floor = Duration::from_secs_f64((15 * PIECE) as f64 / 1e8).saturating_sub(BURST);
        assert!(t0.elapsed() >= floor, "{:?} < {floor:?}", t0.elapsed());
    }
}
