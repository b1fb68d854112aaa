//! A userspace delay line between two interfaces, for kernels without `netem`: every frame
//! arriving on one side leaves on the other side a fixed time later. Rate limiting and queueing
//! stay in the kernel (`tc tbf` on the egress interfaces), so only the propagation delay is
//! emulated here.
//!
//! It shares a 2-core machine with both benchmark peers, so it must be cheap per frame: one
//! thread per direction, no locks; frames arrive in batches (`recvmmsg`, one timestamp per
//! batch) and are copied into one preallocated byte ring; whatever is due leaves in batches
//! (`sendmmsg`); between batches the thread sleeps in `ppoll` until the next frame is due or
//! new frames arrive. Frames keep their order; each leaves within half a departure window
//! ([`DEFAULT_WINDOW`]) of its exact time, so the mean delay is exact.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sys::{cpu_seconds, set_timer_slack, PacketSocket, BATCH};

/// Largest frame: a 64 KiB GSO super-frame plus the virtio-net header.
const MAX_FRAME: usize = 65_536 + 64;
/// Bytes in flight per direction: a 25 Gbit/s x 10 ms one-way delay is 31 MB. A frame that
/// does not fit is dropped, as on a full router queue.
const RING_BYTES: usize = 64 << 20;
/// Default departure window: frames due within it are sent together, with one wake-up.
/// Wake-ups (context switches, costly in a VM) are most of the line's CPU; the timing error is
/// at most half of it either way (see [`forward`]), 1.25% of a 2 ms RTT, and the `tbf` after
/// the line reshapes the bursts anyway.
pub(super) const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

/// What one direction did, for the report (updated once per batch, read at exit).
#[derive(Debug, Default)]
struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    wakeups: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "frames": self.frames.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "wakeups": self.wakeups.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
        })
    }
}

/// One frame waiting in the ring.
#[derive(Debug, Clone, Copy)]
struct Frame {
    due: Instant,
    off: usize,
    len: usize,
}

/// Frames waiting for their departure time, in arrival order, their bytes in one ring buffer.
struct Line {
    buf: Vec<u8>,
    frames: VecDeque<Frame>,
}

impl Line {
    fn new(capacity: usize) -> Line {
        Line {
            buf: vec![0; capacity],
            frames: VecDeque::new(),
        }
    }

    /// Where `len` bytes fit after the newest frame (wrapping to the start), if they do.
    fn reserve(&self, len: usize) -> Option<usize> {
        let cap = self.buf.len();
        let (Some(front), Some(back)) = (self.frames.front(), self.frames.back()) else {
            return (len <= cap).then_some(0);
        };
        let end = back.off + back.len;
        if back.off >= front.off {
            // Live bytes are front.off..end.
            if cap - end >= len {
                Some(end)
            } else if front.off >= len {
                Some(0)
            } else {
                None
            }
        } else if front.off - end >= len {
            // Live bytes are front.off..cap and 0..end.
            Some(end)
        } else {
            None
        }
    }

    /// Queues a copy of `frame`, due at `due`; false (dropped) when the ring is full.
    fn push(&mut self, due: Instant, frame: &[u8]) -> bool {
        let Some(off) = self.reserve(frame.len()) else {
            return false;
        };
        self.buf[off..off + frame.len()].copy_from_slice(frame);
        self.frames.push_back(Frame {
            due,
            off,
            len: frame.len(),
        });
        true
    }

    /// How many of the oldest frames (at most `max`) are due by `by`.
    fn due_count(&self, by: Instant, max: usize) -> usize {
        self.frames
            .iter()
            .take(max)
            .take_while(|f| f.due <= by)
            .count()
    }

    /// The bytes of a queued frame.
    fn bytes(&self, f: &Frame) -> &[u8] {
        &self.buf[f.off..f.off + f.len]
    }
}

/// Runs the bridge between interfaces `a` and `b` with `delay` each way, dropping each frame
/// with probability `loss_ppm` per million, until an error or SIGTERM/SIGINT. On a signal it
/// writes its CPU seconds as JSON to `report`, if given, and exits.
pub(super) fn run(
    a: &str,
    b: &str,
    delay: Duration,
    window: Duration,
    loss_ppm: u32,
    report: Option<&Path>,
) -> anyhow::Result<()> {
    let sa =
        Arc::new(PacketSocket::bind(a).map_err(|e| anyhow::anyhow!("packet socket on {a}: {e}"))?);
    let sb =
        Arc::new(PacketSocket::bind(b).map_err(|e| anyhow::anyhow!("packet socket on {b}: {e}"))?);
    eprintln!(
        "delay-bridge: {a} <-> {b}, {} us each way, loss {loss_ppm} ppm",
        delay.as_micros()
    );
    // Signals go to a thread of their own (blocked here, so every thread inherits the mask),
    // which writes the report; the forwarding threads never see them.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block()?;
    let report = report.map(Path::to_path_buf);
    let cpu0 = cpu_seconds();
    let ab = Arc::new(Counters::default());
    let ba = Arc::new(Counters::default());
    let (ab2, ba2) = (ab.clone(), ba.clone());
    std::thread::spawn(move || {
        let _ = signals.wait();
        let json = serde_json::json!({
            "cpu_s": cpu_seconds() - cpu0,
            "a_to_b": ab2.json(),
            "b_to_a": ba2.json(),
        });
        eprintln!("delay-bridge: {json}");
        if let Some(p) = report {
            if let Err(e) = std::fs::write(&p, json.to_string()) {
                eprintln!("delay-bridge: write {}: {e}", p.display());
            }
        }
        std::process::exit(0);
    });
    let mut threads = Vec::new();
    for (src, dst, counters) in [(sa.clone(), sb.clone(), ab), (sb, sa, ba)] {
        threads.push(
            std::thread::Builder::new()
                .name("delay-line".into())
                .spawn(move || forward(&src, &dst, delay, window, loss_ppm, &counters))?,
        );
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("bridge thread panicked"))??;
    }
    Ok(())
}

