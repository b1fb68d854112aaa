//! A fetched buffer in GPU memory: the daemon's allocation and per-layer events, opened over
//! CUDA IPC. The daemon records event `l` after the last write of layer `l` and only then
//! announces the layer, so once `LayersReady` covered `l`, waiting on event `l` (on the host, or
//! on an engine's stream without blocking) orders reads after the restore.
//!
//! Replies are checked here before the driver is touched: a malformed reply maps nothing.

use std::ffi::c_void;
use std::sync::Arc;

use crate::cuda::{Device, ExportError, IpcEvent, IpcMem};
use crate::protocol::{KvShape, MemoryKind, GPU_IPC_HANDLE_LEN};
use crate::ClientError;

/// The handles of a `GpuIpc` reply, checked against the request and the shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GpuReply {
    device: u32,
    mem_handle: [u8; GPU_IPC_HANDLE_LEN],
    events: Vec<[u8; GPU_IPC_HANDLE_LEN]>,
}

fn handle(bytes: &[u8], what: &str) -> Result<[u8; GPU_IPC_HANDLE_LEN], ClientError> {
    bytes.try_into().map_err(|_| {
        ClientError::Unexpected(format!(
            "{what} is {} bytes, a CUDA IPC handle is {GPU_IPC_HANDLE_LEN}",
            bytes.len()
        ))
    })
}

impl GpuReply {
    /// Checks a `GpuIpc` reply to a fetch that asked for `requested` memory: the device is the
    /// one asked for, every handle is 64 bytes, and there is one event per layer.
    pub(crate) fn check(
        requested: MemoryKind,
        device: u32,
        mem_handle: &[u8],
        event_handles: &[Vec<u8>],
        shape: &KvShape,
    ) -> Result<GpuReply, ClientError> {
        if requested != MemoryKind::Gpu(device) {
            return Err(ClientError::Unexpected(format!(
                "buffer on gpu {device}, the fetch asked for {requested:?} memory"
            )));
        }
        let mem_handle = handle(mem_handle, "memory handle")?;
        if event_handles.len() != shape.num_layers as usize {
            return Err(ClientError::Unexpected(format!(
                "{} event handles for {} layers",
                event_handles.len(),
                shape.num_layers
            )));
        }
        let events = event_handles
            .iter()
            .map(|h| handle(h, "event handle"))
            .collect::<Result<_, _>>()?;
        Ok(GpuReply {
            device,
            mem_handle,
            events,
        })
    }
}

/// The daemon's GPU buffer opened in this process: its allocation (the buffer starts at offset
/// 0) and one event per layer. Dropping it destroys the events, closes the allocation and
/// releases the primary context, in that order (field order).
#[derive(Debug)]
pub(crate) struct GpuMapping {
    events: Vec<IpcEvent>,
    mem: IpcMem,
    device: Arc<Device>,
    len: usize,
}

impl GpuMapping {
    /// Opens a checked reply's handles for a buffer of `len` bytes; on any failure whatever was
    /// opened is closed again.
    pub(crate) fn open(reply: &GpuReply, len: usize) -> Result<GpuMapping, ClientError> {
        let device = Device::retain(reply.device)?;
        let mem = device.open_mem(&reply.mem_handle)?;
        if let Some(size) = mem.size() {
            if size < len {
                return Err(ClientError::Unexpected(format!(
                    "gpu allocation of {size} bytes for a {len} byte buffer"
                )));
            }
        }
        let events = reply
            .events
            .iter()
            .map(|h| device.open_event(h))
            .collect::<Result<_, _>>()?;
        Ok(GpuMapping {
            events,
            mem,
            device,
            len,
        })
    }

    /// The buffer's device address in this process.
    pub(crate) fn ptr(&self) -> u64 {
        self.mem.ptr()
    }

    /// The buffer's length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The CUDA ordinal.
    pub(crate) fn device(&self) -> u32 {
        self.device.ordinal()
    }

