//! Where the fetch driver reads chunk objects: a [`SectionSource`] opens an object by key (its
//! header, then the sections asked for, one at a time) and answers prefix lookups. The stores
//! over QUIC (`stores::Stores`) are the production source; [`MemorySource`] holds objects in
//! memory, so a whole fetch (planning, verification, decode, restore) runs in tests without a
//! store, a network or TLS, as the planner does.
//!
//! A source checks what it hands out as the QUIC client does: a header parses and carries the
//! key asked for, and every section passes its length and checksum, else
//! [`StoreError::Corrupt`]. Whether a header is the chunk the fetch wanted (model, token range,
//! shape) is the fetch's own check (`verify`), whatever the source.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kvfetcher_codec::{ChunkKey, ProfileId};

use super::stores::Stores;
use super::StoreError;
use crate::transport::{SectionCheck, SectionStream};

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One object's sections being received, in the order they were asked for.
///
/// Read [`SectionReader::check`] any time, then call [`SectionReader::next_section`] until
/// `None`.
pub trait SectionReader: Send {
    /// The parsed header the sections are checked against.
    fn check(&self) -> &Arc<SectionCheck>;

    /// Bytes of header received with this reader (0 when it was opened with a known header).
    fn header_len(&self) -> usize;

    /// The next section, `(index, bytes)` with its checksum verified; `None` after the last.
    fn next_section(&mut self) -> BoxFuture<'_, Result<Option<(usize, Bytes)>, StoreError>>;
}

/// Where a fetch reads chunk objects from.
pub trait SectionSource: std::fmt::Debug + Send + Sync + 'static {
    /// Opens object `key`: its header (checked to parse and to carry `key`) followed by
    /// `sections`. A key not stored is [`StoreError::NotFound`].
    fn open<'a>(
        &'a self,
        key: &'a ChunkKey,
        sections: &'a [usize],
    ) -> BoxFuture<'a, Result<Box<dyn SectionReader>, StoreError>>;

    /// Opens `sections` of the object whose header `check` holds (from an earlier
    /// [`SectionSource::open`]), without the header.
    fn open_known<'a>(
        &'a self,
        check: &'a Arc<SectionCheck>,
        sections: &'a [usize],
    ) -> BoxFuture<'a, Result<Box<dyn SectionReader>, StoreError>>;

    /// How many leading keys of the chain `keys` are stored.
    fn exists_prefix<'a>(
        &'a self,
        keys: &'a [ChunkKey],
    ) -> BoxFuture<'a, Result<usize, StoreError>>;

    /// The bytes of codec profile `id` (the object under `id.object_key()`), checked to hash
    /// to `id`; one of more than `max_len` bytes is [`StoreError::Corrupt`] without being read
    /// whole. Not stored: [`StoreError::NotFound`].
    fn get_profile<'a>(
        &'a self,
        id: &'a ProfileId,
        max_len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>>;
}

/// A [`SectionStream`] of a store connection; a failure forgets the connection if it is lost.
struct StoreSections {
    stream: SectionStream,
    stores: Stores,
}

impl SectionReader for StoreSections {
    fn check(&self) -> &Arc<SectionCheck> {
        self.stream.check()
    }

    fn header_len(&self) -> usize {
        self.stream.header().len()
    }

    fn next_section(&mut self) -> BoxFuture<'_, Result<Option<(usize, Bytes)>, StoreError>> {
        Box::pin(async move {
            match self.stream.next_section().await {
                Ok(s) => Ok(s),
                Err(e) => {
                    let key = self.stream.check().key();
                    Err(self.stores.failed(&key, e).await)
                }
            }
        })
    }
}

impl SectionSource for Stores {
    fn open<'a>(
        &'a self,
        key: &'a ChunkKey,
        sections: &'a [usize],
    ) -> BoxFuture<'a, Result<Box<dyn SectionReader>, StoreError>> {
        Box::pin(async move {
            let client = self.client_for(key).await?;
            match client.open_sections(key, sections).await {
                Ok(stream) => Ok(Box::new(StoreSections {
                    stream,
                    stores: self.clone(),
                }) as Box<dyn SectionReader>),
                Err(e) => Err(self.failed(key, e).await),
            }
        })
    }

    fn open_known<'a>(
        &'a self,
        check: &'a Arc<SectionCheck>,
        sections: &'a [usize],
    ) -> BoxFuture<'a, Result<Box<dyn SectionReader>, StoreError>> {
        Box::pin(async move {
            let key = check.key();
            let client = self.client_for(&key).await?;
            match client.open_known_sections(check, sections).await {
                Ok(stream) => Ok(Box::new(StoreSections {
                    stream,
                    stores: self.clone(),
                }) as Box<dyn SectionReader>),
                Err(e) => Err(self.failed(&key, e).await),
            }
        })
    }

    fn exists_prefix<'a>(
        &'a self,
        keys: &'a [ChunkKey],
    ) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(Stores::exists_prefix(self, keys))
    }

    fn get_profile<'a>(
        &'a self,
        id: &'a ProfileId,
        max_len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            let key = id.object_key();
            let client = self.client_for(&key).await?;
            match client.get_profile(id, max_len).await {
                Ok(bytes) => Ok(Bytes::from(bytes)),
                Err(e) => Err(self.failed(&key, e).await),
            }
        })
    }
}

