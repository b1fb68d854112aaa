//! The fetch driver: runs a [`FetchPlanner`] against the stores, the decode pool and the
//! destination, so network, decode and restore overlap.
//!
//! Steps: one prefix lookup; every chunk's header in parallel; allocate the destination; then
//! sections in the planner's order, each on its own QUIC stream, at most the planner's window
//! per fetch. A section holds permits of the shared byte budget from before it is requested
//! until it is restored (back-pressure: a fetch cannot pull more compressed bytes into memory
//! than the budget, whatever the link does), and one decode slot while it decodes. Both are
//! FIFO semaphores shared by all fetches, so concurrent clients take turns. Dropping the fetch
//! future drops its streams (the store sees them reset) and stops new work; a section already
//! on a decode thread finishes into a buffer nobody reads.
//!
//! A destination in GPU memory ([`Destination::device`]) gets its sections restored there by
//! the GPU kernels (`gpu::section_restore`), still on the blocking pool and holding a decode
//! slot; sections the kernels cannot reproduce bit for bit are restored on the CPU and copied.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use kvfetcher_client::{KvShape, TargetLayout};
use kvfetcher_codec::{
    chunk_keys, decode_section, restore_section, ChunkHeader, ChunkKey, CodecRegistry,
    ModelFingerprint,
};

use super::layout::{place_cache, LayoutIoError};
use super::plan::{FetchPlanner, SectionRef};
use super::Pipeline;
use crate::gpu::section_restore::{kernels_apply, restore_section_to_device, Route};
use crate::metrics::Metrics;
use crate::server::{Destination, FetchOutcome, ServeError};
use crate::transport::SectionCheck;

impl From<LayoutIoError> for ServeError {
    fn from(e: LayoutIoError) -> Self {
        ServeError::BadRequest(e.to_string())
    }
}

/// One chunk of the fetched prefix.
struct Chunk {
    key: ChunkKey,
    /// The parsed header; section requests after the header round skip it.
    check: Arc<SectionCheck>,
    /// First token of the chunk in the fetched buffer.
    token_start: u32,
}

impl Chunk {
    fn header(&self) -> &ChunkHeader {
        self.check.header()
    }
}

/// Runs a whole fetch (see the module doc).
pub(super) async fn fetch(
    p: &Pipeline,
    model: &str,
    token_ids: &[u32],
    layout: &TargetLayout,
    dest: Arc<dyn Destination>,
) -> Result<FetchOutcome, ServeError> {
    let started = Instant::now();
    let _active = p.metrics.fetches_active.track();
    let fp = ModelFingerprint::of_bytes(model.as_bytes());
    let keys = chunk_keys(&fp, token_ids, p.save.chunk_tokens as usize);
    let n = p.stores.exists_prefix(&keys).await?;
    if n == 0 {
        return Err(ServeError::NotFound(format!(
            "no stored prefix for model {model:?}"
        )));
    }
    let chunks = headers(p, &keys[..n]).await?;
    let shape = shape_of(&chunks)?;
    layout
        .checked_buffer_len(&shape)
        .map_err(|e| ServeError::BadRequest(format!("layout: {e}")))?;
    dest.allocate(&shape)?;
    let layers = chunks
        .iter()
        .map(|c| {
            c.header()
                .sections
                .iter()
                .map(|s| u32::from(s.layer_start)..u32::from(s.layer_end))
                .collect()
        })
        .collect();
    let mut planner = FetchPlanner::new(shape.num_layers, layers, p.fetch.max_inflight_sections)
        .map_err(|e| ServeError::Internal(format!("plan: {e}")))?;
    let mut tasks = FuturesUnordered::new();
    let mut wire = 0u64;
    let mut first_layer = false;
    loop {
        while let Some(s) = planner.poll_request() {
            tasks.push(section(
                p,
                &chunks[s.chunk],
                s,
                *layout,
                shape,
                dest.clone(),
            ));
        }
        let Some(done) = tasks.next().await else {
            break;
        };
        let (s, bytes) = done?;
        wire += bytes;
        let event = |e| ServeError::Internal(format!("plan: {e}"));
        planner.handle_received(s).map_err(event)?;
        planner.handle_restored(s).map_err(event)?;
        while let Some(ready) = planner.poll_ready() {
            if !first_layer && ready.start == 0 {
                first_layer = true;
                p.metrics.first_layer_seconds.observe(started.elapsed());
            }
            dest.layers_ready(ready);
        }
    }
    p.metrics.fetch_seconds.observe(started.elapsed());
    p.metrics
        .bytes_restored
        .add(layout.buffer_len(&shape) as u64);
    tracing::info!(
        model,
        tokens = shape.tokens,
        chunks = n,
        wire,
        ms = started.elapsed().as_millis() as u64,
        "fetched"
    );
    Ok(FetchOutcome {
        tokens: shape.tokens,
        bytes_on_wire: wire,
    })
}

