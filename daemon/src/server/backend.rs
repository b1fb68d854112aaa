//! The interface between the local server and whatever produces KV (the fetch pipeline in the
//! daemon, an in-memory map in tests): [`Backend`] is implemented by the producer, and
//! [`Destination`] by the server, which owns the memory handed to the client.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use kvfetcher_protocol::{KvShape, TargetLayout};

use super::ServeError;
use crate::gpu::{DeviceBuffer, GpuDevice};

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a fetch writes: a buffer the server allocates once the shape is known.
/// Thread-safe; callers write disjoint ranges.
pub trait Destination: Send + Sync {
    /// Called once, before any write, with the shape of what will be restored; the server
    /// allocates (memfd or GPU) and tells the client.
    fn allocate(&self, shape: &KvShape) -> Result<(), ServeError>;
    /// Copies `bytes` to `offset` of the allocated buffer (bounds-checked).
    fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), ServeError>;
    /// Layers `layers` are complete for all tokens: the server signals readiness to the client
    /// without polling.
    fn layers_ready(&self, layers: Range<u32>);
    /// The device memory behind this destination, once allocated, when it is GPU memory: the
    /// pipeline then restores sections there with the GPU kernels instead of calling `write`.
    /// Host destinations return `None`.
    fn device(&self) -> Option<DeviceRegion<'_>> {
        None
    }
}

/// A destination's device memory: the whole fetch buffer (laid out as the fetch's layout says
/// for the allocated shape) on `device`. Borrowed from the destination, so it stays allocated
/// while the borrow lives.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRegion<'a> {
    /// The GPU.
    pub device: &'a Arc<GpuDevice>,
    /// The fetch buffer (offset 0 is the buffer's byte 0).
    pub buffer: &'a DeviceBuffer,
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

    /// Fetches the longest available prefix (at most `token_ids.len()`) into `dest` in `layout`.
    /// Dropping the future cancels it. A fetch that finds nothing returns
    /// [`ServeError::NotFound`] (or `Ok` with 0 tokens without calling `allocate`).
    fn fetch<'a>(
        &'a self,
        model: &'a str,
        token_ids: &'a [u32],
        layout: &'a TargetLayout,
        dest: Arc<dyn Destination>,
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
