//! An in-memory backend: for benchmarks (storage out of the picture) and tests. Nothing
//! survives the process.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use kvfetcher_codec::{ChunkKey, ModelFingerprint};

use super::storage::{CommitMode, ObjectWriter, Storage, StorageError, Usage};

type Objects = HashMap<ChunkKey, (ModelFingerprint, Bytes)>;

/// Objects held in a map.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    objects: Arc<RwLock<Objects>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// Inserts an object directly (no checks), as a put would.
    pub fn insert(&self, key: ChunkKey, model: ModelFingerprint, bytes: Bytes) -> bool {
        self.write().insert(key, (model, bytes)).is_none()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects> {
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Objects> {
        self.objects.write().unwrap_or_else(|p| p.into_inner())
    }
}

struct MemoryWriter {
    store: MemoryBackend,
    key: ChunkKey,
    buf: Vec<u8>,
}

#[async_trait]
impl ObjectWriter for MemoryWriter {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    async fn commit(
        self: Box<Self>,
        model: ModelFingerprint,
        mode: CommitMode,
    ) -> Result<bool, StorageError> {
        let mut objects = self.store.write();
        if mode == CommitMode::CreateNew && objects.contains_key(&self.key) {
            return Err(StorageError::Exists(self.key));
        }
        Ok(objects.insert(self.key, (model, self.buf.into())).is_none())
    }

    async fn abort(self: Box<Self>) {}
}

#[async_trait]
impl Storage for MemoryBackend {
    async fn begin_put(&self, key: &ChunkKey) -> Result<Box<dyn ObjectWriter>, StorageError> {
        Ok(Box::new(MemoryWriter {
            store: self.clone(),
            key: *key,
            buf: Vec::new(),
        }))
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Bytes>, StorageError> {
        Ok(self.read().get(key).map(|(_, b)| b.clone()))
    }

    async fn exists(&self, key: &ChunkKey) -> Result<bool, StorageError> {
        Ok(self.read().contains_key(key))
    }

    async fn list(&self, model: &ModelFingerprint) -> Result<Vec<ChunkKey>, StorageError> {
        let mut keys: Vec<ChunkKey> = self
            .read()
            .iter()
            .filter(|(_, (m, _))| m == model)
            .map(|(k, _)| *k)
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &ChunkKey) -> Result<bool, StorageError> {
        Ok(self.write().remove(key).is_some())
    }

    async fn usage(&self) -> Result<Usage, StorageError> {
        let m = self.read();
        Ok(Usage {
            objects: m.len() as u64,
            bytes: m.values().map(|(_, b)| b.len() as u64).sum(),
        })
    }
}