    fn event(&self, layer: u32) -> Result<&IpcEvent, ClientError> {
        self.events
            .get(layer as usize)
            .ok_or(ClientError::LayerOutOfRange {
                layer,
                layers: self.events.len() as u32,
            })
    }

    /// Blocks until the restore of an announced `layer` is complete on the GPU.
    pub(crate) fn host_wait(&self, layer: u32) -> Result<(), ClientError> {
        Ok(self.event(layer)?.synchronize()?)
    }

    /// Orders work queued on `stream` after this call behind the restore of an announced
    /// `layer`, without blocking.
    ///
    /// # Safety
    /// `stream` is NULL or a live `CUstream` of this process.
    pub(crate) unsafe fn stream_wait(
        &self,
        layer: u32,
        stream: *mut c_void,
    ) -> Result<(), ClientError> {
        // SAFETY: forwarded caller guarantee.
        Ok(unsafe { self.event(layer)?.stream_wait(stream) }?)
    }
}

/// Exports `len` bytes at `ptr` (device memory of the device `memory` names) for a save:
/// `(device, handle, offset)`.
pub(crate) fn export(
    memory: MemoryKind,
    ptr: u64,
    len: usize,
) -> Result<(u32, [u8; GPU_IPC_HANDLE_LEN], u64), ClientError> {
    let MemoryKind::Gpu(ordinal) = memory else {
        return Err(ClientError::InvalidArgument(
            "save_gpu needs a layout whose memory is Gpu(device)".into(),
        ));
    };
    if ptr == 0 {
        return Err(ClientError::InvalidArgument("device pointer is 0".into()));
    }
    let device = Device::retain(ordinal)?;
    match device.export(ptr, len) {
        Ok((h, offset)) => Ok((ordinal, h, offset)),
        Err(ExportError::Argument(m)) => Err(ClientError::InvalidArgument(m)),
        Err(ExportError::Gpu(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GpuError;

    fn shape(layers: u32) -> KvShape {
        KvShape {
            num_layers: layers,
            tokens: 4,
            kv_heads: 1,
            head_dim: 8,
        }
    }

    #[test]
    fn replies_are_checked_before_any_driver_call() {
        let ok = vec![vec![1u8; 64]; 3];
        let r = GpuReply::check(MemoryKind::Gpu(1), 1, &[7; 64], &ok, &shape(3)).unwrap();
        assert_eq!(r.events.len(), 3);
        assert_eq!(r.mem_handle, [7; 64]);
        let bad = [
            GpuReply::check(MemoryKind::Gpu(1), 1, &[7; 63], &ok, &shape(3)),
            GpuReply::check(MemoryKind::Gpu(1), 1, &[7; 64], &ok[..2], &shape(3)),
            GpuReply::check(
                MemoryKind::Gpu(1),
                1,
                &[7; 64],
                &[vec![0; 64], vec![0; 65], vec![0; 64]],
                &shape(3),
            ),
            GpuReply::check(MemoryKind::Gpu(0), 1, &[7; 64], &ok, &shape(3)),
            GpuReply::check(MemoryKind::Host, 1, &[7; 64], &ok, &shape(3)),
        ];
        for (i, e) in bad.into_iter().enumerate() {
            assert!(matches!(e, Err(ClientError::Unexpected(_))), "{i}: {e:?}");
        }
    }

    #[test]
    fn export_checks_arguments_first() {
        let e = export(MemoryKind::Host, 0x1000, 16).unwrap_err();
        assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
        let e = export(MemoryKind::Gpu(0), 0, 16).unwrap_err();
        assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Env var that carries the parent's handles to [`ipc_child`].
    const CHILD_ENV: &str = "KVF_CLIENT_IPC_CHILD";
    const LAYERS: u32 = 3;
    const OFFSET: u64 = 4096;
    const LEN: usize = 3 << 20;

    fn pattern(i: usize) -> u8 {
        (i * 7 % 251) as u8
    }

    /// A real CUDA IPC round trip (GPU hosts): this process plays the daemon (allocates,
    /// fills, records one interprocess event per layer) and exports the buffer the way
    /// `save_gpu` does; a child process opens it the way a fetch does, waits on every event
    /// (host and stream), reads it back through the mapping and checks every byte.
    #[test]
    fn ipc_round_trip_with_a_child_process() {
        if let Err(e) = crate::cuda::driver_available() {
            kvfetcher_testkit::skip(
                kvfetcher_testkit::Missing::Gpu,
                format!("no CUDA driver ({e})"),
            );
            return;
        }
        let dev = Device::retain(0).unwrap();
        let base = dev.test_alloc(OFFSET as usize + LEN);
        let data: Vec<u8> = (0..LEN).map(pattern).collect();
        dev.test_write(base + OFFSET, &data);
        let events: Vec<String> = (0..LAYERS)
            .map(|_| hex(&dev.test_recorded_event()))
            .collect();
        // Export of an interior pointer: the handle of the whole allocation and the offset.
        let (ordinal, handle, offset) = export(MemoryKind::Gpu(0), base + OFFSET, LEN).unwrap();
        assert_eq!((ordinal, offset), (0, OFFSET));
        let e = export(MemoryKind::Gpu(0), base + OFFSET, LEN + 1).unwrap_err();
        assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
        let e = export(MemoryKind::Gpu(0), 0x1000, 16).unwrap_err();
        assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
        let e = export(MemoryKind::Gpu(99), base, 16).unwrap_err();
        assert!(
            matches!(e, ClientError::Gpu(GpuError::NoDevice { .. })),
            "{e}"
        );

        let arg = format!("{};{}", hex(&handle), events.join(","));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "gpu::tests::ipc_child", "--nocapture"])
            .env(CHILD_ENV, arg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("ipc child verified"), "{text}");
        dev.test_free(base);
    }

    /// The importing side of [`ipc_round_trip_with_a_child_process`]; a no-op when run alone.
    #[test]
    fn ipc_child() {
        let Ok(arg) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (mem, evs) = arg.split_once(';').unwrap();
        let events: Vec<Vec<u8>> = evs.split(',').map(unhex).collect();
        let shape = shape(LAYERS);
        let r = GpuReply::check(MemoryKind::Gpu(0), 0, &unhex(mem), &events, &shape).unwrap();
        let total = OFFSET as usize + LEN;
        let m = GpuMapping::open(&r, total).unwrap();
        assert_eq!((m.device(), m.len()), (0, total));
        assert!(m.mem.size().unwrap_or(total) >= total);
        for l in 0..LAYERS {
            m.host_wait(l).unwrap();
            // SAFETY: NULL is the legacy default stream of the primary context.
            unsafe { m.stream_wait(l, std::ptr::null_mut()) }.unwrap();
        }
        assert!(matches!(
            m.host_wait(LAYERS),
            Err(ClientError::LayerOutOfRange { .. })
        ));
        let mut got = vec![0u8; LEN];
        m.device.test_read(m.ptr() + OFFSET, &mut got);
        let bad = got.iter().enumerate().position(|(i, b)| *b != pattern(i));
        assert_eq!(bad, None, "first differing byte");
        drop(m);
        println!("ipc child verified: {LEN} bytes, {LAYERS} events");
    }

    #[test]
    fn opening_without_a_driver_is_a_typed_error() {
        if crate::cuda::driver_available().is_ok() {
            println!("skipped: a CUDA driver is present (opening fake handles would be tested)");
            return;
        }
        let r =
            GpuReply::check(MemoryKind::Gpu(0), 0, &[0; 64], &[vec![0; 64]], &shape(1)).unwrap();
        let e = GpuMapping::open(&r, 64).unwrap_err();
        assert!(
            matches!(e, ClientError::Gpu(GpuError::Unavailable(_))),
            "{e}"
        );
        let e = export(MemoryKind::Gpu(0), 0x1000, 16).unwrap_err();
        assert!(
            matches!(e, ClientError::Gpu(GpuError::Unavailable(_))),
            "{e}"
        );
    }
}
