//! The messages of the local protocol and their frame type numbers.
//!
//! Requests go from a client to the daemon and carry a client-chosen `req` id that the daemon's
//! answer repeats; `LayersReady` events are pushed by the daemon without a request. Payloads are
//! JSON. Type numbers are part of the wire format: never renumber them.

use serde::{Deserialize, Serialize};

use super::{ErrorCode, KvShape, TargetLayout};

/// Size in bytes of a CUDA IPC memory or event handle.
pub const GPU_IPC_HANDLE_LEN: usize = 64;

/// Where a fetched buffer lives and how the client opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferMemory {
    /// A memfd travels with the message (one fd); map `len` bytes of it.
    Host,
    /// GPU memory exported as a CUDA IPC handle (no fd travels).
    GpuIpc {
        /// CUDA ordinal of the device.
        device: u32,
        /// The `cuIpcGetMemHandle` handle ([`GPU_IPC_HANDLE_LEN`] bytes).
        mem_handle: Vec<u8>,
        /// One `cuIpcGetEventHandle` handle per layer (`shape.num_layers` of them), each
        /// [`GPU_IPC_HANDLE_LEN`] bytes; recorded before the `LayersReady` that names the layer.
        event_handles: Vec<Vec<u8>>,
    },
}

/// The credentials of a connected peer, as the kernel reported them (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCred {
    /// Process id, if the kernel reported one.
    pub pid: Option<i32>,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Counters the daemon reports in a [`Message::StatsReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStats {
    /// Clients connected now.
    pub clients: u32,
    /// Fetch handles alive now (running or holding a buffer).
    pub fetches_active: u32,
    /// Fetches started since the daemon started.
    pub fetches_total: u64,
    /// Tokens restored into buffers since the daemon started.
    pub tokens_restored: u64,
    /// Saves completed since the daemon started.
    pub saves_total: u64,
    /// The credentials the daemon recorded for the asking connection.
    pub peer: PeerCred,
}

/// Client: how many leading tokens of `token_ids` are available for `model`? Answered by `LookupReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    /// Request id, echoed in the answer.
    pub req: u64,
    /// Model id.
    pub model: String,
    /// Token ids of the prefix.
    pub token_ids: Vec<u32>,
}

/// Client: fetch the longest available prefix in `layout`. Answered by `FetchBuffer`, then
/// `LayersReady` events, then `FetchDone`; or by `FetchFailed` at any point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    /// Request id, echoed in the answers.
    pub req: u64,
    /// Model id.
    pub model: String,
    /// Token ids of the prefix.
    pub token_ids: Vec<u32>,
    /// Layout and memory of the buffer.
    pub layout: TargetLayout,
}

/// Client: save the KV held by the attached memfd (one fd), `layout.buffer_len(shape)` bytes.
/// Answered by `SaveReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Save {
    /// Request id, echoed in the answer.
    pub req: u64,
    /// Model id.
    pub model: String,
    /// Token ids; `shape.tokens` must equal their number.
    pub token_ids: Vec<u32>,
    /// Layout of the bytes (in the memfd, or in GPU memory when `gpu` is set).
    pub layout: TargetLayout,
    /// Shape of the KV.
    pub shape: KvShape,
    /// Where the bytes are when they live in GPU memory (`layout.memory` is `Gpu`): no fd
    /// travels, the daemon opens the handle and copies the bytes out. Absent for host saves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSource>,
    /// Overwrite chunks already stored (stored chunks are write-once otherwise: a save of a
    /// stored prefix keeps them). Only uids and gids of the daemon's `[save] replace_uids` /
    /// `replace_gids` may; others are refused. Absent means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
}

/// GPU memory a client hands to the daemon for a save, exported as a CUDA IPC handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSource {
    /// CUDA ordinal of the device.
    pub device: u32,
    /// The `cuIpcGetMemHandle` handle of the allocation holding the bytes
    /// ([`GPU_IPC_HANDLE_LEN`] bytes).
    pub mem_handle: Vec<u8>,
    /// Offset of the bytes from the start of that allocation.
    pub offset: u64,
    /// Length of the bytes (must equal the layout's buffer length for `shape`).
    pub len: u64,
}

/// Client: cancel a fetch and drop its buffer. Answered by `Released`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Request id, echoed in the answer.
    pub req: u64,
    /// The fetch to release.
    pub fetch_id: u64,
}

/// Client: send the buffer of one of my fetches again (a fresh fd). Answered by `FetchBuffer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reopen {
    /// Request id, echoed in the answer.
    pub req: u64,
    /// The fetch whose buffer to send.
    pub fetch_id: u64,
}

/// Client: report the daemon's counters. Answered by `StatsReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Request id, echoed in the answer.
    pub req: u64,
}

/// Daemon: answer to `Lookup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupReply {
    /// The request answered.
    pub req: u64,
    /// Leading tokens available.
    pub tokens: u32,
}

/// Daemon: the buffer of a fetch (one fd attached for [`BufferMemory::Host`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchBuffer {
    /// The request answered.
    pub req: u64,
    /// Handle of the fetch, for `Release`, `Reopen` and the events.
    pub fetch_id: u64,
    /// Shape being restored.
    pub shape: KvShape,
    /// Layout of the buffer.
    pub layout: TargetLayout,
    /// Length of the buffer in bytes.
    pub len: u64,
    /// How to open the buffer.
    pub memory: BufferMemory,
}

/// Daemon: layers `start..end` of a fetch are complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayersReady {
    /// The fetch.
    pub fetch_id: u64,
    /// First ready layer.
    pub start: u32,
    /// One past the last ready layer.
    pub end: u32,
}