/// Fetches every chunk's header, at most the fetch window at once, in chain order.
async fn headers(p: &Pipeline, keys: &[ChunkKey]) -> Result<Vec<Chunk>, ServeError> {
    let fetched: Vec<Result<(ChunkKey, SectionCheck), ServeError>> =
        futures::stream::iter(keys.iter().copied())
            .map(|key| async move {
                let client = p.stores.client_for(&key).await?;
                let stream = match client.open_sections(&key, &[]).await {
                    Ok(s) => s,
                    Err(e) => return Err(p.stores.failed(&key, e).await),
                };
                p.metrics.bytes_in.add(stream.header().len() as u64);
                let check = SectionCheck::from_header(stream.header())
                    .map_err(|e| ServeError::Internal(format!("chunk {key}: header: {e}")))?;
                Ok((key, check))
            })
            .buffered(p.fetch.max_inflight_sections)
            .collect()
            .await;
    let mut chunks = Vec::with_capacity(keys.len());
    let mut token_start = 0u32;
    for r in fetched {
        let (key, check) = r?;
        let header = check.header();
        if header.key != key {
            return Err(ServeError::Internal(format!(
                "chunk {key}: header names {}",
                header.key
            )));
        }
        let tokens = header.token_count;
        chunks.push(Chunk {
            key,
            check: Arc::new(check),
            token_start,
        });
        token_start = token_start
            .checked_add(tokens)
            .ok_or_else(|| ServeError::Internal("token count overflows".into()))?;
    }
    Ok(chunks)
}

/// The shape of the whole prefix; every chunk must agree on layers, heads and head size.
fn shape_of(chunks: &[Chunk]) -> Result<KvShape, ServeError> {
    let h0 = chunks[0].header();
    let mut tokens = 0u32;
    for c in chunks {
        let h = c.header();
        if (h.num_layers, h.kv_heads, h.head_dim) != (h0.num_layers, h0.kv_heads, h0.head_dim) {
            return Err(ServeError::Internal(format!(
                "chunk {} is {}x{}x{}, chunk 0 is {}x{}x{}",
                c.key,
                h.num_layers,
                h.kv_heads,
                h.head_dim,
                h0.num_layers,
                h0.kv_heads,
                h0.head_dim
            )));
        }
        tokens += h.token_count;
    }
    Ok(KvShape {
        num_layers: u32::from(h0.num_layers),
        tokens,
        kv_heads: u32::from(h0.kv_heads),
        head_dim: u32::from(h0.head_dim),
    })
}