/// Objects in memory, by key: a [`SectionSource`] for tests and benchmarks. Objects are not
/// checked on insert (a test may store a damaged one); what is read is checked as from a
/// store. A key marked [`MemorySource::truncate`] has its sections cut off after the header,
/// as a stream that ends early.
#[derive(Debug, Default)]
pub struct MemorySource {
    objects: Mutex<HashMap<ChunkKey, Bytes>>,
    truncated: Mutex<HashSet<ChunkKey>>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Stores `object` under `key` (replacing what was there), as is.
    pub fn insert(&self, key: ChunkKey, object: impl Into<Bytes>) {
        lock(&self.objects).insert(key, object.into());
    }

    /// Removes the object under `key`; returns it.
    pub fn remove(&self, key: &ChunkKey) -> Option<Bytes> {
        lock(&self.objects).remove(key)
    }

    /// The object under `key`.
    pub fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        lock(&self.objects).get(key).cloned()
    }

    /// Makes every later read of `key`'s sections end early (the stream is cut off).
    pub fn truncate(&self, key: ChunkKey) {
        lock(&self.truncated).insert(key);
    }

    /// A reader of `sections` of `key`'s object, checked against `known` or its own header.
    fn reader(
        &self,
        key: &ChunkKey,
        known: Option<&Arc<SectionCheck>>,
        sections: &[usize],
    ) -> Result<Box<dyn SectionReader>, StoreError> {
        let object = self
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        let (check, header_len) = match known {
            Some(check) => (check.clone(), 0),
            None => {
                let check = SectionCheck::from_header(&object)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if check.key() != *key {
                    return Err(StoreError::Corrupt(format!(
                        "header carries key {}",
                        check.key()
                    )));
                }
                let len = check.header_len();
                (Arc::new(check), len)
            }
        };
        let mut spans = Vec::with_capacity(sections.len());
        for &index in sections {
            let (offset, len) = check
                .span(index)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            spans.push((index, offset, len));
        }
        Ok(Box::new(MemorySections {
            object,
            check,
            header_len,
            spans: spans.into_iter(),
            truncated: lock(&self.truncated).contains(key),
        }))
    }
}

/// Locks `m`, whatever a panicking holder left (the maps stay consistent between calls).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sections of one object in memory.
struct MemorySections {
    object: Bytes,
    check: Arc<SectionCheck>,
    header_len: usize,
    spans: std::vec::IntoIter<(usize, u64, u64)>,
    truncated: bool,
}

impl SectionReader for MemorySections {
    fn check(&self) -> &Arc<SectionCheck> {
        &self.check
    }

    fn header_len(&self) -> usize {
        self.header_len
    }

    fn next_section(&mut self) -> BoxFuture<'_, Result<Option<(usize, Bytes)>, StoreError>> {
        let next = self.spans.next().map(|(index, offset, len)| {
            // What the QUIC client reports when a stream ends before the announced bytes.
            let cut = || StoreError::Unavailable("store: stream ended early".into());
            if self.truncated {
                return Err(cut());
            }
            let start = usize::try_from(offset).map_err(|_| cut())?;
            let end = usize::try_from(offset.saturating_add(len)).map_err(|_| cut())?;
            if end > self.object.len() {
                return Err(cut());
            }
            let bytes = self.object.slice(start..end);
            self.check
                .verify(index, &bytes)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((index, bytes))
        });
        Box::pin(std::future::ready(next.transpose()))
    }
}

impl SectionSource for MemorySource {
    fn open<'a>(
        &'a self,
        key: &'a ChunkKey,
        sections: &'a [usize],
    ) -> BoxFuture<'a, Result<Box<dyn SectionReader>, StoreError>> {
        Box::pin(std::future::ready(self.reader(key, None, sections)))
    }

    fn open_known<'a>(
        &'a self,
        check: &'a Arc<SectionCheck>,
        sections: &'a [usize],
    ) -> BoxFuture<'a, Result<Box<dyn SectionReader>, StoreError>> {
        Box::pin(std::future::ready(self.reader(
            &check.key(),
            Some(check),
            sections,
        )))
    }

    fn exists_prefix<'a>(
        &'a self,
        keys: &'a [ChunkKey],
    ) -> BoxFuture<'a, Result<usize, StoreError>> {
        let objects = lock(&self.objects);
        let n = keys
            .iter()
            .position(|k| !objects.contains_key(k))
            .unwrap_or(keys.len());
        Box::pin(std::future::ready(Ok(n)))
    }

    fn get_profile<'a>(
        &'a self,
        id: &'a ProfileId,
        max_len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        let got = match self.get(&id.object_key()) {
            None => Err(StoreError::NotFound(format!("no profile object {id}"))),
            Some(b) if b.len() as u64 > max_len => Err(StoreError::Corrupt(format!(
                "profile object {id} of {} bytes, more than the {max_len} accepted",
                b.len()
            ))),
            Some(b) if ProfileId::of_bytes(&b) != *id => Err(StoreError::Corrupt(format!(
                "profile object {id} hashes to {}",
                ProfileId::of_bytes(&b)
            ))),
            Some(b) => Ok(b),
        };
        Box::pin(std::future::ready(got))
    }
}
