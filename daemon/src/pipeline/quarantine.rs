//! Chunks this daemon found corrupt lately, so that lookups and fetches stop before them and
//! agree on the good prefix. No I/O: every call takes `now`.
//!
//! The store's `ExistsPrefix` says only that an object is there, not that it is good, so a
//! lookup would count a damaged chunk that every fetch then fails on. A key stays here for
//! [`QUARANTINE_TTL`], or until this daemon saves the chunk again; an object replaced on the
//! store by another writer is used again once its entry expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvfetcher_codec::ChunkKey;

/// How long a corrupt chunk is skipped: long enough for an engine's retries to see the same
/// prefix as its lookups, short enough that a repaired object is used again without a restart.
pub(crate) const QUARANTINE_TTL: Duration = Duration::from_secs(600);

/// Keys held at most: 48 bytes each, so a burst of damaged objects costs at most ~200 KB; the
/// oldest entry gives way.
pub(crate) const QUARANTINE_CAP: usize = 4096;

/// The set of quarantined keys, with when each was found corrupt.
#[derive(Debug)]
pub(crate) struct Quarantine {
    ttl: Duration,
    cap: usize,
    keys: Mutex<HashMap<ChunkKey, Instant>>,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine::new(QUARANTINE_TTL, QUARANTINE_CAP)
    }
}

impl Quarantine {
    /// A quarantine keeping at most `cap` (at least one) keys for `ttl` each.
    pub(crate) fn new(ttl: Duration, cap: usize) -> Quarantine {
        Quarantine {
            ttl,
            cap: cap.max(1),
            keys: Mutex::default(),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkKey, Instant>> {
        // Every change is one insert or remove: a poisoned map is still consistent.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `key` was found corrupt at `now`.
    pub(crate) fn insert(&self, key: ChunkKey, now: Instant) {
        let mut keys = self.keys();
        if keys.len() >= self.cap && !keys.contains_key(&key) {
            keys.retain(|_, at| now.saturating_duration_since(*at) < self.ttl);
            if keys.len() >= self.cap {
                if let Some(oldest) = keys.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                    keys.remove(&oldest);
                }
            }
        }
        keys.insert(key, now);
    }

    /// Forgets `key` (its chunk was saved again).
    pub(crate) fn remove(&self, key: &ChunkKey) {
        self.keys().remove(key);
    }

    /// The index of the first key of `chain` quarantined at `now`, if any.
    pub(crate) fn first_in(&self, chain: &[ChunkKey], now: Instant) -> Option<usize> {
        let keys = self.keys();
        if keys.is_empty() {
            return None;
        }
        chain.iter().position(|k| {
            keys.get(k)
                .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_give_way_and_can_be_forgiven() {
        let q = Quarantine::new(Duration::from_secs(10), 2);
        let k = |b| ChunkKey([b; 32]);
        let t0 = Instant::now();
        let chain = [k(1), k(2), k(3)];
        assert_eq!(q.first_in(&chain, t0), None);
        q.insert(k(3), t0);
        q.insert(k(2), t0 + Duration::from_secs(1));
        assert_eq!(q.first_in(&chain, t0 + Duration::from_secs(2)), Some(1));
        // Full: the oldest (k3) gives way to k1.
        q.insert(k(1), t0 + Duration::from_secs(2));
        assert_eq!(q.first_in(&[k(3)], t0 + Duration::from_secs(2)), None);
        assert_eq!(q.first_in(&chain, t0 + Duration::from_secs(2)), Some(0));
        q.remove(&k(1));
        assert_eq!(q.first_in(&chain, t0 + Duration::from_secs(2)), Some(1));
        // Expired.
        assert_eq!(q.first_in(&chain, t0 + Duration::from_secs(11)), None);
    }
}
