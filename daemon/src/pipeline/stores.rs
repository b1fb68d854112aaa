//! The set of remote stores a pipeline talks to: which store holds which chunk key, prefix
//! lookups across stores, and lazy (re)connection.
//!
//! Keys are spread by their first byte, so every node maps a key to the same store without
//! coordination. A connection is opened on first use and dropped after a connection-level
//! error, so the daemon starts before its stores and survives their restarts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvfetcher_codec::ChunkKey;
use tokio::sync::Mutex;

use crate::server::ServeError;
use crate::transport::{StoreClient, TlsClientConfig, TransportError};

/// How to reach one store.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// UDP address.
    pub addr: SocketAddr,
    /// TLS trust, server name and optional token.
    pub tls: TlsClientConfig,
}

#[derive(Debug)]
struct Store {
    target: StoreTarget,
    client: Mutex<Option<StoreClient>>,
}

/// The stores of one pipeline; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Stores {
    stores: Arc<Vec<Store>>,
    connect_timeout: Duration,
}

/// Maps a transport error to what a local client is told.
pub(crate) fn serve_error(e: TransportError) -> ServeError {
    match e {
        TransportError::NotFound(m) => ServeError::NotFound(m),
        TransportError::Corrupt(m) => ServeError::Internal(format!("corrupt chunk: {m}")),
        TransportError::InvalidObject(m) => ServeError::Internal(format!("invalid chunk: {m}")),
        other => ServeError::Unavailable(format!("store: {other}")),
    }
}

/// Whether the error means the connection is gone (as opposed to one request failing).
fn connection_lost(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Connection(_)
            | TransportError::Connect(_)
            | TransportError::Write(_)
            | TransportError::Read(_)
            | TransportError::Endpoint(_)
    )
}

impl Stores {
    /// Stores reached at `targets`; nothing is connected yet.
    pub(crate) fn new(targets: Vec<StoreTarget>, connect_timeout: Duration) -> Stores {
        let stores = targets
            .into_iter()
            .map(|target| Store {
                target,
                client: Mutex::new(None),
            })
            .collect();
        Stores {
            stores: Arc::new(stores),
            connect_timeout,
        }
    }

    /// Number of stores.
    pub(crate) fn len(&self) -> usize {
        self.stores.len()
    }

    /// Index of the store that holds `key`.
    pub(crate) fn index_of(&self, key: &ChunkKey) -> usize {
        key.0[0] as usize % self.stores.len().max(1)
    }

    /// A connected client for store `i`, connecting if needed.
    pub(crate) async fn client(&self, i: usize) -> Result<StoreClient, ServeError> {
        let store = self
            .stores
            .get(i)
            .ok_or_else(|| ServeError::Internal("no store configured".into()))?;
        let mut slot = store.client.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.connection().close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let addr = store.target.addr;
        let connect = StoreClient::connect(addr, store.target.tls.clone());
        let c = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(ServeError::Unavailable(format!("store {addr}: {e}"))),
            Err(_) => {
                return Err(ServeError::Unavailable(format!(
                    "store {addr}: no answer within {:?}",
                    self.connect_timeout
                )))
            }
        };
        tracing::info!(store = %store.target.addr, "connected to store");
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The client for the store holding `key`.
    pub(crate) async fn client_for(&self, key: &ChunkKey) -> Result<StoreClient, ServeError> {
        self.client(self.index_of(key)).await
    }

    /// Forgets store `i`'s connection if `e` says it is dead; returns `e` as a [`ServeError`].
    pub(crate) async fn failed(&self, key: &ChunkKey, e: TransportError) -> ServeError {
        if connection_lost(&e) {
            if let Some(store) = self.stores.get(self.index_of(key)) {
                *store.client.lock().await = None;
            }
        }
        serve_error(e)
    }

    /// How many leading keys of the chain `keys` are stored, asking each store about the keys
    /// it holds (in chain order) and taking the earliest gap.
    pub(crate) async fn exists_prefix(&self, keys: &[ChunkKey]) -> Result<usize, ServeError> {
        let mut present = keys.len();
        for i in 0..self.stores.len() {
            let positions: Vec<usize> = (0..keys.len())
                .filter(|&k| self.index_of(&keys[k]) == i)
                .collect();
            if positions.is_empty() {
                continue;
            }
            let mine: Vec<ChunkKey> = positions.iter().map(|&k| keys[k]).collect();
            let client = self.client(i).await?;
            let n = match client.exists_prefix(&mine).await {
                Ok(n) => n,
                Err(e) => return Err(self.failed(&mine[0], e).await),
            };
            if let Some(&gap) = positions.get(n) {
                present = present.min(gap);
            }
        }
        Ok(present)
    }
}
