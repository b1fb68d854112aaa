//! The cross-process CUDA IPC proof behind `kvfetcher-bench gpu ipc-check`.
//!
//! The parent exports one buffer per K/V tensor and one interprocess event per layer, hands the
//! 64-byte handles to a child (itself, `gpu ipc-child`) over its stdin, then restores real KV
//! layer by layer, recording each layer's event and telling the child, never synchronising.
//! The child makes its own stream wait on each event, copies that layer to the host, and checks
//! every value against the CPU restore. A delay copy before each layer makes a child that did
//! not wait read poison. A second child is killed while holding a mapping; the parent's device
//! memory must come back in full.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::check::CheckRow;
use super::fixture::{self, KvCodes};
use kvfetcher_protocol::{DType, TokenOrder};

use kvfetcher::gpu::GpuError;
use kvfetcher::gpu::{mem_info, ImportedBuffer, ImportedEvent};
use kvfetcher::gpu::{
    restore_cpu, CodeGeometry, Dequant, DeviceTarget, RestoreKernels, TargetSpec,
};
use kvfetcher::gpu::{Cuda, DeviceBuffer};

/// Bits of the restored codes.
const BITS: u8 = 8;
/// Poison in every exported buffer before the restore.
const POISON: u8 = 0xA5;
/// Bytes of the delay copy queued before each layer's restore.
const DELAY_BYTES: usize = 1 << 30;
/// Bytes of the buffer the killed child maps.
const HOLD_BYTES: usize = 256 << 20;

fn invalid(e: impl std::fmt::Display) -> GpuError {
    GpuError::InvalidArgument(e.to_string())
}

fn target(codes: &KvCodes) -> TargetSpec {
    TargetSpec {
        layout: TokenOrder::Nhd,
        dtype: DType::F16,
        heads: codes.heads,
        head_dim: codes.head_dim,
        token_offset: 0,
        target_tokens: codes.geometry.rows,
        paged: None,
    }
}

/// The geometry, codes and scales of layer `l` alone.
fn layer_part(codes: &KvCodes, l: usize) -> (CodeGeometry, &[u16], Dequant) {
    let g = codes.geometry;
    let per = g.rows * g.cols;
    let lg = CodeGeometry {
        tensors: 2,
        rows: g.rows,
        cols: g.cols,
    };
    let q = Dequant {
        grouping: codes.dequant.grouping,
        scales: codes.dequant.scales[2 * l * g.cols..(2 * l + 2) * g.cols].to_vec(),
        mins: codes.dequant.mins[2 * l * g.cols..(2 * l + 2) * g.cols].to_vec(),
    };
    (lg, &codes.codes[2 * l * per..(2 * l + 2) * per], q)
}

fn spawn_child(device: usize, kv: &Path, mode: &str) -> Result<Child, GpuError> {
    let exe = std::env::current_exe().map_err(invalid)?;
    Command::new(exe)
        .args([
            "gpu",
            "ipc-child",
            "--device",
            &device.to_string(),
            "--mode",
            mode,
        ])
        .arg("--kv")
        .arg(kv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| invalid(format!("spawn child: {e}")))
}

/// Sends the header line and the handles.
fn send_handles(
    child: &mut Child,
    bytes: usize,
    mems: &[[u8; 64]],
    events: &[[u8; 64]],
) -> Result<(), GpuError> {
    let stdin = child.stdin.as_mut().ok_or_else(|| invalid("child stdin"))?;
    let mut msg = format!("kvf-ipc {} {} {}\n", mems.len(), bytes, events.len()).into_bytes();
    for h in mems.iter().chain(events) {
        msg.extend_from_slice(h);
    }
    stdin
        .write_all(&msg)
        .and_then(|_| stdin.flush())
        .map_err(|e| invalid(format!("write handles: {e}")))
}

fn read_line(out: &mut BufReader<std::process::ChildStdout>) -> Result<String, GpuError> {
    let mut line = String::new();
    out.read_line(&mut line)
        .map_err(|e| invalid(format!("read child: {e}")))?;
    Ok(line.trim().to_string())
}

