//! The storage backend trait: where the store server keeps chunk objects.
//!
//! Backends hold opaque bytes under a chunk key, plus a per-model index for listing. They do
//! not check objects (the server does, before commit and before serving). A put goes through an
//! [`ObjectWriter`] so bytes can reach storage as they arrive; nothing is visible under the key
//! until [`ObjectWriter::commit`] returns.

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use kvfetcher_codec::{ChunkKey, ModelFingerprint};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Local file I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The object store (S3) failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A name in storage is not a valid key.
    #[error("bad name in storage: {0}")]
    BadName(String),
    /// The backend configuration is unusable.
    #[error("backend config: {0}")]
    Config(String),
    /// A [`CommitMode::CreateNew`] commit found an object already stored under its key (one
    /// committed meanwhile by another put): nothing was changed.
    #[error("object {0} is already stored")]
    Exists(ChunkKey),
}

/// What a commit does when the key already holds an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Store only if the key is absent, atomically: of concurrent puts of one key, exactly one
    /// commits and the others fail with [`StorageError::Exists`] (write-once).
    CreateNew,
    /// Store, replacing any object under the key.
    Replace,
}

/// Objects and bytes a backend holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Number of objects.
    pub objects: u64,
    /// Their total size.
    pub bytes: u64,
}

/// A put in progress. Call [`ObjectWriter::write`] for each piece, then `commit` or `abort`.
/// Dropping a writer without committing leaves nothing visible (temporary data may remain
/// until the backend's next start, which removes it).
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends bytes.
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError>;
    /// Makes the object durable and visible under its key, indexed under `model`; returns true
    /// when the key was not present before. With [`CommitMode::CreateNew`] a present key is
    /// [`StorageError::Exists`] and the stored object is left as it is.
    async fn commit(
        self: Box<Self>,
        model: ModelFingerprint,
        mode: CommitMode,
    ) -> Result<bool, StorageError>;
    /// Discards what was written.
    async fn abort(self: Box<Self>);
}

/// An object opened for ranged reads: every read sees the object as it was when opened, even if
/// a put replaces it meanwhile.
#[async_trait]
pub trait ObjectReader: Send + Sync {
    /// The object's length in bytes.
    fn size(&self) -> u64;
    /// Bytes `range` of the object; a range past the end is an error.
    async fn read(&self, range: Range<u64>) -> Result<Bytes, StorageError>;
}

/// An object already in memory.
struct InMemory(Bytes);

#[async_trait]
impl ObjectReader for InMemory {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes, StorageError> {
        if range.start > range.end || range.end > self.size() {
            return Err(StorageError::Io {
                op: "read",
                path: "(object in memory)".into(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Ok(self.0.slice(range.start as usize..range.end as usize))
    }
}

/// A place to keep chunk objects.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Starts a put of the object under `key`.
    async fn begin_put(&self, key: &ChunkKey) -> Result<Box<dyn ObjectWriter>, StorageError>;
    /// The whole object, or `None` when absent.
    async fn get(&self, key: &ChunkKey) -> Result<Option<Bytes>, StorageError>;
    /// The object opened for ranged reads, or `None` when absent, so that a request for a
    /// header or a few sections reads those, not the whole object. The default reads the whole
    /// object once (backends that can read ranges override it).
    async fn open(&self, key: &ChunkKey) -> Result<Option<Box<dyn ObjectReader>>, StorageError> {
        Ok(self
            .get(key)
            .await?
            .map(|b| Box::new(InMemory(b)) as Box<dyn ObjectReader>))
    }
    /// Whether the object is present.
    async fn exists(&self, key: &ChunkKey) -> Result<bool, StorageError>;
    /// Keys indexed under `model`.
    async fn list(&self, model: &ModelFingerprint) -> Result<Vec<ChunkKey>, StorageError>;
    /// Removes the object and its index entry; true when it existed.
    async fn delete(&self, key: &ChunkKey) -> Result<bool, StorageError>;
    /// What the backend holds.
    async fn usage(&self) -> Result<Usage, StorageError>;
}

/// Parses a 64-hex-digit file or object name as a key.
pub(crate) fn key_from_name(name: &str) -> Result<ChunkKey, StorageError> {
    ChunkKey::from_hex(name).map_err(|_| StorageError::BadName(name.to_string()))
}
