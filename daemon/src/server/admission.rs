//! Who holds a place in the daemon: connections still in their handshake, and connected
//! clients. No I/O.
//!
//! Handshakes have their own table, capped, and never count as clients: a burst of connections
//! that never say hello cannot fill the client table. At the cap the *oldest* pending handshake
//! gives way to the new one, so a real client, whose hello follows its connect at once, gets
//! through whatever a burst of silent connections does. Connected clients are capped in total
//! and per uid (from `SO_PEERCRED`), so one user cannot take every place.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// Locks `m`; every mutation here is a single insert, remove or count change, so a poisoned
/// table is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    /// Pending handshakes, oldest first; dropping a sender tells its handshake to give way.
    slots: BTreeMap<u64, oneshot::Sender<()>>,
}

/// The table of connections in their handshake (or being refused), capped.
#[derive(Debug)]
pub(crate) struct Handshakes {
    cap: usize,
    pending: Mutex<Pending>,
}

impl Handshakes {
    /// A table of at most `cap` (at least one) pending handshakes.
    pub(crate) fn new(cap: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            cap: cap.max(1),
            pending: Mutex::default(),
        })
    }

    /// A place for a new connection's handshake. At the cap the oldest pending handshake is
    /// told to give way ([`HandshakeSlot::evicted`]); returns whether one was.
    pub(crate) fn begin(self: &Arc<Self>) -> (HandshakeSlot, bool) {
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        let evicted = p.slots.len() >= self.cap && p.slots.pop_first().is_some();
        p.next += 1;
        let id = p.next;
        p.slots.insert(id, tx);
        let slot = HandshakeSlot {
            id,
            table: self.clone(),
            evicted: rx,
        };
        (slot, evicted)
    }

    /// Handshakes pending now.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        lock(&self.pending).slots.len()
    }
}

/// One connection's place in [`Handshakes`], given back when dropped.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    id: u64,
    table: Arc<Handshakes>,
    evicted: oneshot::Receiver<()>,
}

impl HandshakeSlot {
    /// Resolves once a newer connection took this place: the handshake must end.
    pub(crate) async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.table.pending).slots.remove(&self.id);
    }
}

/// Why a client that completed its handshake gets no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The daemon has `max` clients.
    MaxClients {
        /// The limit.
        max: usize,
    },
    /// The client's uid has `max` clients.
    MaxClientsPerUid {
        /// The uid.
        uid: u32,
        /// The limit.
        max: usize,
    },
}

impl Refusal {
    /// Counts this refusal in `m`.
    pub(crate) fn count(self, m: &Metrics) {
        match self {
            Refusal::MaxClients { .. } => m.local_refusals.max_clients.add(1),
            Refusal::MaxClientsPerUid { .. } => m.local_refusals.max_clients_per_uid.add(1),
        }
    }

    /// The message sent with the `busy` error.
    pub(crate) fn message(self) -> String {
        match self {
            Refusal::MaxClients { max } => format!("too many clients (limit {max})"),
            Refusal::MaxClientsPerUid { uid, max } => {
                format!("too many clients of uid {uid} (limit {max} per uid)")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Connected {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// Connected clients (handshake done), in total and per uid.
#[derive(Debug, Default)]
pub(crate) struct ClientTable {
    connected: Mutex<Connected>,
}

impl ClientTable {
    /// A place for a client of `uid`, unless the daemon has `max_total` clients or the uid has
    /// `max_per_uid`.
    pub(crate) fn admit(
        self: &Arc<Self>,
        uid: u32,
        max_total: usize,
        max_per_uid: usize,
    ) -> Result<ClientSlot, Refusal> {
        let mut c = lock(&self.connected);
        if c.total >= max_total {
            return Err(Refusal::MaxClients { max: max_total });
        }
        let mine = c.by_uid.entry(uid).or_default();
        if *mine >= max_per_uid {
            return Err(Refusal::MaxClientsPerUid {
                uid,
                max: max_per_uid,
            });
        }
        *mine += 1;
        c.total += 1;
        Ok(ClientSlot {
            uid,
            table: self.clone(),
        })
    }

    /// Clients connected now.
    pub(crate) fn total(&self) -> usize {
        lock(&self.connected).total
    }
}

/// One client's place in the [`ClientTable`], given back when dropped.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    uid: u32,
    table: Arc<ClientTable>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.table.connected);
        c.total -= 1;
        if let Some(n) = c.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_handshake_gives_way() {
        let h = Handshakes::new(2);
        let (mut a, ea) = h.begin();
        let (b, eb) = h.begin();
        assert!(!ea && !eb);
        let (c, ec) = h.begin();
        assert!(ec);
        assert_eq!(h.pending(), 2);
        a.evicted().await;
        drop(b);
        assert_eq!(h.pending(), 1);
        let (_d, ed) = h.begin();
        assert!(!ed);
        drop(c);
        drop(a);
        assert_eq!(h.pending(), 1);
    }

    #[test]
    fn clients_are_capped_in_total_and_per_uid() {
        let t = Arc::new(ClientTable::default());
        let a = t.admit(1, 3, 2).unwrap();
        let _b = t.admit(1, 3, 2).unwrap();
        assert_eq!(
            t.admit(1, 3, 2).unwrap_err(),
            Refusal::MaxClientsPerUid { uid: 1, max: 2 }
        );
        let _c = t.admit(2, 3, 2).unwrap();
        assert_eq!(
            t.admit(3, 3, 2).unwrap_err(),
            Refusal::MaxClients { max: 3 }
        );
        assert_eq!(t.total(), 3);
        drop(a);
        assert_eq!(t.total(), 2);
        let _d = t.admit(1, 3, 2).unwrap();
        assert!(Refusal::MaxClientsPerUid { uid: 7, max: 2 }
            .message()
            .contains("uid 7"));
    }
}
