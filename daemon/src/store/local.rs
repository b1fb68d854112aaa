//! The embedded backend: a local directory, content-addressed by chunk key.
//!
//! Layout under the root: `objects/<first two hex digits>/<key hex>` holds each object,
//! `models/<model hex>/<key hex>` is an empty index entry, and `tmp/` holds uploads in
//! progress. A put writes `tmp/<key>.<n>.part`, fsyncs it, moves it to the final name (a hard
//! link for a write-once put, which fails if the name exists; a rename for a replace) and
//! fsyncs the directory, so a crash at any moment leaves either the old state or the whole new
//! object, never a partial one. Leftover `tmp/` files are removed when the backend opens.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use kvfetcher_codec::{ChunkKey, ModelFingerprint};
use tokio::io::AsyncWriteExt;

use super::storage::{
    key_from_name, CommitMode, ObjectReader, ObjectWriter, Storage, StorageError, Usage,
};

/// A directory-backed store.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: Arc<PathBuf>,
    counter: Arc<AtomicU64>,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl LocalDir {
    /// Opens (creating if needed) a store rooted at `root` and removes abandoned uploads.
    pub fn open(root: &Path) -> Result<LocalDir, StorageError> {
        for sub in ["objects", "models", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io("read", &tmp))? {
            let path = entry.map_err(io("read", &tmp))?.path();
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
        }
        Ok(LocalDir {
            root: Arc::new(root.to_path_buf()),
            counter: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the object of `key` lives (whether or not it exists).
    pub fn object_path(&self, key: &ChunkKey) -> PathBuf {
        let hex = key.to_hex();
        self.root.join("objects").join(&hex[..2]).join(hex)
    }

    fn model_dir(&self, model: &ModelFingerprint) -> PathBuf {
        self.root.join("models").join(model.to_hex())
    }
}

/// An object file opened once: positional reads on the blocking pool, so a replacing put
/// (a rename over the path) does not change what this reader sees.
struct FileReader {
    file: Arc<std::fs::File>,
    len: u64,
    path: PathBuf,
}

#[async_trait]
impl ObjectReader for FileReader {
    fn size(&self) -> u64 {
        self.len
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes, StorageError> {
        use std::os::unix::fs::FileExt;
        let file = self.file.clone();
        let n = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| io("read", &self.path)(std::io::Error::other("range exceeds memory")))?;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, range.start).map(|()| buf)
        })
        .await
        .map_err(|e| io("read", &self.path)(std::io::Error::other(e)))?;
        read.map(Bytes::from).map_err(io("read", &self.path))
    }
}

/// An upload into `tmp/`, renamed into place on commit.
struct LocalWriter {
    dir: LocalDir,
    key: ChunkKey,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
}

