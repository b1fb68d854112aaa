//! Codec profiles shared through the store, so that any node can restore a transform-coded
//! chunk another node saved.
//!
//! A save with a profile first makes sure the profile's bytes are in the store (a write-once
//! object under `ProfileId::object_key`, put once per profile per daemon run; `Exists` from a
//! racing put is success). A fetch that meets a chunk naming a profile this daemon has not
//! loaded gets it from the store before its buffer is allocated: the bytes must be at most
//! `[codec] max_profile_bytes`, hash to the id and parse, else the fetch fails with a
//! [`ProfileError`]. A fetched profile joins the registry and, with `[codec]
//! profile_cache_dir`, is written there, so a restarted daemon needs no refetch.
//!
//! The registry is shared behind a lock that is held only to clone or swap an
//! `Arc<CodecRegistry>`: a fetch or save takes a snapshot once and uses it lock-free, and
//! adding a profile swaps in a new registry (a clone of maps of `Arc`s). Profile fetches are
//! single-flight: one at a time, each re-checking the registry first, so concurrent fetches
//! needing the same missing profile fetch it once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use kvfetcher_codec::{CodecProfile, CodecRegistry, ProfileId};

use super::source::SectionSource;
use super::StoreError;

/// Suffix of profile files, in `profile_dir` and the cache.
const PROFILE_SUFFIX: &str = "kvfp";

/// Why the codec profile a chunk names could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Neither loaded here nor in the store.
    #[error("codec profile {0} is neither loaded nor in the store")]
    NotFound(ProfileId),
    /// The store's profile object is damaged, too large, or not a valid profile: its bytes
    /// are not used.
    #[error("codec profile {id} from the store: {why}")]
    Corrupt {
        /// The profile asked for.
        id: ProfileId,
        /// What was wrong with it.
        why: String,
    },
    /// The store could not be reached or failed the request.
    #[error("codec profile {id}: {source}")]
    Store {
        /// The profile asked for.
        id: ProfileId,
        /// The store's failure.
        source: StoreError,
    },
}

/// The daemon's codec registry and the profiles it shares through the store.
#[derive(Debug)]
pub(crate) struct Profiles {
    registry: RwLock<Arc<CodecRegistry>>,
    /// Where fetched profiles are kept across restarts (none: in memory only).
    cache_dir: Option<PathBuf>,
    /// Largest profile object accepted from the store.
    max_bytes: u64,
    /// Profiles known to be in the store: put by this daemon run, or fetched from it.
    stored: Mutex<HashSet<ProfileId>>,
    /// Held while a profile is fetched (single flight).
    fetching: tokio::sync::Mutex<()>,
}