/// Fetches, decodes and restores one section; returns it with the bytes it took on the wire.
async fn section(
    p: &Pipeline,
    chunk: &Chunk,
    s: SectionRef,
    layout: TargetLayout,
    shape: KvShape,
    dest: Arc<dyn Destination>,
) -> Result<(SectionRef, u64), ServeError> {
    let info = &chunk.header().sections[s.section];
    // Back-pressure: hold the section's share of the byte budget until it is restored. A
    // section larger than the whole budget takes all of it, and so runs alone.
    let want = info.len.min(p.fetch.max_inflight_bytes as u64).max(1);
    let permits = u32::try_from(want.div_ceil(super::BUDGET_UNIT)).unwrap_or(u32::MAX);
    let _budget = p
        .wire_budget
        .acquire_many(permits.min(p.budget_permits))
        .await
        .map_err(|_| ServeError::Unavailable("pipeline shut down".into()))?;
    let _queued = p.metrics.sections_in_flight.track();
    let client = p.stores.client_for(&chunk.key).await?;
    let received = async {
        // The header came with the header round; the sections come alone.
        let mut stream = client
            .open_known_sections(&chunk.check, &[s.section])
            .await?;
        stream.next_section().await
    }
    .await;
    let bytes = match received {
        Ok(Some((_, bytes))) => bytes,
        Ok(None) => {
            return Err(ServeError::Internal(format!(
                "chunk {}: section {} missing",
                chunk.key, s.section
            )))
        }
        Err(e) => return Err(p.stores.failed(&chunk.key, e).await),
    };
    let wire = bytes.len() as u64;
    p.metrics.bytes_in.add(wire);
    let _slot = p
        .decode_slots
        .acquire()
        .await
        .map_err(|_| ServeError::Unavailable("pipeline shut down".into()))?;
    let check = chunk.check.clone();
    let registry = p.registry.clone();
    let metrics = p.metrics.clone();
    let token_start = chunk.token_start;
    let index = s.section;
    tokio::task::spawn_blocking(move || {
        let _busy = metrics.decoders_busy.track();
        restore_section_into(
            dest.as_ref(),
            &SectionJob {
                header: check.header(),
                index,
                payload: &bytes,
                token_start,
            },
            &registry,
            &layout,
            &shape,
            &metrics,
        )
    })
    .await
    .map_err(|e| ServeError::Internal(format!("decode task: {e}")))??;
    Ok((s, wire))
}

/// One fetched section to restore: section `index` of the chunk with `header`, whose first
/// token is `token_start` of the fetched buffer.
#[derive(Debug, Clone, Copy)]
pub struct SectionJob<'a> {
    /// The chunk's header.
    pub header: &'a ChunkHeader,
    /// The section's index in the chunk.
    pub index: usize,
    /// The section's bytes as received.
    pub payload: &'a [u8],
    /// First token of the chunk in the fetched buffer.
    pub token_start: u32,
}

/// The fetch's decode stage for one section (blocking; runs on a decode slot): into device
/// memory through the GPU kernels (`gpu::section_restore`) when `dest` is device memory and
/// they reproduce the CPU path bit for bit, else decoded and restored on the CPU and placed
/// through `dest.write`.
pub fn restore_section_into(
    dest: &dyn Destination,
    job: &SectionJob<'_>,
    registry: &CodecRegistry,
    layout: &TargetLayout,
    shape: &KvShape,
    metrics: &Metrics,
) -> Result<(), ServeError> {
    let SectionJob {
        header,
        index,
        payload,
        token_start,
    } = *job;
    let bad = |e: kvfetcher_codec::FormatError| {
        ServeError::Internal(format!("chunk {}: section {index}: {e}", header.key))
    };
    if let Some(region) = dest.device() {
        match kernels_apply(header, index, layout) {
            Ok(()) => {
                let route = restore_section_to_device(
                    region.device,
                    header,
                    index,
                    payload,
                    registry,
                    layout,
                    shape,
                    token_start,
                    region.buffer,
                )
                .map_err(|e| {
                    ServeError::Internal(format!(
                        "chunk {}: section {index}: gpu restore: {e}",
                        header.key
                    ))
                })?;
                let c = &metrics.gpu_sections;
                match route {
                    Route::Packed => c.packed.add(1),
                    Route::Nvdec => c.nvdec.add(1),
                    Route::CpuDecode => c.cpu_decode.add(1),
                }
                return Ok(());
            }
            Err(why) => {
                // Restored on the CPU below; `write` copies the placed bytes to the device.
                tracing::debug!(chunk = %header.key, index, "gpu kernels skipped: {why}");
                metrics.gpu_sections.cpu_restore.add(1);
            }
        }
    }
    let plane = decode_section(header, index, payload, registry).map_err(bad)?;
    let layers = restore_section(header, index, &plane).map_err(bad)?;
    let first = u32::from(header.sections[index].layer_start);
    place_cache(layout, shape, first, token_start, &layers, &mut |off, b| {
        dest.write(off, b)
    })
}