async fn sync_dir(path: &Path) -> Result<(), StorageError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&p)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &p))
    })
    .await
    .map_err(|e| StorageError::Io {
        op: "fsync",
        path: path.into(),
        source: std::io::Error::other(e),
    })?
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| StorageError::Config("write after close".into()))?;
        file.write_all(&bytes).await.map_err(io("write", &self.tmp))
    }

    /// `Replace` renames the upload over the key; `CreateNew` hard-links it to the key
    /// (`link(2)` fails when the name exists, atomically, where a rename would overwrite), then
    /// removes the temp name.
    async fn commit(
        mut self: Box<Self>,
        model: ModelFingerprint,
        mode: CommitMode,
    ) -> Result<bool, StorageError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| StorageError::Config("commit after close".into()))?;
        let result = async {
            let mut file = file;
            file.flush().await.map_err(io("write", &self.tmp))?;
            file.sync_all().await.map_err(io("fsync", &self.tmp))?;
            drop(file);
            let dest = self.dir.object_path(&self.key);
            let parent = dest.parent().unwrap_or(&self.dir.root).to_path_buf();
            tokio::fs::create_dir_all(&parent)
                .await
                .map_err(io("create", &parent))?;
            let existed = match mode {
                CommitMode::Replace => {
                    let existed = tokio::fs::try_exists(&dest)
                        .await
                        .map_err(io("stat", &dest))?;
                    tokio::fs::rename(&self.tmp, &dest)
                        .await
                        .map_err(io("rename", &dest))?;
                    existed
                }
                CommitMode::CreateNew => {
                    match tokio::fs::hard_link(&self.tmp, &dest).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                            return Err(StorageError::Exists(self.key));
                        }
                        Err(e) => return Err(io("link", &dest)(e)),
                    }
                    // The object is in place; a temp name left by a crash here is removed at
                    // the next start.
                    tokio::fs::remove_file(&self.tmp)
                        .await
                        .map_err(io("remove", &self.tmp))?;
                    false
                }
            };
            sync_dir(&parent).await?;
            let mdir = self.dir.model_dir(&model);
            tokio::fs::create_dir_all(&mdir)
                .await
                .map_err(io("create", &mdir))?;
            let marker = mdir.join(self.key.to_hex());
            tokio::fs::write(&marker, b"")
                .await
                .map_err(io("write", &marker))?;
            Ok(!existed)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        result
    }

    async fn abort(mut self: Box<Self>) {
        self.file = None;
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            // Dropped mid-upload (connection lost): the temp file is never renamed; remove it.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[async_trait]
impl Storage for LocalDir {
    async fn begin_put(&self, key: &ChunkKey) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}.{}.{n}.part", key.to_hex(), std::process::id()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(io("create", &tmp))?;
        Ok(Box::new(LocalWriter {
            dir: self.clone(),
            key: *key,
            tmp,
            file: Some(file),
        }))
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Bytes>, StorageError> {
        let path = self.object_path(key);
        match tokio::fs::read(&path).await {
            Ok(v) => Ok(Some(v.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    async fn open(&self, key: &ChunkKey) -> Result<Option<Box<dyn ObjectReader>>, StorageError> {
        let path = self.object_path(key);
        let opened = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let file = std::fs::File::open(&path)?;
                let len = file.metadata()?.len();
                Ok::<_, std::io::Error>((file, len))
            }
        })
        .await
        .map_err(|e| io("open", &path)(std::io::Error::other(e)))?;
        match opened {
            Ok((file, len)) => Ok(Some(Box::new(FileReader {
                file: Arc::new(file),
                len,
                path,
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("open", &path)(e)),
        }
    }

    async fn exists(&self, key: &ChunkKey) -> Result<bool, StorageError> {
        let path = self.object_path(key);
        tokio::fs::try_exists(&path)
            .await
            .map_err(io("stat", &path))
    }

    async fn list(&self, model: &ModelFingerprint) -> Result<Vec<ChunkKey>, StorageError> {
        let dir = self.model_dir(model);
        let mut rd = match tokio::fs::read_dir(&dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("read", &dir)(e)),
        };
        let mut keys = Vec::new();
        while let Some(entry) = rd.next_entry().await.map_err(io("read", &dir))? {
            let key = key_from_name(&entry.file_name().to_string_lossy())?;
            // An index entry whose object is gone (crash between rename and index) is skipped.
            if self.exists(&key).await? {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &ChunkKey) -> Result<bool, StorageError> {
        let path = self.object_path(key);
        let existed = match tokio::fs::remove_file(&path).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io("remove", &path)(e)),
        };
        let models = self.root.join("models");
        let mut rd = tokio::fs::read_dir(&models)
            .await
            .map_err(io("read", &models))?;
        let hex = key.to_hex();
        while let Some(entry) = rd.next_entry().await.map_err(io("read", &models))? {
            let marker = entry.path().join(&hex);
            match tokio::fs::remove_file(&marker).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &marker)(e)),
            }
        }
        Ok(existed)
    }

    async fn usage(&self) -> Result<Usage, StorageError> {
        let objects = self.root.join("objects");
        tokio::task::spawn_blocking(move || {
            let mut u = Usage::default();
            for shard in std::fs::read_dir(&objects).map_err(io("read", &objects))? {
                let shard = shard.map_err(io("read", &objects))?.path();
                for entry in std::fs::read_dir(&shard).map_err(io("read", &shard))? {
                    let meta = entry
                        .and_then(|e| e.metadata())
                        .map_err(io("stat", &shard))?;
                    u.objects += 1;
                    u.bytes += meta.len();
                }
            }
            Ok(u)
        })
        .await
        .map_err(|e| StorageError::Config(format!("usage task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_makes_visible_abort_and_drop_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path()).unwrap();
        let (k1, k2, k3) = (ChunkKey([1; 32]), ChunkKey([2; 32]), ChunkKey([3; 32]));
        let model = ModelFingerprint([7; 32]);
        let mut w = store.begin_put(&k1).await.unwrap();
        w.write(Bytes::from_static(b"hello ")).await.unwrap();
        assert!(!store.exists(&k1).await.unwrap(), "visible before commit");
        w.write(Bytes::from_static(b"world")).await.unwrap();
        assert!(w.commit(model, CommitMode::CreateNew).await.unwrap());
        assert_eq!(
            store.get(&k1).await.unwrap().unwrap(),
            Bytes::from_static(b"hello world")
        );
        let mut w = store.begin_put(&k2).await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        w.abort().await;
        let mut w = store.begin_put(&k3).await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(w);
        assert_eq!(store.get(&k2).await.unwrap(), None);
        assert_eq!(store.get(&k3).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(store.list(&model).await.unwrap(), vec![k1]);
        assert_eq!(
            store.usage().await.unwrap(),
            Usage {
                objects: 1,
                bytes: 11
            }
        );
        assert!(store.delete(&k1).await.unwrap());
        assert!(!store.delete(&k1).await.unwrap());
        assert!(store.list(&model).await.unwrap().is_empty());
    }

    /// An opened object reads ranges of itself, and goes on reading the object it opened when a
    /// put replaces it; absent keys open to `None`.
    #[tokio::test]
    async fn opened_objects_read_ranges_of_what_was_opened() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path()).unwrap();
        let (key, model) = (ChunkKey([4; 32]), ModelFingerprint([7; 32]));
        let put = |bytes: &'static [u8]| {
            let store = store.clone();
            async move {
                let mut w = store.begin_put(&key).await.unwrap();
                w.write(Bytes::from_static(bytes)).await.unwrap();
                w.commit(model, CommitMode::Replace).await.unwrap();
            }
        };
        assert!(store.open(&key).await.unwrap().is_none());
        put(b"0123456789").await;
        let object = store.open(&key).await.unwrap().unwrap();
        assert_eq!(object.size(), 10);
        assert_eq!(object.read(2..5).await.unwrap(), Bytes::from_static(b"234"));
        put(b"abcdefghijklmnop").await;
        assert_eq!(
            object.read(7..10).await.unwrap(),
            Bytes::from_static(b"789")
        );
        assert!(object.read(8..12).await.is_err(), "a range past the end");
        let again = store.open(&key).await.unwrap().unwrap();
        assert_eq!(again.size(), 16);
        assert_eq!(again.read(0..3).await.unwrap(), Bytes::from_static(b"abc"));
    }

    /// Write-once commits of one key race: exactly one stores its object, intact, the others
    /// get `Exists` and leave no temp file; a `Replace` commit then overwrites it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_new_commits_of_one_key_store_exactly_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path()).unwrap();
        let model = ModelFingerprint([7; 32]);
        for round in 0..20u8 {
            let key = ChunkKey([round; 32]);
            let barrier = Arc::new(tokio::sync::Barrier::new(4));
            let tasks: Vec<_> = (0..4u8)
                .map(|i| {
                    let (store, barrier) = (store.clone(), barrier.clone());
                    tokio::spawn(async move {
                        let mut w = store.begin_put(&key).await.unwrap();
                        w.write(Bytes::from(vec![i; 4096])).await.unwrap();
                        barrier.wait().await;
                        (i, w.commit(model, CommitMode::CreateNew).await)
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    (i, Ok(created)) => {
                        assert!(created);
                        winners.push(i);
                    }
                    (_, Err(StorageError::Exists(k))) => assert_eq!(k, key),
                    (_, Err(e)) => panic!("round {round}: {e}"),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let stored = store.get(&key).await.unwrap().unwrap();
            assert_eq!(stored, Bytes::from(vec![winners[0]; 4096]));
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let key = ChunkKey([0; 32]);
        let mut w = store.begin_put(&key).await.unwrap();
        w.write(Bytes::from_static(b"replaced")).await.unwrap();
        assert!(!w.commit(model, CommitMode::Replace).await.unwrap());
        assert_eq!(
            store.get(&key).await.unwrap().unwrap(),
            Bytes::from_static(b"replaced")
        );
    }

    #[test]
    fn open_removes_abandoned_uploads() {
        let dir = tempfile::tempdir().unwrap();
        LocalDir::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/abc.1.0.part"), b"half").unwrap();
        LocalDir::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