impl Profiles {
    /// Profiles over `registry` (what `profile_dir` loaded), accepting store objects of at most
    /// `max_bytes`; no disk cache until [`Profiles::use_cache_dir`].
    pub(crate) fn new(registry: CodecRegistry, max_bytes: u64) -> Profiles {
        Profiles {
            registry: RwLock::new(Arc::new(registry)),
            cache_dir: None,
            max_bytes,
            stored: Mutex::new(HashSet::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Sets the largest profile object accepted from the store.
    pub(crate) fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
    }

    /// Keeps fetched profiles in `dir` (created if missing) and loads those already there. A
    /// cached file that does not hash to its name or does not parse is logged and removed (it
    /// is fetched again when needed); only a directory that cannot be created or read fails.
    pub(crate) fn use_cache_dir(&mut self, dir: &Path) -> std::io::Result<usize> {
        std::fs::create_dir_all(dir)?;
        let mut loaded = 0;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(PROFILE_SUFFIX) {
                continue;
            }
            match self.read_cached(&path) {
                Ok(profile) => {
                    tracing::info!(profile = %profile.id(), path = %path.display(), "cached codec profile loaded");
                    self.add(Arc::new(profile));
                    loaded += 1;
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), "cached codec profile removed: {why}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        self.cache_dir = Some(dir.to_path_buf());
        Ok(loaded)
    }

    /// A cached profile file, checked as one from the store: size, hash = its name, parse.
    fn read_cached(&self, path: &Path) -> Result<CodecProfile, String> {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let id = ProfileId::from_hex(stem).map_err(|e| e.to_string())?;
        let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        if len > self.max_bytes {
            return Err(format!("{len} bytes, more than max_profile_bytes"));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        check_profile(&id, &bytes).map_err(|e| e.to_string())
    }

    /// The registry as it is now (cheap: an `Arc` clone under a read lock).
    pub(crate) fn registry(&self) -> Arc<CodecRegistry> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds `profile` to the registry (swapping in a new one).
    fn add(&self, profile: Arc<CodecProfile>) {
        let mut cur = self.registry.write().unwrap_or_else(|e| e.into_inner());
        let next = (**cur).clone().with_profile(profile);
        *cur = Arc::new(next);
    }

    /// True when profile `id` is known to be in the store already.
    pub(crate) fn is_stored(&self, id: &ProfileId) -> bool {
        self.stored_set().contains(id)
    }

    /// Records that profile `id` is in the store.
    pub(crate) fn mark_stored(&self, id: ProfileId) {
        self.stored_set().insert(id);
    }

    fn stored_set(&self) -> std::sync::MutexGuard<'_, HashSet<ProfileId>> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A registry holding every profile in `ids`: the current one when it has them all, else
    /// after fetching the missing ones from `source` (see the module doc).
    pub(crate) async fn resolve(
        &self,
        source: &dyn SectionSource,
        ids: impl IntoIterator<Item = ProfileId>,
    ) -> Result<Arc<CodecRegistry>, ProfileError> {
        let mut wanted: Vec<ProfileId> = ids.into_iter().collect();
        wanted.sort_unstable();
        wanted.dedup();
        for id in wanted {
            if self.registry().profile(&id).is_ok() {
                continue;
            }
            let _one = self.fetching.lock().await;
            // Fetched by another fetch while this one waited.
            if self.registry().profile(&id).is_ok() {
                continue;
            }
            let profile = self.fetch(source, &id).await?;
            self.write_cache(&id, &profile.1);
            self.add(Arc::new(profile.0));
            self.mark_stored(id);
            tracing::info!(profile = %id, "codec profile fetched from the store");
        }
        Ok(self.registry())
    }

    /// Fetches, checks and parses profile `id`; returns it with its bytes.
    async fn fetch(
        &self,
        source: &dyn SectionSource,
        id: &ProfileId,
    ) -> Result<(CodecProfile, bytes::Bytes), ProfileError> {
        let bytes = match source.get_profile(id, self.max_bytes).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Err(ProfileError::NotFound(*id)),
            Err(StoreError::Corrupt(why)) => return Err(ProfileError::Corrupt { id: *id, why }),
            Err(source) => return Err(ProfileError::Store { id: *id, source }),
        };
        // Parsing checks every basis: off the async runtime.
        let (id2, b2) = (*id, bytes.clone());
        let profile = tokio::task::spawn_blocking(move || check_profile(&id2, &b2))
            .await
            .map_err(|e| ProfileError::Corrupt {
                id: *id,
                why: format!("profile check stopped: {e}"),
            })??;
        Ok((profile, bytes))
    }

    /// Writes a fetched profile to the cache directory, if any (to a temporary name, then
    /// renamed, so a crash leaves no partial profile under its name). A failure is logged:
    /// the cache only saves a refetch.
    fn write_cache(&self, id: &ProfileId, bytes: &[u8]) {
        let Some(dir) = &self.cache_dir else {
            return;
        };
        let path = dir.join(format!("{id}.{PROFILE_SUFFIX}"));
        let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(profile = %id, dir = %dir.display(), "codec profile not cached: {e}");
        }
    }
}

/// Checks that `bytes` are profile `id` (their SHA-256) and parses them.
fn check_profile(id: &ProfileId, bytes: &[u8]) -> Result<CodecProfile, ProfileError> {
    let found = ProfileId::of_bytes(bytes);
    if found != *id {
        return Err(ProfileError::Corrupt {
            id: *id,
            why: format!("its bytes hash to {found}"),
        });
    }
    CodecProfile::from_bytes(bytes).map_err(|e| ProfileError::Corrupt {
        id: *id,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::MemorySource;
    use kvfetcher_codec::{HeadBasis, LayerProfile, ModelFingerprint, Rope, TensorProfile};

    fn tiny_profile(model: &[u8]) -> CodecProfile {
        let tensor = || TensorProfile {
            heads: vec![HeadBasis::identity(vec![0.0; 4], vec![1.0; 4])],
            sensitivity: 1.0,
            curve: Vec::new(),
        };
        CodecProfile {
            model: ModelFingerprint::of_bytes(model),
            kv_heads: 1,
            head_dim: 4,
            sinks: 0,
            rope: Rope::NONE,
            layers: vec![LayerProfile {
                key: tensor(),
                value: tensor(),
            }],
        }
    }

    fn profiles() -> Profiles {
        Profiles::new(CodecRegistry::software(), 1 << 20)
    }

    #[tokio::test]
    async fn a_missing_profile_is_fetched_checked_and_registered_for_every_waiter() {
        let p = tiny_profile(b"m");
        let (id, bytes) = (p.id(), p.to_bytes());
        let source = MemorySource::new();
        let profiles = Arc::new(profiles());
        let err = profiles.resolve(&source, [id]).await.unwrap_err();
        assert!(matches!(err, ProfileError::NotFound(i) if i == id), "{err}");
        source.insert(id.object_key(), bytes.clone());
        // Concurrent fetches needing it all get it; the registry then has it.
        let source = Arc::new(source);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (profiles, source) = (profiles.clone(), source.clone());
                tokio::spawn(async move { profiles.resolve(source.as_ref(), [id, id]).await })
            })
            .collect();
        for t in tasks {
            let reg = t.await.unwrap().unwrap();
            assert_eq!(reg.profile(&id).unwrap().to_bytes(), bytes);
        }
        assert!(
            profiles.is_stored(&id),
            "fetched from the store: no put needed"
        );
        // Once registered, the store is not asked again.
        source.remove(&id.object_key());
        assert!(profiles.resolve(source.as_ref(), [id]).await.is_ok());
    }

    #[tokio::test]
    async fn bad_profile_objects_are_typed_errors_and_never_registered() {
        let p = tiny_profile(b"m");
        let (id, bytes) = (p.id(), p.to_bytes());
        let profiles = profiles();
        // Changed bytes under the profile's key: they hash to another id.
        let source = MemorySource::new();
        let mut bad = bytes.clone();
        bad[70] ^= 1;
        source.insert(id.object_key(), bad);
        let err = profiles.resolve(&source, [id]).await.unwrap_err();
        assert!(matches!(err, ProfileError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("hashes to"), "{err}");
        // Bytes that hash to their key but are no profile (the crc fails).
        let mut junk = bytes.clone();
        junk[70] ^= 1;
        let junk_id = ProfileId::of_bytes(&junk);
        source.insert(junk_id.object_key(), junk);
        let err = profiles.resolve(&source, [junk_id]).await.unwrap_err();
        assert!(matches!(err, ProfileError::Corrupt { .. }), "{err}");
        // More than the limit: refused.
        let small = Profiles::new(CodecRegistry::software(), 16);
        source.insert(id.object_key(), bytes);
        let err = small.resolve(&source, [id]).await.unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        for reg in [profiles.registry(), small.registry()] {
            assert!(reg.profile(&id).is_err() && reg.profile(&junk_id).is_err());
        }
    }

    #[tokio::test]
    async fn fetched_profiles_are_cached_on_disk_and_loaded_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny_profile(b"m");
        let id = p.id();
        let source = MemorySource::new();
        source.insert(id.object_key(), p.to_bytes());
        let mut first = profiles();
        assert_eq!(first.use_cache_dir(dir.path()).unwrap(), 0);
        first.resolve(&source, [id]).await.unwrap();
        let file = dir.path().join(format!("{id}.kvfp"));
        assert_eq!(std::fs::read(&file).unwrap(), p.to_bytes());
        // A restart: loaded from the cache, the store no longer asked.
        let mut again = profiles();
        assert_eq!(again.use_cache_dir(dir.path()).unwrap(), 1);
        assert!(again.registry().profile(&id).is_ok());
        assert!(again.resolve(&MemorySource::new(), [id]).await.is_ok());
        // A damaged cache file is removed, not loaded.
        let mut bytes = p.to_bytes();
        bytes[70] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let mut third = profiles();
        assert_eq!(third.use_cache_dir(dir.path()).unwrap(), 0);
        assert!(!file.exists());
    }
}