/// Polls free device memory until it is at least `want` (other processes' contexts are torn
/// down asynchronously) or `limit` passes; returns the last reading.
fn free_at_least(cuda: &Cuda, want: usize, limit: Duration) -> Result<usize, GpuError> {
    let start = Instant::now();
    loop {
        let (free, _) = mem_info(cuda)?;
        if free >= want || start.elapsed() > limit {
            return Ok(free);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the parent side of the proof on device `device` with the real KV in `kv`.
pub fn run_ipc_check(
    cuda: &Arc<Cuda>,
    device: usize,
    kv: &Path,
) -> Result<Vec<CheckRow>, GpuError> {
    let codes = fixture::kv_codes(kv, BITS).map_err(invalid)?;
    let kernels = RestoreKernels::load(cuda)?;
    let stream = cuda.stream()?;
    let t = target(&codes);
    let layers = codes.geometry.tensors / 2;
    let bytes = t.elements() * t.dtype.size();
    let mut rows = Vec::new();
    let (free0, _) = mem_info(cuda)?;
    {
        let outs: Vec<DeviceBuffer> = (0..2 * layers)
            .map(|_| cuda.alloc(bytes))
            .collect::<Result<_, _>>()?;
        for o in &outs {
            o.fill(POISON)?;
        }
        let events = (0..layers)
            .map(|_| cuda.event(false, true))
            .collect::<Result<Vec<_>, _>>()?;
        let parts: Vec<_> = (0..layers).map(|l| layer_part(&codes, l)).collect();
        let dcodes = parts
            .iter()
            .map(|(_, c, _)| cuda.upload(c))
            .collect::<Result<Vec<_>, _>>()?;
        let targets = parts
            .iter()
            .enumerate()
            .map(|(l, (g, _, q))| {
                DeviceTarget::new(cuda, *g, q, &t, &[&outs[2 * l], &outs[2 * l + 1]])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let delay_src = cuda.alloc(DELAY_BYTES)?;
        let delay_dst = cuda.alloc(DELAY_BYTES)?;
        let mems = outs
            .iter()
            .map(|o| o.ipc_handle())
            .collect::<Result<Vec<_>, _>>()?;
        let evs = events
            .iter()
            .map(|e| e.ipc_handle())
            .collect::<Result<Vec<_>, _>>()?;
        let mut child = spawn_child(device, kv, "verify")?;
        let mut out = BufReader::new(child.stdout.take().ok_or_else(|| invalid("child stdout"))?);
        send_handles(&mut child, bytes, &mems, &evs)?;
        let opened = read_line(&mut out)?;
        if opened != "opened" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(invalid(format!("child: {opened}")));
        }
        let stdin = child.stdin.as_mut().ok_or_else(|| invalid("child stdin"))?;
        for l in 0..layers {
            cuda.copy_dtod(&delay_dst, &delay_src, DELAY_BYTES, &stream)?;
            kernels.restore_codes(&dcodes[l], &targets[l], &stream)?;
            events[l].record(&stream)?;
            stdin
                .write_all(b"L")
                .and_then(|_| stdin.flush())
                .map_err(|e| invalid(format!("signal child: {e}")))?;
        }
        let verdict = read_line(&mut out)?;
        let status = child.wait().map_err(invalid)?;
        stream.synchronize()?;
        let detail = match verdict.strip_prefix("ok ") {
            Some(_) if status.success() => String::new(),
            _ => format!("child said {verdict:?}, exited {status}"),
        };
        rows.push(CheckRow {
            name: format!("ipc restore {layers} layers, child waits on ipc events"),
            exact: detail.is_empty(),
            values: codes.geometry.len(),
            detail,
        });
    }
    // Kill a child that holds a mapping: the parent's memory must come back in full.
    let before = free_at_least(cuda, free0, Duration::from_secs(5))?;
    {
        let hold = cuda.alloc(HOLD_BYTES)?;
        hold.fill(POISON)?;
        let ev = cuda.event(false, true)?;
        let mut child = spawn_child(device, kv, "hold")?;
        let mut out = BufReader::new(child.stdout.take().ok_or_else(|| invalid("child stdout"))?);
        send_handles(
            &mut child,
            HOLD_BYTES,
            &[hold.ipc_handle()?],
            &[ev.ipc_handle()?],
        )?;
        let opened = read_line(&mut out)?;
        let _ = child.kill();
        let _ = child.wait();
        if opened != "opened" {
            return Err(invalid(format!("hold child: {opened}")));
        }
    }
    let after = free_at_least(cuda, before, Duration::from_secs(5))?;
    let delta = before as i64 - after as i64;
    rows.push(CheckRow {
        name: format!(
            "ipc child killed holding {} MiB: parent memory back (cuMemGetInfo)",
            HOLD_BYTES >> 20
        ),
        exact: delta <= 0,
        values: 1,
        detail: if delta <= 0 {
            String::new()
        } else {
            format!("{delta} bytes not returned")
        },
    });
    let end = free_at_least(cuda, free0, Duration::from_secs(5))?;
    let delta = free0 as i64 - end as i64;
    rows.push(CheckRow {
        name: "ipc whole check: free memory before == after".into(),
        exact: delta <= 0,
        values: 1,
        detail: if delta <= 0 {
            String::new()
        } else {
            format!("{delta} bytes not returned")
        },
    });
    Ok(rows)
}

/// A 64-byte CUDA IPC handle.
type Handle = [u8; 64];

/// Reads the header and handles the parent sends: bytes per buffer, buffer and event handles.
fn read_handles(input: &mut impl BufRead) -> Result<(usize, Vec<Handle>, Vec<Handle>), GpuError> {
    let mut line = String::new();
    input.read_line(&mut line).map_err(invalid)?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<usize, GpuError> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad header {line:?}")))
    };
    if f.first() != Some(&"kvf-ipc") {
        return Err(invalid(format!("bad header {line:?}")));
    }
    let (mems, bytes, events) = (num(1)?, num(2)?, num(3)?);
    if mems > 4096 || events > 4096 {
        return Err(invalid("too many handles"));
    }
    let mut take = |n: usize| -> Result<Vec<[u8; 64]>, GpuError> {
        (0..n)
            .map(|_| {
                let mut h = [0u8; 64];
                input.read_exact(&mut h).map_err(invalid)?;
                Ok(h)
            })
            .collect()
    };
    let m = take(mems)?;
    let e = take(events)?;
    Ok((bytes, m, e))
}

/// The child side: `mode` "verify" checks the restored KV, "hold" maps the buffers and waits
/// to be killed. Writes "opened" once the handles are open, then "ok <values>" or
/// "mismatch <detail>".
pub fn run_ipc_child(device: usize, kv: &Path, mode: &str) -> Result<(), GpuError> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let (bytes, mems, evs) = read_handles(&mut input)?;
    let cuda = Cuda::open(device)?;
    let bufs = mems
        .iter()
        .map(|h| ImportedBuffer::open(&cuda, *h, bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let events = evs
        .iter()
        .map(|h| ImportedEvent::open(&cuda, *h))
        .collect::<Result<Vec<_>, _>>()?;
    let stream = cuda.stream()?;
    let say = |s: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    say("opened");
    if mode == "hold" {
        std::thread::sleep(Duration::from_secs(120));
        return Ok(());
    }
    let codes = fixture::kv_codes(kv, BITS).map_err(invalid)?;
    let t = target(&codes);
    if bufs.len() != 2 * events.len() || bufs.len() != codes.geometry.tensors {
        say("mismatch handle counts");
        return Ok(());
    }
    let mut host: Vec<Vec<u8>> = (0..bufs.len()).map(|_| vec![0u8; bytes]).collect();
    for (l, ev) in events.iter().enumerate() {
        let mut sig = [0u8; 1];
        input.read_exact(&mut sig).map_err(invalid)?;
        ev.wait_on(&stream)?;
        for t in [2 * l, 2 * l + 1] {
            // SAFETY: host[t] is neither read nor dropped before stream.synchronize() below.
            unsafe { bufs[t].copy_to_host_async(&mut host[t], &stream)? };
        }
    }
    stream.synchronize()?;
    let mut want: Vec<Vec<u8>> = (0..bufs.len()).map(|_| vec![POISON; bytes]).collect();
    restore_cpu(codes.geometry, &codes.codes, &codes.dequant, &t, &mut want)?;
    for (i, (g, w)) in host.iter().zip(&want).enumerate() {
        if let Some(at) = g.iter().zip(w).position(|(a, b)| a != b) {
            say(&format!(
                "mismatch tensor {i} byte {at}: got {} want {}",
                g[at], w[at]
            ));
            return Ok(());
        }
    }
    say(&format!("ok {}", codes.geometry.len()));
    Ok(())
}
