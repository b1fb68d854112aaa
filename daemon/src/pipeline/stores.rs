//! The set of remote stores a pipeline talks to: which store holds which chunk key, prefix
//! lookups across stores, and lazy (re)connection.
//!
//! Keys are spread by their first byte, so every node maps a key to the same store without
//! coordination. A connection is opened on first use and dropped after a connection-level
//! error, so the daemon starts before its stores and survives their restarts. A store killed
//! without closing its connections is noticed by the QUIC keep-alive and idle timeout of
//! [`StoreTarget::options`] (1 s and 3 s by default): requests on the dead connection fail
//! then, and the next one dials again.
//!
//! Each store gets `connections_per_store` connections, handed out round robin: quinn drives
//! one connection on one task, which tops out near 4 Gbit/s of CPU, so a fetch only goes
//! faster than that over several connections (each client has its own UDP socket).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvfetcher_codec::ChunkKey;
use tokio::sync::Mutex;

use super::StoreError;
use crate::transport::{ClientOptions, StoreClient, StoreClientError, TlsClientConfig};

/// How to reach one store.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// UDP address.
    pub addr: SocketAddr,
    /// TLS trust, server name and optional token.
    pub tls: TlsClientConfig,
    /// Transport options, notably the keep-alive and idle timeout that bound how long a
    /// dead store goes unnoticed.
    pub options: ClientOptions,
}

/// One connection slot: empty until first use and after its connection died.
type Slot = Mutex<Option<StoreClient>>;

#[derive(Debug)]
struct Store {
    target: StoreTarget,
    /// At least one slot.
    slots: Vec<Slot>,
    /// Round-robin cursor over `slots`.
    next: AtomicUsize,
}

/// The stores of one pipeline; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Stores {
    stores: Arc<Vec<Store>>,
    connect_timeout: Duration,
}

/// Maps a transport error to the pipeline's view of it.
pub(crate) fn store_error(e: StoreClientError) -> StoreError {
    match e {
        StoreClientError::NotFound(m) => StoreError::NotFound(m),
        StoreClientError::Corrupt(m) => StoreError::Corrupt(m),
        // Only profile fetches bound what they accept: such an object is no usable profile.
        e @ StoreClientError::TooLarge { .. } => StoreError::Corrupt(e.to_string()),
        StoreClientError::InvalidObject(m) => StoreError::InvalidObject(m.to_string()),
        other => StoreError::Unavailable(format!("store: {other}")),
    }
}

/// Whether the error means the connection is gone (as opposed to one request failing).
fn connection_lost(e: &StoreClientError) -> bool {
    matches!(
        e,
        StoreClientError::Connection(_)
            | StoreClientError::Connect(_)
            | StoreClientError::Write(_)
            | StoreClientError::Read(_)
            | StoreClientError::Endpoint(_)
    )
}

/// The slot's client if it holds one whose connection is still open.
fn open_client(slot: &Option<StoreClient>) -> Option<StoreClient> {
    slot.as_ref()
        .filter(|c| c.connection().close_reason().is_none())
        .cloned()
}

impl Stores {
    /// Stores reached at `targets` with `connections` connections each (at least one);
    /// nothing is connected yet.
    pub(crate) fn new(
        targets: Vec<StoreTarget>,
        connect_timeout: Duration,
        connections: usize,
    ) -> Stores {
        let stores = targets
            .into_iter()
            .map(|target| Store {
                target,
                slots: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
                next: AtomicUsize::new(0),
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

    fn store(&self, i: usize) -> Result<&Store, StoreError> {
        self.stores.get(i).ok_or(StoreError::NoStore)
    }

    /// A connected client for store `i`, the next of its connections in round-robin order,
    /// connecting it if needed.
    pub(crate) async fn client(&self, i: usize) -> Result<StoreClient, StoreError> {
        let store = self.store(i)?;
        let n = store.next.fetch_add(1, Ordering::Relaxed) % store.slots.len();
        self.connected(store, n).await
    }

    /// Any open client for store `i` (for small requests such as lookups): one already
    /// connected and not busy connecting if there is one, so a lookup never waits for a
    /// handshake of a connection it does not need; else the first slot, connected.
    async fn any_client(&self, i: usize) -> Result<StoreClient, StoreError> {
        let store = self.store(i)?;
        for slot in &store.slots {
            if let Some(c) = slot.try_lock().ok().and_then(|s| open_client(&s)) {
                return Ok(c);
            }
        }
        self.connected(store, 0).await
    }

    /// Slot `n` of `store`, (re)connected if empty or dead.
    async fn connected(&self, store: &Store, n: usize) -> Result<StoreClient, StoreError> {
        let mut slot = store.slots[n].lock().await;
        if let Some(c) = open_client(&slot) {
            return Ok(c);
        }
        let addr = store.target.addr;
        let connect =
            StoreClient::connect_with(addr, store.target.tls.clone(), store.target.options);
        let c = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(StoreError::Unavailable(format!("store {addr}: {e}"))),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "store {addr}: no answer within {:?}",
                    self.connect_timeout
                )))
            }
        };
        tracing::info!(store = %addr, connection = n, "connected to store");
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The client for the store holding `key`.
    pub(crate) async fn client_for(&self, key: &ChunkKey) -> Result<StoreClient, StoreError> {
        self.client(self.index_of(key)).await
    }

    /// Forgets the dead connections of the store holding `key` if `e` says a connection is
    /// lost; returns `e` as a [`StoreError`].
    ///
    /// The caller does not say which connection failed: the closed ones are dropped, and if
    /// none is closed (a stream was cut off) all of them are, as with a single connection.
    /// Requests still running on a dropped client keep its connection until they finish.
    pub(crate) async fn failed(&self, key: &ChunkKey, e: StoreClientError) -> StoreError {
        if connection_lost(&e) {
            if let Some(store) = self.stores.get(self.index_of(key)) {
                let mut guards = Vec::with_capacity(store.slots.len());
                for slot in &store.slots {
                    guards.push(slot.lock().await);
                }
                let dead = |s: &Option<StoreClient>| {
                    s.as_ref()
                        .is_some_and(|c| c.connection().close_reason().is_some())
                };
                let any_dead = guards.iter().any(|g| dead(g));
                for g in &mut guards {
                    if !any_dead || dead(g) {
                        **g = None;
                    }
                }
            }
        }
        store_error(e)
    }

    /// How many leading keys of the chain `keys` are stored, asking each store about the keys
    /// it holds (in chain order) and taking the earliest gap.
    pub(crate) async fn exists_prefix(&self, keys: &[ChunkKey]) -> Result<usize, StoreError> {
        let mut present = keys.len();
        for i in 0..self.stores.len() {
            let positions: Vec<usize> = (0..keys.len())
                .filter(|&k| self.index_of(&keys[k]) == i)
                .collect();
            if positions.is_empty() {
                continue;
            }
            let mine: Vec<ChunkKey> = positions.iter().map(|&k| keys[k]).collect();
            let client = self.any_client(i).await?;
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
