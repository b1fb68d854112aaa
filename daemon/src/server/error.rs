//! The server's error type: what a backend or the server itself reports, and its protocol code.

use kvfetcher_protocol::ErrorCode;

use crate::buffers::BufferError;
use crate::pipeline::{FetchError, ProfileError, SaveError, StoreError};

/// An error of the local server or of a [`crate::server::Backend`] call.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model or the tokens are not available remotely.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is invalid (bad layout, shape mismatch, out-of-bounds write...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The store or another dependency is down; retrying later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// A stored object is damaged, or is not the chunk asked for: a store fault.
    #[error("corrupt object: {0}")]
    Corrupt(String),
    /// GPU memory was asked for and this host or configuration cannot provide it (why: no
    /// driver, no such device, disabled in config...).
    #[error("gpu memory not supported: {0}")]
    GpuUnsupported(String),
    /// The client's credentials do not allow the request (`[save]` allow-lists).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// An I/O error of the server's socket or memory.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// The protocol code this error is reported to clients with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServeError::NotFound(_) => ErrorCode::NotFound,
            ServeError::BadRequest(_) | ServeError::Forbidden(_) => ErrorCode::BadRequest,
            ServeError::Unavailable(_) => ErrorCode::Unavailable,
            ServeError::Internal(_) | ServeError::Io(_) => ErrorCode::Internal,
            ServeError::Corrupt(_) => ErrorCode::Corrupt,
            ServeError::GpuUnsupported(_) => ErrorCode::GpuUnsupported,
        }
    }
}

impl From<BufferError> for ServeError {
    fn from(e: BufferError) -> Self {
        match e {
            BufferError::Invalid(m) => ServeError::BadRequest(m),
            BufferError::GpuUnsupported(m) => ServeError::GpuUnsupported(m),
            BufferError::Exhausted(m) => ServeError::Unavailable(m),
            BufferError::Io(e) => ServeError::Io(e),
            e @ (BufferError::Gpu { .. } | BufferError::Internal(_)) => {
                ServeError::Internal(e.to_string())
            }
        }
    }
}

impl From<StoreError> for ServeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ServeError::NotFound(m),
            StoreError::Corrupt(m) => ServeError::Corrupt(m),
            e @ (StoreError::InvalidObject(_) | StoreError::NoStore) => {
                ServeError::Internal(e.to_string())
            }
            StoreError::Unavailable(m) => ServeError::Unavailable(m),
        }
    }
}

impl From<FetchError> for ServeError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::NotFound(m) => ServeError::NotFound(m),
            FetchError::Corrupt(m) => ServeError::Corrupt(m),
            FetchError::Store(e) => e.into(),
            e @ FetchError::TooManyTokens => ServeError::BadRequest(e.to_string()),
            FetchError::BadLayout(m) => ServeError::BadRequest(m),
            FetchError::Buffer(e) => e.into(),
            FetchError::Gpu(m) | FetchError::Decoder(m) | FetchError::Internal(m) => {
                ServeError::Internal(m)
            }
            FetchError::Profile(e) => match e {
                e @ ProfileError::Corrupt { .. } => ServeError::Corrupt(e.to_string()),
                // The chunks are fine; this daemon cannot decode them.
                e @ ProfileError::NotFound(_) => ServeError::Internal(e.to_string()),
                e @ ProfileError::Store {
                    source: StoreError::Unavailable(_),
                    ..
                } => ServeError::Unavailable(e.to_string()),
                e @ ProfileError::Store { .. } => ServeError::Internal(e.to_string()),
            },
            e @ FetchError::ShutDown => ServeError::Unavailable(e.to_string()),
        }
    }
}

