//! The interface between the local server and whatever produces KV (the fetch pipeline in the
//! daemon, an in-memory map in tests): [`Backend`] is implemented by the producer, which writes
//! into a [`Destination`] (`crate::buffers`) and reports [`FetchEvent`]s that the connection
//! turns into messages.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use kvfetcher_protocol::{KvShape, TargetLayout};

use tokio::sync::mpsc;

use super::ServeError;
use crate::buffers::Destination;

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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

/// The producer of KV behind the local server.
pub trait Backend: Send + Sync + 'static {
    /// How many leading tokens of `token_ids` are available remotely for `model` (a model id
    /// string; the pipeline namespaces keys by SHA-256 of it).
    fn lookup<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
    ) -> BoxFuture<'a, Result<u32, ServeError>>;

    /// Fetches the longest available prefix (at most `token_ids.len()`) into `dest` in `layout`,
    /// reporting its progress to `events`. Dropping the future cancels it. A fetch that finds
    /// nothing returns [`ServeError::NotFound`] (or `Ok` with 0 tokens without allocating).
    fn fetch<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        dest: Arc<dyn Destination>,
        events: FetchEvents,
    ) -> BoxFuture<'a, Result<FetchOutcome, ServeError>>;

    /// Saves KV the client handed over (host bytes in `layout`, shape given) for `model` and
    /// `token_ids` (`shape.tokens == token_ids.len()`). Returns the number of chunks stored
    /// (chunks already stored count as stored, and are overwritten only with `replace`).
    #[allow(clippy::too_many_arguments)]
    fn save<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        shape: &'a KvShape,
        data: &'a [u8],
        replace: bool,
    ) -> BoxFuture<'a, Result<u32, ServeError>>;
}
