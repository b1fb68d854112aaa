//! The daemon's local Unix-socket server: accepts engine connections, speaks the local protocol
//! of `kvfetcher_client::protocol`, hands requests to a [`Backend`] and shares restored buffers
//! as memfds.
//!
//! - `backend`: the [`Backend`] / [`Destination`] interface to the fetch pipeline.
//! - `error`: [`ServeError`].
//! - `conn`: one connection's handshake, read loop and writer.
//! - `registry`: live fetch handles, their owners, access checks and counters.
//! - `host_buffer`: the memfd [`Destination`].
//! - `gpu_buffer`: the device-memory [`Destination`] (CUDA IPC handle, one event per layer).

mod backend;
mod conn;
mod error;
mod gpu_buffer;
mod host_buffer;
mod registry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::task::JoinSet;

use crate::gpu::{GpuDevices, GpuOptions};
use crate::metrics::Metrics;

pub use backend::{Backend, BoxFuture, Destination, DeviceRegion, FetchOutcome};
pub use error::ServeError;

/// Limits of the local server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Connected clients at most; one more is answered `Busy` and closed.
    pub max_clients: usize,
    /// Largest frame payload accepted or sent, in bytes.
    pub max_frame: usize,
    /// Live fetch handles per connection at most.
    pub max_fetches_per_client: usize,
    /// Largest buffer one fetch or save may use, in bytes.
    pub max_buffer_bytes: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            // An engine uses one connection per process; a node runs a handful of engines.
            max_clients: 256,
            max_frame: kvfetcher_client::protocol::DEFAULT_MAX_FRAME,
            // Enough for an engine that prefetches a batch of requests.
            max_fetches_per_client: 64,
            // A 100k-token prefix of a 70B model in f32 is 64 GB.
            max_buffer_bytes: 128 << 30,
        }
    }
}

/// Serves the local protocol on `listener` with default options until `shutdown` completes.
/// GPU requests are served by the host's GPUs (opened on first use), counted in a private
/// metrics set; use [`serve_with`] to share the daemon's.
pub async fn serve(
    listener: UnixListener,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let gpus = Arc::new(GpuDevices::new(GpuOptions::default(), Metrics::new()));
    serve_with(listener, backend, ServeOptions::default(), gpus, shutdown).await
}

/// Serves the local protocol on `listener` until `shutdown` completes; then every connection is
/// closed and every fetch cancelled. `gpus` (one per daemon) serves `gpu:N` fetches and saves.
pub async fn serve_with(
    listener: UnixListener,
    backend: Arc<dyn Backend>,
    opts: ServeOptions,
    gpus: Arc<GpuDevices>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let registry = Arc::new(registry::Registry::default());
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(conn::run(
                        stream,
                        backend.clone(),
                        registry.clone(),
                        opts,
                        gpus.clone(),
                    ));
                }
                Err(e) => {
                    // Out of fds or memory: transient, keep serving the clients we have.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
    registry.abort_all();
    Ok(())
}