impl From<SaveError> for ServeError {
    fn from(e: SaveError) -> Self {
        match e {
            e @ (SaveError::TokenCount { .. } | SaveError::Layout(_) | SaveError::Encode(_)) => {
                ServeError::BadRequest(e.to_string())
            }
            e @ (SaveError::UnknownVariant(_) | SaveError::WorkerStopped) => {
                ServeError::Internal(e.to_string())
            }
            SaveError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::LookupError;
    use kvfetcher_codec::ProfileId;

    /// The code and the message a client is sent for `e`.
    fn wire(e: impl Into<ServeError>) -> (ErrorCode, String) {
        let e = e.into();
        (e.code(), e.to_string())
    }

    #[test]
    fn fetch_errors_keep_their_protocol_codes_and_messages() {
        use FetchError as F;
        let cases = [
            (
                F::NotFound("no prefix".into()),
                ErrorCode::NotFound,
                "not found: no prefix",
            ),
            (
                F::Corrupt("chunk 1".into()),
                ErrorCode::Corrupt,
                "corrupt object: chunk 1",
            ),
            (
                F::TooManyTokens,
                ErrorCode::BadRequest,
                "bad request: too many tokens",
            ),
            (
                F::BadLayout("layout: x".into()),
                ErrorCode::BadRequest,
                "bad request: layout: x",
            ),
            (
                F::Gpu("gpu restore: x".into()),
                ErrorCode::Internal,
                "internal error: gpu restore: x",
            ),
            (
                F::Decoder("no hevc".into()),
                ErrorCode::Internal,
                "internal error: no hevc",
            ),
            (
                F::Internal("plan: x".into()),
                ErrorCode::Internal,
                "internal error: plan: x",
            ),
            (
                F::ShutDown,
                ErrorCode::Unavailable,
                "unavailable: pipeline shut down",
            ),
            (
                F::Profile(ProfileError::Corrupt {
                    id: ProfileId([0xab; 32]),
                    why: "its bytes hash to x".into(),
                }),
                ErrorCode::Corrupt,
                "corrupt object: codec profile abababababababababababababababababababababababababababababababab \
                 from the store: its bytes hash to x",
            ),
            (
                F::Profile(ProfileError::NotFound(ProfileId([0xab; 32]))),
                ErrorCode::Internal,
                "internal error: codec profile abababababababababababababababababababababababababababababababab \
                 is neither loaded nor in the store",
            ),
            (
                F::Profile(ProfileError::Store {
                    id: ProfileId([0xab; 32]),
                    source: StoreError::Unavailable("store: timeout".into()),
                }),
                ErrorCode::Unavailable,
                "unavailable: codec profile abababababababababababababababababababababababababababababababab: \
                 store: timeout",
            ),
            (
                F::Store(StoreError::Unavailable("store: stream ended early".into())),
                ErrorCode::Unavailable,
                "unavailable: store: stream ended early",
            ),
            (
                F::Buffer(BufferError::Exhausted("no room".into())),
                ErrorCode::Unavailable,
                "unavailable: no room",
            ),
        ];
        for (e, code, message) in cases {
            assert_eq!(wire(e), (code, message.to_string()));
        }
    }

    #[test]
    fn store_errors_keep_their_protocol_codes_and_messages() {
        let cases: [(LookupError, _, _); 5] = [
            (
                StoreError::NotFound("k".into()),
                ErrorCode::NotFound,
                "not found: k",
            ),
            (
                StoreError::Corrupt("k".into()),
                ErrorCode::Corrupt,
                "corrupt object: k",
            ),
            (
                StoreError::InvalidObject("bad".into()),
                ErrorCode::Internal,
                "internal error: invalid chunk: bad",
            ),
            (
                StoreError::Unavailable("store 1.2.3.4:5: down".into()),
                ErrorCode::Unavailable,
                "unavailable: store 1.2.3.4:5: down",
            ),
            (
                StoreError::NoStore,
                ErrorCode::Internal,
                "internal error: no store configured",
            ),
        ];
        for (e, code, message) in cases {
            assert_eq!(wire(e), (code, message.to_string()));
        }
        // A store's missing or corrupt object is the fetch's own outcome.
        assert!(matches!(
            FetchError::from(StoreError::Corrupt("k".into())),
            FetchError::Corrupt(_)
        ));
    }

    #[test]
    fn save_errors_keep_their_protocol_codes_and_messages() {
        use SaveError as S;
        let cases = [
            (
                S::TokenCount { ids: 3, tokens: 4 },
                ErrorCode::BadRequest,
                "bad request: 3 token ids for 4 tokens",
            ),
            (
                S::Encode("x".into()),
                ErrorCode::BadRequest,
                "bad request: encode: x",
            ),
            (
                S::UnknownVariant("av1".into()),
                ErrorCode::Internal,
                "internal error: unknown variant \"av1\"",
            ),
            (
                S::WorkerStopped,
                ErrorCode::Internal,
                "internal error: save worker stopped",
            ),
            (
                S::Store(StoreError::NoStore),
                ErrorCode::Internal,
                "internal error: no store configured",
            ),
        ];
        for (e, code, message) in cases {
            assert_eq!(wire(e), (code, message.to_string()));
        }
    }
}
