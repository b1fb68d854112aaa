//! The interface between the local server and whatever produces KV (the fetch pipeline in the
//! daemon, an in-memory map in tests): [`Backend`] is implemented by the producer, which writes
//! into a [`Destination`] (`crate::buffers`) and reports [`FetchEvent`]s that the connection
//! turns into messages. The pipeline's implementation is here, at the server's edge: its typed
//! errors become [`ServeError`]s (and so protocol codes) in this one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kvfetcher_protocol::{KvShape, TargetLayout};

use super::ServeError;
use crate::buffers::Destination;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
pub use crate::pipeline::{FetchEvent, FetchEvents, FetchOutcome};

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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

/// Counts and logs a failed request (a miss is no failure).
fn counted<T>(metrics: &Metrics, r: Result<T, ServeError>) -> Result<T, ServeError> {
    if let Err(e) = &r {
        if !matches!(e, ServeError::NotFound(_)) {
            metrics.errors.add(1);
            tracing::warn!(error = %e, "request failed");
        }
    }
    r
}

impl Backend for Pipeline {
    fn lookup<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
    ) -> BoxFuture<'a, Result<u32, ServeError>> {
        Box::pin(async move {
            let r = self.lookup_tokens(model, token_ids).await;
            counted(self.metrics(), r.map_err(ServeError::from))
        })
    }

    fn fetch<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        dest: Arc<dyn Destination>,
        events: FetchEvents,
    ) -> BoxFuture<'a, Result<FetchOutcome, ServeError>> {
        Box::pin(async move {
            let r = self
                .fetch_into(model, token_ids, layout, dest, events)
                .await;
            counted(self.metrics(), r.map_err(ServeError::from))
        })
    }

    fn save<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        shape: &'a KvShape,
        data: &'a [u8],
        replace: bool,
    ) -> BoxFuture<'a, Result<u32, ServeError>> {
        Box::pin(async move {
            let r = self
                .save_kv(model, token_ids, layout, shape, data, replace)
                .await;
            counted(self.metrics(), r.map_err(ServeError::from))
        })
    }
}
