//! The pipeline's errors, one enum per operation: [`LookupError`] for prefix lookups (a store
//! error), [`FetchError`] and [`SaveError`], with [`StoreError`] for what reaching a store's
//! objects can fail at. They say what went wrong in the pipeline's terms; the server maps them
//! to protocol error codes at its edge (`server/error.rs`), and nothing here knows those codes.

use super::layout::LayoutIoError;
use crate::buffers::BufferError;

/// Why reading or writing a store's objects failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store does not hold the key.
    #[error("not found: {0}")]
    NotFound(String),
    /// The store's object, or what arrived of it, failed its checks.
    #[error("corrupt object: {0}")]
    Corrupt(String),
    /// The object handed to the store for upload is not a valid chunk object.
    #[error("invalid chunk: {0}")]
    InvalidObject(String),
    /// The store cannot be reached or failed the request; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The pipeline has no store for the key.
    #[error("no store configured")]
    NoStore,
}

/// Why a prefix lookup failed.
pub type LookupError = StoreError;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No store holds a prefix of the tokens (or the first chunk is gone).
    #[error("not found: {0}")]
    NotFound(String),
    /// A stored chunk is damaged or is not the chunk asked for: a store fault. The chunk is
    /// quarantined when the fetch finds it so.
    #[error("corrupt object: {0}")]
    Corrupt(String),
    /// A store could not be reached or failed a request.
    #[error(transparent)]
    Store(StoreError),
    /// The request names more tokens than a chunk chain can index.
    #[error("too many tokens")]
    TooManyTokens,
    /// The engine's layout cannot hold the fetched shape.
    #[error("{0}")]
    BadLayout(String),
    /// The destination buffer failed (allocation, a write out of range, GPU memory).
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The GPU restore of a section failed.
    #[error("{0}")]
    Gpu(String),
    /// No decoder for a section's codec here, or its library failed: not the object's fault.
    #[error("{0}")]
    Decoder(String),
    /// The codec profile a transform-coded chunk names is not loaded and could not be had
    /// from the store (missing there, damaged, or the store failed).
    #[error(transparent)]
    Profile(#[from] super::ProfileError),
    /// The pipeline is shutting down.
    #[error("pipeline shut down")]
    ShutDown,
    /// A fault of the pipeline itself (a worker gone, a planner out of step, a section the
    /// store did not send).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for FetchError {
    /// A missing or corrupt object is the fetch's own outcome; the rest stays a store error.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => FetchError::NotFound(m),
            StoreError::Corrupt(m) => FetchError::Corrupt(m),
            e => FetchError::Store(e),
        }
    }
}

impl From<LayoutIoError> for FetchError {
    fn from(e: LayoutIoError) -> Self {
        FetchError::BadLayout(e.to_string())
    }
}

/// Why a save failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The token ids and the shape disagree.
    #[error("{ids} token ids for {tokens} tokens")]
    TokenCount {
        /// Token ids given.
        ids: usize,
        /// Tokens in the shape.
        tokens: u32,
    },
    /// The client's buffer does not hold the shape in its layout.
    #[error(transparent)]
    Layout(#[from] LayoutIoError),
    /// The `[save]` settings name a variant the codec does not know.
    #[error("unknown variant {0:?}")]
    UnknownVariant(String),
    /// The codec refused to encode the KV.
    #[error("encode: {0}")]
    Encode(String),
    /// The save worker pool stopped.
    #[error("save worker stopped")]
    WorkerStopped,
    /// A store refused the object or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
}
