//! The daemon's local Unix-socket server: accepts engine connections, speaks the local protocol
//! of `kvfetcher_protocol`, hands requests to a [`Backend`], and tells clients where their
//! fetch buffers (`crate::buffers`) are and what the fetch reports. The only code that writes
//! protocol messages.
//!
//! - `accept_backoff`: waiting out fd or memory exhaustion in the accept loop.
//! - `admission`: pending handshakes and connected clients, and their caps.
//! - `backend`: the [`Backend`] interface to the fetch pipeline and its [`FetchEvent`]s.
//! - `error`: [`ServeError`].
//! - `hello`: a connection's handshake, and the refusal a client without a place can read.
//! - `conn`: one connection's life: handshake, admission, read loop and writer.
//! - `outbox`: a connection's bounded reply queue and the signal that cuts it off.
//! - `registry`: live fetch handles, their owners, access checks and counters.

mod accept_backoff;
mod admission;
mod backend;
mod conn;
mod error;
mod hello;
mod outbox;
mod registry;
mod save_access;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::task::JoinSet;

use crate::buffers::{Buffers, GpuDevices, GpuOptions};
use crate::metrics::Metrics;

pub use backend::{Backend, BoxFuture, FetchEvent, FetchEvents, FetchOutcome};
pub use error::ServeError;
pub use save_access::SaveAccess;

/// Limits of the local server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// Connected clients at most (handshake done); one more is answered `Busy` and closed.
    pub max_clients: usize,
    /// Connected clients of one uid at most; one more is answered `Busy` and closed.
    pub max_clients_per_uid: usize,
    /// Connections in their handshake at most; they do not count as clients. At the cap the
    /// oldest pending handshake is closed to make room for the new connection.
    pub max_handshakes: usize,
    /// How long a connection may take to send its handshake.
    pub handshake_timeout: Duration,
    /// A client with no request for this long and nothing in progress (no pending request,
    /// no live fetch handle) is told `busy` and disconnected; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Largest frame payload accepted or sent, in bytes.
    pub max_frame: usize,
    /// Live fetch handles per connection at most.
    pub max_fetches_per_client: usize,
    /// Live fetch handles in the daemon at most, all connections together; one more fetch is
    /// answered `Busy`.
    pub max_fetches: usize,
    /// Largest buffer one fetch or save may use, in bytes.
    pub max_buffer_bytes: u64,
    /// Messages queued for one client and not yet written to its socket; a client whose queue
    /// is full does not read, and is disconnected.
    pub max_queued_replies: usize,
    /// Requests of one client in progress at once (lookups and saves; fetches count against
    /// `max_fetches_per_client`); one more disconnects the client.
    pub max_pending_requests: usize,
    /// Who may save, and who may replace stored chunks (`[save]` allow-lists).
    pub save_access: SaveAccess,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            // An engine uses one connection per process; a node runs a handful of engines.
            max_clients: 256,
            // A quarter of the table: one user cannot lock the others out.
            max_clients_per_uid: 64,
            // Real clients send their hello right after connecting, so they hold a place for
            // a round trip; 64 is far more than a node's engines start at once.
            max_handshakes: 64,
            // A local process that has not sent 8 bytes in 5 s is not a client.
            handshake_timeout: Duration::from_secs(5),
            // Off: engines keep one connection for their lifetime and may not reconnect
            // (examples/llama does not); the per-uid cap bounds what idle clients hold.
            idle_timeout: None,
            max_frame: kvfetcher_protocol::DEFAULT_MAX_FRAME,
            // Enough for an engine that prefetches a batch of requests.
            max_fetches_per_client: 64,
            // Each live fetch holds a buffer (memory or GPU memory) and a few fds while it
            // runs: 1024 keep a full table of clients from exhausting either, far below
            // LimitNOFILE=65536 (packaging/kvfetcher.service).
            max_fetches: 1024,
            // A 100k-token prefix of a 70B model in f32 is 64 GB.
            max_buffer_bytes: 128 << 30,
            // Replies are small (under 1 KiB but for FetchBuffer's handles): 4096 of them bound
            // a client to a few MiB, behind the ~200 KiB the kernel's socket buffer holds. A
            // client reading normally has a handful queued; 64 fetches of 80 layers each send
            // 5120 LayersReady events in all, spread over their fetches' time.
            max_queued_replies: 4096,
            // The clients serialise their calls (one request at a time per connection), so
            // this only bounds raw clients; a lookup request may hold up to a 16 MiB frame.
            max_pending_requests: 64,
            save_access: SaveAccess::default(),
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
    let handshakes = admission::Handshakes::new(opts.max_handshakes);
    let metrics = gpus.metrics().clone();
    let buffers = Arc::new(Buffers::new(gpus, opts.max_buffer_bytes));
    let mut conns = JoinSet::new();
    let mut backoff = accept_backoff::AcceptBackoff::default();
    // When to accept again after a resource error (connections keep being served meanwhile).
    let mut paused_until: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = async {
                match paused_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => paused_until = None,
            accepted = listener.accept(), if paused_until.is_none() => match accepted {
                Ok((stream, _)) => {
                    if let Some(n) = backoff.handle_success() {
                        tracing::warn!(failures = n, "accepting local connections again");
                    }
                    let (slot, evicted) = handshakes.begin();
                    if evicted {
                        metrics.local_refusals.handshake_evicted.add(1);
                    }
                    conns.spawn(conn::run(
                        stream,
                        backend.clone(),
                        registry.clone(),
                        opts.clone(),
                        buffers.clone(),
                        slot,
                    ));
                }
                Err(e) => {
                    // Out of fds or memory: transient; keep serving the clients we have (they
                    // free fds) and try again later, logging once per burst.
                    metrics.local_accept_errors.add(1);
                    let pause = backoff.handle_error(&e);
                    if pause.log {
                        tracing::warn!(
                            "accept failed: {e}; backing off (up to {:?}) until it succeeds",
                            accept_backoff::MAX_PAUSE
                        );
                    } else if pause.wait.is_zero() {
                        tracing::debug!("accept failed: {e}");
                    }
                    if !pause.wait.is_zero() {
                        paused_until = Some(tokio::time::Instant::now() + pause.wait);
                    }
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
    registry.abort_all();
    Ok(())
}
