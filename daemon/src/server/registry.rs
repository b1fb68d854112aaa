//! Every live fetch handle of the daemon, with the connection that owns it, and the daemon-wide
//! counters. Access checks live here: a handle answers only to its owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvfetcher_protocol::{DaemonStats, ErrorCode, PeerCred};
use tokio::task::AbortHandle;

use super::admission::ClientTable;
use crate::buffers::FetchBuffer;

/// One live fetch.
#[derive(Debug)]
pub(crate) struct Handle {
    /// The connection that started it.
    pub(crate) owner: u64,
    /// The owner's credentials, as recorded at accept.
    pub(crate) peer: PeerCred,
    /// Where it writes.
    pub(crate) dest: FetchBuffer,
    /// Its task, aborted on release or disconnect.
    pub(crate) task: Option<AbortHandle>,
}

/// Why a handle could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessError {
    /// No such handle.
    Unknown,
    /// The handle belongs to another connection.
    NotOwner,
}

impl AccessError {
    /// The protocol code and message for this refusal.
    pub(crate) fn report(self, fetch_id: u64) -> (ErrorCode, String) {
        match self {
            AccessError::Unknown => (ErrorCode::UnknownHandle, format!("no fetch {fetch_id}")),
            AccessError::NotOwner => (
                ErrorCode::PermissionDenied,
                format!("fetch {fetch_id} belongs to another client"),
            ),
        }
    }
}

/// Logs (for audit) and returns the refusal of `conn`'s access to another client's handle.
fn refuse(h: &Handle, conn: u64, fetch_id: u64) -> AccessError {
    tracing::warn!(
        fetch_id,
        conn,
        owner_conn = h.owner,
        owner_pid = ?h.peer.pid,
        owner_uid = h.peer.uid,
        "access to another client's fetch refused"
    );
    AccessError::NotOwner
}

/// Why a fetch got no handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchLimit {
    /// The connection holds `max` live handles.
    PerClient {
        /// The limit.
        max: usize,
    },
    /// The daemon holds `max` live handles.
    Total {
        /// The limit.
        max: usize,
    },
}

impl std::fmt::Display for FetchLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchLimit::PerClient { max } => {
                write!(f, "too many fetches on this connection (limit {max})")
            }
            FetchLimit::Total { max } => write!(f, "too many fetches in the daemon (limit {max})"),
        }
    }
}

/// The daemon-wide table of handles and counters.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    handles: Mutex<HashMap<u64, Handle>>,
    next_fetch: AtomicU64,
    next_conn: AtomicU64,
    /// Connected clients, capped in total and per uid.
    pub(crate) clients: Arc<ClientTable>,
    fetches_total: AtomicU64,
    tokens_restored: AtomicU64,
    saves_total: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        // Every mutation is one insert or remove: a poisoned map is still consistent.
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection id.
    pub(crate) fn new_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A connection ended: its handles are released and their tasks aborted.
    pub(crate) fn disconnect(&self, conn: u64) {
        let gone: Vec<Handle> = {
            let mut h = self.lock();
            let ids: Vec<u64> = h
                .iter()
                .filter(|(_, v)| v.owner == conn)
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter().filter_map(|k| h.remove(&k)).collect()
        };
        for g in gone {
            if let Some(t) = g.task {
                t.abort();
            }
        }
    }

    /// Drops every handle and aborts every fetch task (server shutdown).
    pub(crate) fn abort_all(&self) {
        let all: Vec<Handle> = self.lock().drain().map(|(_, h)| h).collect();
        for t in all.into_iter().filter_map(|h| h.task) {
            t.abort();
        }
    }

    /// A fresh, daemon-wide unique fetch id.
    pub(crate) fn new_fetch_id(&self) -> u64 {
        self.fetches_total.fetch_add(1, Ordering::Relaxed);
        self.next_fetch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Handles `conn` holds now.
    pub(crate) fn count_owned(&self, conn: u64) -> usize {
        self.lock().values().filter(|h| h.owner == conn).count()
    }

    /// Records a new handle unless its owner holds `per_client` handles or the daemon holds
    /// `total` (checked and inserted under one lock, so concurrent fetches cannot overshoot).
    pub(crate) fn try_insert(
        &self,
        fetch_id: u64,
        handle: Handle,
        per_client: usize,
        total: usize,
    ) -> Result<(), FetchLimit> {
        let mut h = self.lock();
        if h.len() >= total {
            return Err(FetchLimit::Total { max: total });
        }
        if h.values().filter(|v| v.owner == handle.owner).count() >= per_client {
            return Err(FetchLimit::PerClient { max: per_client });
        }
        h.insert(fetch_id, handle);
        Ok(())
    }

    /// Attaches the task of a handle (if it is still there).
    pub(crate) fn set_task(&self, fetch_id: u64, task: AbortHandle) {
        match self.lock().get_mut(&fetch_id) {
            Some(h) => h.task = Some(task),
            None => task.abort(),
        }
    }

    /// The destination of `fetch_id`, if `conn` owns it.
    pub(crate) fn get(&self, conn: u64, fetch_id: u64) -> Result<FetchBuffer, AccessError> {
        match self.lock().get(&fetch_id) {
            None => Err(AccessError::Unknown),
            Some(h) if h.owner != conn => Err(refuse(h, conn, fetch_id)),
            Some(h) => Ok(h.dest.clone()),
        }
    }

    /// Removes `fetch_id` if `conn` owns it, aborting its task.
    pub(crate) fn release(&self, conn: u64, fetch_id: u64) -> Result<(), AccessError> {
        let h = {
            let mut map = self.lock();
            match map.get(&fetch_id) {
                None => return Err(AccessError::Unknown),
                Some(h) if h.owner != conn => return Err(refuse(h, conn, fetch_id)),
                Some(_) => map.remove(&fetch_id),
            }
        };
        if let Some(t) = h.and_then(|h| h.task) {
            t.abort();
        }
        Ok(())
    }

    /// Removes `fetch_id` after its task ended by itself (failure, or nothing to share).
    pub(crate) fn finish_failed(&self, fetch_id: u64) {
        self.lock().remove(&fetch_id);
    }

    /// Counts a finished fetch.
    pub(crate) fn record_done(&self, tokens: u32) {
        self.tokens_restored
            .fetch_add(u64::from(tokens), Ordering::Relaxed);
    }

    /// Counts a finished save.
    pub(crate) fn record_save(&self) {
        self.saves_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters, as seen by a client with credentials `peer`.
    pub(crate) fn stats(&self, peer: PeerCred) -> DaemonStats {
        DaemonStats {
            clients: self.clients.total() as u32,
            fetches_active: self.lock().len() as u32,
            fetches_total: self.fetches_total.load(Ordering::Relaxed),
            tokens_restored: self.tokens_restored.load(Ordering::Relaxed),
            saves_total: self.saves_total.load(Ordering::Relaxed),
            peer,
        }
    }
}
