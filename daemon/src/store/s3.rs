//! The scale-out backend: any S3-compatible object store (Garage, MinIO, AWS) through the
//! `object_store` crate.
//!
//! Names: `objects/<key hex>` for objects and `models/<model hex>/<key hex>` (empty) for the
//! per-model index. An upload is buffered and written with one PUT at commit: S3 PUTs are
//! atomic, so a crash never leaves a partial object visible.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use kvfetcher_codec::{ChunkKey, ModelFingerprint};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

use super::storage::{key_from_name, CommitMode, ObjectWriter, Storage, StorageError, Usage};

/// Where an S3-compatible bucket is and how to sign requests to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
    /// Region name (`garage` for Garage's default).
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_region() -> String {
    "garage".into()
}

impl S3Config {
    /// Reads `KVF_S3_ENDPOINT`, `KVF_S3_BUCKET`, `KVF_S3_ACCESS_KEY`, `KVF_S3_SECRET_KEY` and
    /// optionally `KVF_S3_REGION`; `None` unless the first four are all set.
    pub fn from_env() -> Option<S3Config> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Some(S3Config {
            endpoint: var("KVF_S3_ENDPOINT")?,
            bucket: var("KVF_S3_BUCKET")?,
            access_key: var("KVF_S3_ACCESS_KEY")?,
            secret_key: var("KVF_S3_SECRET_KEY")?,
            region: var("KVF_S3_REGION").unwrap_or_else(default_region),
        })
    }
}

/// A bucket-backed store.
#[derive(Debug, Clone)]
pub struct S3Backend {
    store: Arc<dyn ObjectStore>,
}

impl S3Backend {
    /// Connects (lazily: no request is made until the first operation).
    pub fn new(cfg: &S3Config) -> Result<S3Backend, StorageError> {
        let store = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_access_key_id(&cfg.access_key)
            .with_secret_access_key(&cfg.secret_key)
            .with_region(&cfg.region)
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .build()?;
        Ok(S3Backend {
            store: Arc::new(store),
        })
    }

    fn object(key: &ChunkKey) -> ObjPath {
        ObjPath::from(format!("objects/{}", key.to_hex()))
    }

    fn marker(model: &ModelFingerprint, key: &ChunkKey) -> ObjPath {
        ObjPath::from(format!("models/{}/{}", model.to_hex(), key.to_hex()))
    }
}

struct S3Writer {
    store: Arc<dyn ObjectStore>,
    key: ChunkKey,
    parts: Vec<Bytes>,
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.parts.push(bytes);
        Ok(())
    }

    /// `CreateNew` checks the key with a HEAD before the PUT: unlike `LocalDir`, two puts of
    /// one key that commit at the same moment may both succeed (S3 conditional PUTs are not
    /// available on every S3-compatible store).
    async fn commit(
        self: Box<Self>,
        model: ModelFingerprint,
        mode: CommitMode,
    ) -> Result<bool, StorageError> {
        let path = S3Backend::object(&self.key);
        let existed = head_exists(&*self.store, &path).await?;
        if existed && mode == CommitMode::CreateNew {
            return Err(StorageError::Exists(self.key));
        }
        let payload: PutPayload = self.parts.into_iter().collect();
        self.store.put(&path, payload).await?;
        self.store
            .put(&S3Backend::marker(&model, &self.key), PutPayload::default())
            .await?;
        Ok(!existed)
    }

    async fn abort(self: Box<Self>) {}
}

async fn head_exists(store: &dyn ObjectStore, path: &ObjPath) -> Result<bool, StorageError> {
    match store.head(path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl Storage for S3Backend {
    async fn begin_put(&self, key: &ChunkKey) -> Result<Box<dyn ObjectWriter>, StorageError> {
        Ok(Box::new(S3Writer {
            store: self.store.clone(),
            key: *key,
            parts: Vec::new(),
        }))
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Bytes>, StorageError> {
        match self.store.get(&Self::object(key)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, key: &ChunkKey) -> Result<bool, StorageError> {
        head_exists(&*self.store, &Self::object(key)).await
    }

    async fn list(&self, model: &ModelFingerprint) -> Result<Vec<ChunkKey>, StorageError> {
        let prefix = ObjPath::from(format!("models/{}", model.to_hex()));
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut keys = Vec::with_capacity(metas.len());
        for m in metas {
            let name = m.location.filename().unwrap_or_default().to_string();
            keys.push(key_from_name(&name)?);
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &ChunkKey) -> Result<bool, StorageError> {
        let path = Self::object(key);
        let existed = head_exists(&*self.store, &path).await?;
        if existed {
            self.store.delete(&path).await?;
        }
        let hex = key.to_hex();
        let markers: Vec<_> = self
            .store
            .list(Some(&ObjPath::from("models")))
            .try_collect()
            .await?;
        for m in markers
            .into_iter()
            .filter(|m| m.location.filename() == Some(hex.as_str()))
        {
            self.store.delete(&m.location).await?;
        }
        Ok(existed)
    }

    async fn usage(&self) -> Result<Usage, StorageError> {
        let metas: Vec<_> = self
            .store
            .list(Some(&ObjPath::from("objects")))
            .try_collect()
            .await?;
        Ok(Usage {
            objects: metas.len() as u64,
            bytes: metas.iter().map(|m| m.size as u64).sum(),
        })
    }
}
