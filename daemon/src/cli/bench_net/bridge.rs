//! A userspace delay line between two interfaces, for kernels without `netem`: every frame
//! arriving on one side leaves on the other side a fixed time later. Rate limiting and queueing
//! stay in the kernel (`tc tbf` on the egress interfaces), so only the propagation delay is
//! emulated here.
//!
//! One receiving and one sending thread per direction; frames keep their order.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::sys::PacketSocket;

/// Largest frame: a 64 KiB GSO super-frame plus the virtio-net header.
const MAX_FRAME: usize = 65_536 + 64;

/// Frames waiting for their departure time.
#[derive(Default)]
struct Line {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// Runs the bridge between interfaces `a` and `b` with `delay` each way, dropping each frame
/// with probability `loss_ppm` per million, until an error.
pub(super) fn run(a: &str, b: &str, delay: Duration, loss_ppm: u32) -> anyhow::Result<()> {
    let sa =
        Arc::new(PacketSocket::bind(a).map_err(|e| anyhow::anyhow!("packet socket on {a}: {e}"))?);
    let sb =
        Arc::new(PacketSocket::bind(b).map_err(|e| anyhow::anyhow!("packet socket on {b}: {e}"))?);
    eprintln!(
        "delay-bridge: {a} <-> {b}, {} us each way, loss {loss_ppm} ppm",
        delay.as_micros()
    );
    let mut threads = Vec::new();
    for (src, dst) in [(sa.clone(), sb.clone()), (sb, sa)] {
        let line = Arc::new(Line::default());
        let l = line.clone();
        threads.push(std::thread::spawn(move || {
            receive(&src, &l, delay, loss_ppm)
        }));
        threads.push(std::thread::spawn(move || transmit(&dst, &line)));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("bridge thread panicked"))??;
    }
    Ok(())
}

fn receive(src: &PacketSocket, line: &Line, delay: Duration, loss_ppm: u32) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = src.recv(&mut buf)?;
        if loss_ppm > 0 && rand::random::<u32>() % 1_000_000 < loss_ppm {
            continue;
        }
        let due = Instant::now() + delay;
        line.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((due, buf[..n].to_vec()));
        line.ready.notify_one();
    }
}

fn transmit(dst: &PacketSocket, line: &Line) -> anyhow::Result<()> {
    loop {
        let (due, frame) = {
            let mut q = line.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(front) = q.pop_front() {
                    break front;
                }
                q = line.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // A full egress queue drops the frame, as a router would; the senders' congestion
        // control sees the loss.
        let _ = dst.send(&frame);
    }
}
