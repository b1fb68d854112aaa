//! Error codes carried by the protocol's `Error` and `FetchFailed` messages.
//!
//! Codes are strings, and a client parses only the codes it knows (an unknown one fails the
//! whole message). A code added after the first list is therefore sent only to clients whose
//! hello announced it (a flag bit of the handshake); older clients get the nearest older code.

use serde::{Deserialize, Serialize};

use super::frame::HELLO_FLAG_CORRUPT;

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
    /// A stored object is damaged or is not the chunk asked for (a store fault); the daemon
    /// counted and logged it. Sent only to clients whose hello carries
    /// [`HELLO_FLAG_CORRUPT`]; others get [`ErrorCode::Internal`].
    Corrupt,
}

impl ErrorCode {
    /// The code to send a peer whose hello carried `flags`: itself if the peer parses it,
    /// else the code older peers were sent for the same failure.
    pub fn for_peer(self, flags: u16) -> ErrorCode {
        match self {
            ErrorCode::Corrupt if flags & HELLO_FLAG_CORRUPT == 0 => ErrorCode::Internal,
            code => code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_is_sent_only_to_peers_that_parse_it() {
        assert_eq!(ErrorCode::Corrupt.for_peer(0), ErrorCode::Internal);
        assert_eq!(
            ErrorCode::Corrupt.for_peer(HELLO_FLAG_CORRUPT),
            ErrorCode::Corrupt
        );
        assert_eq!(ErrorCode::Busy.for_peer(0), ErrorCode::Busy);
        assert_eq!(
            serde_json::to_string(&ErrorCode::Corrupt).unwrap(),
            "\"corrupt\""
        );
    }
}
