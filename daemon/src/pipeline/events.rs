//! What a fetch reports while it runs ([`FetchEvent`], through [`FetchEvents`]) and when it
//! ends ([`FetchOutcome`]). The pipeline reports; the local server (`server/`) turns
//! each into a protocol message. Events flow one way: the pipeline never calls the server.

use std::ops::Range;

use kvfetcher_protocol::KvShape;
use tokio::sync::mpsc;

/// What a fetch reports while it runs, in order; its future's output is the end (done, or
/// failed). The connection turns each into a protocol message; the backend writes none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// The destination was allocated for this shape: the client may map it now.
    Allocated(KvShape),
    /// These layers are complete for every token (and, in GPU memory, their events recorded).
    LayersReady(Range<u32>),
}

/// Where a fetch reports its [`FetchEvent`]s. Sending never blocks: a fetch reports one
/// allocation and at most one event per layer.
#[derive(Debug, Clone)]
pub struct FetchEvents(Option<mpsc::UnboundedSender<FetchEvent>>);

impl FetchEvents {
    /// A sender and the receiver the connection polls.
    pub fn channel() -> (FetchEvents, mpsc::UnboundedReceiver<FetchEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (FetchEvents(Some(tx)), rx)
    }

    /// A sink for callers that watch the destination instead (tests, benchmarks).
    pub fn ignored() -> FetchEvents {
        FetchEvents(None)
    }

    /// Reports `event`; a receiver that has gone (the client left) is no error.
    pub fn report(&self, event: FetchEvent) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event);
        }
    }
}

/// What a finished fetch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOutcome {
    /// Tokens restored (a prefix of those asked for).
    pub tokens: u32,
    /// Bytes received from the remote store for this fetch: chunk headers and sections.
    pub bytes_on_wire: u64,
}
