//! The fetch and save pipeline: plans which sections to fetch, fetches them over the transport,
//! decodes them on a bounded worker pool and restores them into the engine's layout; and the
//! reverse for saves (copy, quantize, encode, upload). [`Pipeline`] is the daemon's backend:
//! the local server (`server/`) calls it and maps its typed errors ([`FetchError`],
//! [`SaveError`], [`LookupError`]) to protocol codes; nothing here imports the server.
//!
//! - `events`: what a fetch reports while it runs, and its outcome.
//! - `error`: the errors of lookups, fetches, saves and store access.
//! - `plan`: the sans-IO fetch planner (order, window, per-layer readiness).
//! - `layout`: restore into the engine's layout on the CPU, and read a client's buffer back.
//! - `source`: where a fetch reads objects ([`SectionSource`]): the stores, or memory in tests.
//! - `stores`: which store holds which key; prefix lookups; lazy reconnection.
//! - `verify`: what a fetched header must say (the chunk asked for).
//! - `quarantine`: chunks found corrupt lately, where lookups and fetches stop.
//! - `route`: which decoder (GPU kernels, NVDEC, CPU) restores a section into device memory.
//! - `profiles`: the codec registry, and codec profiles shared through the store (put by
//!   saves, fetched and cached on disk by fetches of chunks naming an unknown profile).
//! - `fetch`, `save`: the two drivers.

mod error;
mod events;
mod fetch;
#[cfg(test)]
mod fetch_tests;
mod layout;
mod plan;
mod profiles;
mod quarantine;
mod route;
mod save;
mod source;
mod stores;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use kvfetcher_codec::{chunk_keys, ChunkKey, CodecRegistry, ModelFingerprint};
use kvfetcher_protocol::{KvShape, TargetLayout};
use tokio::sync::Semaphore;

pub use error::{FetchError, LookupError, SaveError, StoreError};
pub use events::{FetchEvent, FetchEvents, FetchOutcome};
pub use fetch::{restore_section_into, RestoreTarget, SectionJob};
pub use layout::{place_cache, LayoutIoError};
pub use plan::{FetchPlanner, PlanError, SectionRef};
pub use profiles::ProfileError;
pub use route::{Decoder, Reason, RoutePolicy, Router};
pub use save::{encode_config, profile_model, rans_section_layers, MIN_RANS_SECTION_BYTES};
pub use source::{BoxFuture, MemorySource, SectionReader, SectionSource};
pub use stores::StoreTarget;

use crate::buffers::Destination;
use crate::config::{CodecConfig, Config, FetchConfig, SaveConfig};
use crate::metrics::Metrics;
use crate::transport::{ClientOptions, TlsClientConfig};
use profiles::Profiles;
use quarantine::Quarantine;
use stores::Stores;

/// Bytes per permit of the in-flight byte budget (a semaphore counts in `u32` permits).
const BUDGET_UNIT: u64 = 4096;

/// Why a pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A store's TLS trust or token could not be loaded.
    #[error("store {store}: {reason}")]
    Store {
        /// The store's address.
        store: String,
        /// What failed.
        reason: String,
    },
    /// The codec profile cache directory cannot be created or read.
    #[error("codec profile cache {dir}: {reason}")]
    ProfileCache {
        /// The directory.
        dir: String,
        /// What failed.
        reason: String,
    },
    /// The save settings do not form a valid codec configuration.
    #[error("save settings: {0}")]
    Save(String),
    /// The save or decode worker pool could not start.
    #[error("worker pool: {0}")]
    Pool(String),
}

