//! The local protocol between engines and the daemon: one definition, used by the daemon and by
//! every client (Rust, C, Python). See `docs/PROTOCOL.md` for the wire format.
//!
//! Sans-IO (no sockets, no clocks): `code` (error codes), `layout` (target layouts and the byte
//! arithmetic of restored buffers), `message` (the messages), `frame` (handshake, framing and
//! fd pairing). With I/O: [`transport`] moves frames and their fds over a Unix socket (blocking
//! and tokio) and [`memfd`] makes the sealed host buffers both sides map.

mod code;
mod frame;
mod layout;
pub mod memfd;
mod message;
mod sys;
pub mod transport;

pub use code::ErrorCode;
pub use frame::{
    encode_hello, encode_hello_reply, encode_hello_with_flags, encode_message, parse_hello,
    FrameDecoder, FrameError, CLIENT_HELLO_FLAGS, DEFAULT_MAX_FRAME, FRAME_HEADER_LEN,
    HELLO_FLAG_CORRUPT, HELLO_LEN, HELLO_OK, HELLO_VERSION_UNSUPPORTED, MAGIC, MAX_PENDING_FDS,
    PROTOCOL_VERSION,
};
pub use kvfetcher_types::DType;
pub use layout::{KvShape, LayoutError, MemoryKind, Paging, TargetLayout, TokenOrder};
pub use message::{
    BufferMemory, DaemonStats, Error, Fetch, FetchBuffer, FetchDone, FetchFailed, GpuSource,
    LayersReady, Lookup, LookupReply, Message, PeerCred, Release, Released, Reopen, Save,
    SaveReply, Stats, StatsReply, GPU_IPC_HANDLE_LEN,
};