/// One direction: frames from `src` leave through `dst` `delay` after they arrived. A frame is
/// queued as due at arrival + delay + window/2 and leaves with the first batch sent at or after
/// due - window, so within window/2 of arrival + delay.
fn forward(
    src: &PacketSocket,
    dst: &PacketSocket,
    delay: Duration,
    window: Duration,
    loss_ppm: u32,
    counters: &Counters,
) -> anyhow::Result<()> {
    set_timer_slack(1_000);
    let mut line = Line::new(RING_BYTES);
    let mut scratch: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; MAX_FRAME]).collect();
    let mut lens = [0usize; BATCH];
    loop {
        // Send everything due within the window, a batch per system call.
        let mut now = Instant::now();
        loop {
            let n = line.due_count(now + window, BATCH);
            if n == 0 {
                break;
            }
            {
                let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
                for (slot, f) in frames.iter_mut().zip(line.frames.iter().take(n)) {
                    *slot = line.bytes(f);
                }
                // Frames refused by a full egress queue are dropped: the senders' congestion
                // control sees the loss.
                let dropped = dst.send_batch(&frames[..n])?;
                counters
                    .dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
            line.frames.drain(..n);
            now = Instant::now();
        }
        // Sleep until the next frame is due or new frames arrive.
        let timeout = line
            .frames
            .front()
            .map(|f| f.due.saturating_duration_since(now + window));
        let readable = src.wait_readable(timeout)?;
        counters.wakeups.fetch_add(1, Ordering::Relaxed);
        if !readable {
            continue;
        }
        let got = src.recv_batch(&mut scratch, &mut lens)?;
        if got == 0 {
            continue;
        }
        let due = Instant::now() + delay + window / 2;
        let mut bytes = 0;
        let mut dropped = 0;
        for (buf, &len) in scratch.iter().zip(&lens[..got]) {
            bytes += len as u64;
            if loss_ppm > 0 && rand::random::<u32>() % 1_000_000 < loss_ppm {
                dropped += 1;
                continue;
            }
            // A full ring drops the frame, like a full router queue.
            if !line.push(due, &buf[..len.min(buf.len())]) {
                dropped += 1;
            }
        }
        counters.frames.fetch_add(got as u64, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        counters.dropped.fetch_add(dropped, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_all(line: &mut Line) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(f) = line.frames.pop_front() {
            out.push(line.bytes(&f).to_vec());
        }
        out
    }

    #[test]
    fn frames_keep_order_and_bytes_across_wraps() {
        let mut line = Line::new(100);
        let t = Instant::now();
        let mut expected = VecDeque::new();
        let mut next = 0u8;
        // Push and pop so the write position wraps many times with varying sizes.
        for round in 0..200usize {
            let len = 1 + (round * 7) % 40;
            let frame: Vec<u8> = (0..len).map(|i| next.wrapping_add(i as u8)).collect();
            next = next.wrapping_add(13);
            while !line.push(t, &frame) {
                let f = line
                    .frames
                    .pop_front()
                    .expect("an empty ring fits any small frame");
                assert_eq!(line.bytes(&f), expected.pop_front().unwrap());
            }
            expected.push_back(frame);
        }
        let rest = drain_all(&mut line);
        assert_eq!(rest, expected.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn full_ring_drops_and_oversized_frame_never_fits() {
        let mut line = Line::new(10);
        let t = Instant::now();
        assert!(line.push(t, &[1; 6]));
        assert!(!line.push(t, &[2; 5]), "only 4 bytes are left");
        assert!(line.push(t, &[3; 4]));
        assert!(!line.push(t, &[4; 1]), "the ring is full");
        assert!(!Line::new(10).push(t, &[0; 11]));
        assert_eq!(drain_all(&mut line), vec![vec![1; 6], vec![3; 4]]);
        // Once emptied, the whole ring is usable again.
        assert!(line.push(t, &[5; 10]));
    }

    #[test]
    fn only_due_frames_are_counted_in_order() {
        let mut line = Line::new(1000);
        let t = Instant::now();
        let ms = Duration::from_millis(1);
        for (i, d) in [0u32, 1, 2, 1].iter().enumerate() {
            assert!(line.push(t + ms * *d, &[i as u8; 3]));
        }
        assert_eq!(line.due_count(t, BATCH), 1);
        assert_eq!(
            line.due_count(t + ms, BATCH),
            2,
            "order is kept: frame 3 waits"
        );
        assert_eq!(line.due_count(t + ms * 5, BATCH), 4);
        assert_eq!(line.due_count(t + ms * 5, 3), 3);
    }
}