/// The fetch/save pipeline: one per daemon, shared by all clients.
#[derive(Debug)]
pub struct Pipeline {
    /// Where saves put objects.
    stores: Stores,
    /// Where fetches and lookups read objects: the stores, unless injected.
    source: Arc<dyn SectionSource>,
    /// The codec registry, and the profiles shared through the store.
    profiles: Profiles,
    metrics: Arc<Metrics>,
    fetch: FetchConfig,
    save: SaveConfig,
    /// The decode workers shared by all fetches: received sections queue in arrival order
    /// (FIFO, so clients take turns) and a free worker starts the next one at once, without
    /// waiting for an async task to be scheduled (a semaphore of decode slots handed on by the
    /// fetch task kept about half of them idle under load on a 16-core H200 host).
    decode_pool: Arc<rayon::ThreadPool>,
    /// Picks each section's decoder, from the link's and the decoders' measured rates.
    router: Arc<Router>,
    /// Compressed bytes in memory across all fetches, in [`BUDGET_UNIT`]s.
    wire_budget: Arc<Semaphore>,
    budget_permits: u32,
    save_pool: Arc<rayon::ThreadPool>,
    /// Chunks found corrupt lately: lookups and fetches stop before them.
    quarantine: Quarantine,
}

impl Pipeline {
    /// A pipeline over `stores` (nothing is connected until first use).
    pub fn new(
        stores: Vec<StoreTarget>,
        registry: CodecRegistry,
        fetch: FetchConfig,
        save: SaveConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline, PipelineError> {
        if stores.is_empty() {
            return Err(PipelineError::Save("no store configured".into()));
        }
        let stores = Stores::new(
            stores,
            Duration::from_millis(fetch.connect_timeout_ms),
            fetch.connections_per_store,
        );
        Pipeline::build(
            stores.clone(),
            Arc::new(stores),
            registry,
            fetch,
            save,
            metrics,
        )
    }

    /// A pipeline whose fetches and lookups read `source` (objects in memory, in tests) and
    /// which has no store to save to: a save fails with [`StoreError::NoStore`].
    pub fn with_source(
        source: Arc<dyn SectionSource>,
        registry: CodecRegistry,
        fetch: FetchConfig,
        save: SaveConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline, PipelineError> {
        let none = Stores::new(Vec::new(), Duration::ZERO, 1);
        Pipeline::build(none, source, registry, fetch, save, metrics)
    }

    fn build(
        stores: Stores,
        source: Arc<dyn SectionSource>,
        registry: CodecRegistry,
        fetch: FetchConfig,
        save: SaveConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline, PipelineError> {
        // Checks the save settings (the model only matters for `rans`).
        save::encode_config(&save, &registry, "")
            .map_err(|e| PipelineError::Save(e.to_string()))?;
        let save_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(save.workers.max(1))
            .thread_name(|i| format!("kvf-save-{i}"))
            .build()
            .map_err(|e| PipelineError::Pool(e.to_string()))?;
        let decode_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(fetch.decode_workers.max(1))
            .thread_name(|i| format!("kvf-decode-{i}"))
            .build()
            .map_err(|e| PipelineError::Pool(e.to_string()))?;
        let budget_permits = u32::try_from(
            (fetch.max_inflight_bytes as u64)
                .div_ceil(BUDGET_UNIT)
                .max(1),
        )
        .unwrap_or(u32::MAX)
        .min(Semaphore::MAX_PERMITS as u32);
        Ok(Pipeline {
            stores,
            source,
            profiles: Profiles::new(registry, CodecConfig::default().max_profile_bytes),
            metrics,
            decode_pool: Arc::new(decode_pool),
            router: Arc::new(Router::new(fetch.restore_route, fetch.decode_workers)),
            wire_budget: Arc::new(Semaphore::new(budget_permits as usize)),
            budget_permits,
            fetch,
            save,
            save_pool: Arc::new(save_pool),
            quarantine: Quarantine::default(),
        })
    }

    /// A pipeline for a daemon configuration: loads each store's TLS trust and token.
    pub fn from_config(
        config: &Config,
        registry: CodecRegistry,
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline, PipelineError> {
        let mut targets = Vec::new();
        for s in &config.stores {
            let err = |reason: String| PipelineError::Store {
                store: s.addr.to_string(),
                reason,
            };
            let mut tls = TlsClientConfig::from_path(&s.tls).map_err(|e| err(e.to_string()))?;
            tls.server_name = s.server_name.clone();
            if let Some(path) = &s.token_file {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("token {}: {e}", path.display())))?;
                tls.token = Some(token.trim().as_bytes().to_vec());
            }
            targets.push(StoreTarget {
                addr: s.addr,
                tls,
                options: ClientOptions::liveness(
                    Duration::from_millis(s.keep_alive_ms),
                    Duration::from_millis(s.idle_timeout_ms),
                ),
            });
        }
        Pipeline::new(
            targets,
            registry,
            config.fetch.clone(),
            config.save.clone(),
            metrics,
        )?
        .with_codec_config(&config.codec)
    }

    /// Applies the `[codec]` settings on profiles shared through the store: the largest
    /// profile object accepted, and the cache directory of fetched profiles (created if
    /// missing; the profiles already there are loaded now, so a restart needs no refetch).
    /// `profile_dir` is not read here: it is loaded into the registry given at construction.
    pub fn with_codec_config(mut self, codec: &CodecConfig) -> Result<Pipeline, PipelineError> {
        self.profiles.set_max_bytes(codec.max_profile_bytes);
        if let Some(dir) = &codec.profile_cache_dir {
            let n = self
                .profiles
                .use_cache_dir(dir)
                .map_err(|e| PipelineError::ProfileCache {
                    dir: dir.display().to_string(),
                    reason: e.to_string(),
                })?;
            tracing::info!(dir = %dir.display(), profiles = n, "codec profile cache");
        }
        Ok(self)
    }

    /// The metrics this pipeline updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The router picking each section's decoder (its measured rates are shared by fetches).
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Number of stores.
    pub fn store_count(&self) -> usize {
        self.stores.len()
    }

    /// How many leading tokens of `token_ids` are stored for `model` (whole chunks, and none
    /// past a chunk found corrupt lately).
    pub async fn lookup_tokens(&self, model: &str, token_ids: &[u32]) -> Result<u32, LookupError> {
        let fp = ModelFingerprint::of_bytes(model.as_bytes());
        let chunk = self.save.chunk_tokens as usize;
        let keys = chunk_keys(&fp, token_ids, chunk);
        let mut n = self.source.exists_prefix(&keys).await?;
        // A fetch would stop before a chunk found corrupt: so does the lookup.
        if let Some(bad) = self
            .quarantine
            .first_in(&keys[..n], std::time::Instant::now())
        {
            n = bad;
        }
        self.metrics.lookups.add(1);
        Ok((n * chunk).min(token_ids.len()) as u32)
    }
}

impl Pipeline {
    /// Fetches the longest stored prefix of `token_ids` (at most all of them) for `model` into
    /// `dest` in `layout`, reporting progress to `events`; dropping the future cancels it.
    pub async fn fetch_into(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        dest: Arc<dyn Destination>,
        events: FetchEvents,
    ) -> Result<FetchOutcome, FetchError> {
        fetch::fetch(self, model, token_ids, layout, dest, events).await
    }

    /// Saves KV in `data` (host bytes of `shape` in `layout`) for `model` and `token_ids`;
    /// returns the number of chunks stored, overwriting stored ones only with `replace`.
    #[allow(clippy::too_many_arguments)]
    pub async fn save_kv(
        &self,
        model: &str,
        token_ids: &[u32],
        layout: &TargetLayout,
        shape: &KvShape,
        data: &[u8],
        replace: bool,
    ) -> Result<u32, SaveError> {
        save::save(self, model, token_ids, layout, shape, data, replace).await
    }

    /// Counts, logs and quarantines chunk `key` if `e` says it is corrupt; returns `e`.
    fn noted(&self, key: &ChunkKey, e: FetchError) -> FetchError {
        if let FetchError::Corrupt(why) = &e {
            self.metrics.corrupt_objects.add(1);
            tracing::warn!(chunk = %key, "corrupt object in the store: {why}");
            self.quarantine.insert(*key, std::time::Instant::now());
        }
        e
    }
}
