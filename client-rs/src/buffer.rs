//! The client's view of a fetched buffer: the daemon's memfd mapped read-only, and the slices of
//! its layers and tensors. Also the answers that both clients interpret the same way.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use memmap2::{Mmap, MmapOptions};

use crate::protocol::{BufferMemory, KvShape, Message, TargetLayout};
use crate::ClientError;

/// A fetched buffer mapped into this process.
#[derive(Debug)]
pub(crate) struct MappedBuffer {
    pub(crate) fetch_id: u64,
    pub(crate) shape: KvShape,
    pub(crate) layout: TargetLayout,
    map: Mmap,
}

impl MappedBuffer {
    /// Maps the buffer a `FetchBuffer` answer announced; any other answer is an error.
    pub(crate) fn from_reply(msg: Message, mut fds: Vec<OwnedFd>) -> Result<Self, ClientError> {
        let b = match msg {
            Message::FetchBuffer(b) => b,
            other => return Err(reply_error(other)),
        };
        if b.memory != BufferMemory::Host {
            return Err(ClientError::Unexpected(
                "gpu buffers are not supported by this client".into(),
            ));
        }
        let expect = b.layout.checked_buffer_len(&b.shape)?;
        if b.len != expect as u64 || expect == 0 {
            return Err(ClientError::Unexpected(format!(
                "buffer of {} bytes for a layout of {expect}",
                b.len
            )));
        }
        let fd = fds
            .pop()
            .ok_or_else(|| ClientError::Unexpected("buffer without fd".into()))?;
        let file = File::from(fd);
        let size = file.metadata().map_err(ClientError::Memory)?.len();
        if size < b.len {
            return Err(ClientError::Unexpected(format!(
                "memfd of {size} bytes for a {} byte buffer",
                b.len
            )));
        }
        // SAFETY: the mapping is read-only and shared. The daemon writes disjoint regions of it
        // before announcing them ready, and never shrinks the memfd while the handle is alive
        // (its size was checked above), so reads stay in bounds.
        let map =
            unsafe { MmapOptions::new().len(expect).map(&file) }.map_err(ClientError::Memory)?;
        Ok(MappedBuffer {
            fetch_id: b.fetch_id,
            shape: b.shape,
            layout: b.layout,
            map,
        })
    }

    /// The whole buffer.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Checks a layer index.
    pub(crate) fn check_layer(&self, layer: u32) -> Result<(), ClientError> {
        if layer >= self.shape.num_layers {
            return Err(ClientError::LayerOutOfRange {
                layer,
                layers: self.shape.num_layers,
            });
        }
        Ok(())
    }

    /// The bytes of one layer (K then V).
    pub(crate) fn layer(&self, layer: u32) -> Result<&[u8], ClientError> {
        self.check_layer(layer)?;
        let n = self.layout.layer_len(&self.shape);
        let at = layer as usize * n;
        Ok(&self.map[at..at + n])
    }

    /// The bytes of one tensor (`kv`: 0 = K, 1 = V) of one layer.
    pub(crate) fn tensor(&self, layer: u32, kv: u32) -> Result<&[u8], ClientError> {
        if kv > 1 {
            return Err(ClientError::InvalidArgument(format!(
                "kv must be 0 (K) or 1 (V), not {kv}"
            )));
        }
        let l = self.layer(layer)?;
        let n = self.layout.tensor_len(&self.shape);
        let at = kv as usize * n;
        Ok(&l[at..at + n])
    }
}

/// The error an unexpected answer stands for: the daemon's error, or a protocol surprise.
pub(crate) fn reply_error(msg: Message) -> ClientError {
    match msg {
        Message::Error(e) => ClientError::Daemon {
            code: e.code,
            message: e.message,
        },
        Message::FetchFailed(f) => ClientError::Daemon {
            code: f.code,
            message: f.message,
        },
        Message::FetchDone(d) if d.tokens == 0 => ClientError::Daemon {
            code: crate::ErrorCode::NotFound,
            message: "no tokens available".into(),
        },
        other => ClientError::Unexpected(format!("{:?}", other.type_id())),
    }
}

/// Checks a save's arguments and puts `data` in a sealed memfd for the daemon.
pub(crate) fn save_memfd(
    token_ids: &[u32],
    layout: &TargetLayout,
    shape: &KvShape,
    data: &[u8],
) -> Result<File, ClientError> {
    if shape.tokens as usize != token_ids.len() {
        return Err(ClientError::InvalidArgument(format!(
            "shape has {} tokens but {} token ids were given",
            shape.tokens,
            token_ids.len()
        )));
    }
    let expect = layout.checked_buffer_len(shape)?;
    if data.len() != expect {
        return Err(ClientError::InvalidArgument(format!(
            "data is {} bytes, layout needs {expect}",
            data.len()
        )));
    }
    let mut f = crate::memfd::create("kvfetcher-save", 0).map_err(ClientError::Memory)?;
    f.write_all(data).map_err(ClientError::Memory)?;
    crate::memfd::seal_readonly(&f).map_err(ClientError::Memory)?;
    Ok(f)
}
