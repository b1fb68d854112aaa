//! Error codes carried by the protocol's `Error` and `FetchFailed` messages.

use serde::{Deserialize, Serialize};

/// Why the daemon refused or failed a request. Serialized as a snake_case string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is well-formed but its content is invalid (bad layout, empty token list...).
    BadRequest,
    /// The model or the tokens are not available remotely.
    NotFound,
    /// The remote store or another dependency is down; retrying later may work.
    Unavailable,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
    /// The client speaks a protocol version the daemon does not.
    VersionMismatch,
    /// A frame's length exceeds the limit.
    FrameTooLarge,
    /// A frame could not be parsed (unknown type, bad payload, missing fd).
    Malformed,
    /// A message that the receiver does not accept in this direction or state.
    UnexpectedMessage,
    /// The handle exists but belongs to another client.
    PermissionDenied,
    /// No such handle.
    UnknownHandle,
    /// GPU memory was asked for but this daemon build or host cannot provide it.
    GpuUnsupported,
    /// The daemon is at its limit of clients or in-flight requests.
    Busy,
}