/// Daemon: a fetch finished; every layer is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchDone {
    /// The request answered.
    pub req: u64,
    /// The fetch.
    pub fetch_id: u64,
    /// Tokens restored (0 if nothing was available; then no buffer was sent).
    pub tokens: u32,
    /// Bytes received from the store: chunk headers and sections.
    pub bytes_on_wire: u64,
}

/// Daemon: a fetch failed; its handle is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFailed {
    /// The request answered.
    pub req: u64,
    /// The fetch.
    pub fetch_id: u64,
    /// Why.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// Daemon: answer to `Save`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReply {
    /// The request answered.
    pub req: u64,
    /// Chunks stored.
    pub chunks: u32,
}

/// Daemon: answer to `Release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The request answered.
    pub req: u64,
    /// The fetch released.
    pub fetch_id: u64,
}

/// Daemon: answer to `Stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
    /// The request answered.
    pub req: u64,
    /// The counters.
    pub stats: DaemonStats,
}

/// Daemon: a request failed, or (without `req`) the connection is about to close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    /// The request that failed, if one could be identified.
    pub req: Option<u64>,
    /// Why.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// One message of the local protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Lookup`].
    Lookup(Lookup),
    /// See [`Fetch`].
    Fetch(Fetch),
    /// See [`Save`].
    Save(Save),
    /// See [`Release`].
    Release(Release),
    /// See [`Reopen`].
    Reopen(Reopen),
    /// See [`Stats`].
    Stats(Stats),
    /// See [`LookupReply`].
    LookupReply(LookupReply),
    /// See [`FetchBuffer`].
    FetchBuffer(FetchBuffer),
    /// See [`LayersReady`].
    LayersReady(LayersReady),
    /// See [`FetchDone`].
    FetchDone(FetchDone),
    /// See [`FetchFailed`].
    FetchFailed(FetchFailed),
    /// See [`SaveReply`].
    SaveReply(SaveReply),
    /// See [`Released`].
    Released(Released),
    /// See [`StatsReply`].
    StatsReply(StatsReply),
    /// See [`Error`].
    Error(Error),
}

/// Frame type numbers. Requests are `0x00xx`, daemon messages `0x01xx`; never renumber.
pub(crate) mod ty {
    pub(crate) const LOOKUP: u16 = 0x0001;
    pub(crate) const FETCH: u16 = 0x0002;
    pub(crate) const SAVE: u16 = 0x0003;
    pub(crate) const RELEASE: u16 = 0x0004;
    pub(crate) const REOPEN: u16 = 0x0005;
    pub(crate) const STATS: u16 = 0x0006;
    pub(crate) const LOOKUP_REPLY: u16 = 0x0101;
    pub(crate) const FETCH_BUFFER: u16 = 0x0102;
    pub(crate) const LAYERS_READY: u16 = 0x0103;
    pub(crate) const FETCH_DONE: u16 = 0x0104;
    pub(crate) const FETCH_FAILED: u16 = 0x0105;
    pub(crate) const SAVE_REPLY: u16 = 0x0106;
    pub(crate) const RELEASED: u16 = 0x0107;
    pub(crate) const STATS_REPLY: u16 = 0x0108;
    pub(crate) const ERROR: u16 = 0x01ff;
}

impl Message {
    /// This message as a peer whose hello carried `flags` can parse it: error codes it does
    /// not know are replaced ([`ErrorCode::for_peer`]).
    pub fn for_peer(mut self, flags: u16) -> Message {
        match &mut self {
            Message::Error(Error { code, .. }) | Message::FetchFailed(FetchFailed { code, .. }) => {
                *code = code.for_peer(flags);
            }
            _ => {}
        }
        self
    }

    /// The frame type number of this message.
    pub fn type_id(&self) -> u16 {
        match self {
            Message::Lookup(_) => ty::LOOKUP,
            Message::Fetch(_) => ty::FETCH,
            Message::Save(_) => ty::SAVE,
            Message::Release(_) => ty::RELEASE,
            Message::Reopen(_) => ty::REOPEN,
            Message::Stats(_) => ty::STATS,
            Message::LookupReply(_) => ty::LOOKUP_REPLY,
            Message::FetchBuffer(_) => ty::FETCH_BUFFER,
            Message::LayersReady(_) => ty::LAYERS_READY,
            Message::FetchDone(_) => ty::FETCH_DONE,
            Message::FetchFailed(_) => ty::FETCH_FAILED,
            Message::SaveReply(_) => ty::SAVE_REPLY,
            Message::Released(_) => ty::RELEASED,
            Message::StatsReply(_) => ty::STATS_REPLY,
            Message::Error(_) => ty::ERROR,
        }
    }

    /// Whether clients send this message (otherwise the daemon does).
    pub fn is_request(&self) -> bool {
        self.type_id() < 0x0100
    }

    /// How many fds travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Save(Save { gpu: None, .. }) => 1,
            Message::FetchBuffer(FetchBuffer {
                memory: BufferMemory::Host,
                ..
            }) => 1,
            _ => 0,
        }
    }

    /// The request id this message carries or answers, if any.
    pub fn req(&self) -> Option<u64> {
        Some(match self {
            Message::Lookup(m) => m.req,
            Message::Fetch(m) => m.req,
            Message::Save(m) => m.req,
            Message::Release(m) => m.req,
            Message::Reopen(m) => m.req,
            Message::Stats(m) => m.req,
            Message::LookupReply(m) => m.req,
            Message::FetchBuffer(m) => m.req,
            Message::FetchDone(m) => m.req,
            Message::FetchFailed(m) => m.req,
            Message::SaveReply(m) => m.req,
            Message::Released(m) => m.req,
            Message::StatsReply(m) => m.req,
            Message::Error(m) => return m.req,
            Message::LayersReady(_) => return None,
        })
    }
}
