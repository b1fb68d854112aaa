//! The fetch driver: runs a [`FetchPlanner`] against a [`SectionSource`](super::SectionSource)
//! (the stores, or memory in tests), the decode pool and the destination, so network, decode
//! and restore overlap.
//!
//! Headers first (at most the fetch window at once; this is also the prefix lookup), each
//! checked by `verify` before anything is sized from it, each carrying its chunk's layer-0
//! section on the same stream so the first layer arrives in the headers' round trip; then the
//! other sections in the planner's order, one QUIC stream each. A section holds permits of a
//! shared byte budget (FIFO) from request to restore, so no fetch buffers more compressed bytes
//! than the budget; decode workers take sections FIFO across fetches. Dropping the fetch future
//! resets its streams and skips its queued sections. Device destinations are restored by the GPU
//! kernels (`gpu::section_restore`), with a CPU restore and copy for what they cannot reproduce.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use kvfetcher_codec::{
    chunk_keys, decode_section, restore_section, ChunkHeader, ChunkKey, CodecError, CodecRegistry,
    FormatError, ModelFingerprint, VariantKind,
};
use kvfetcher_protocol::{KvShape, TargetLayout};
use tokio::sync::OwnedSemaphorePermit;

use super::layout::place_cache;
use super::plan::{FetchPlanner, SectionRef};
use super::route::{Candidates, Decoder, LinkUse, Router, SectionCost};
use super::source::SectionReader;
use super::verify::{check_header, Expected, Geometry, Mismatch};
use super::{FetchError, FetchEvent, FetchEvents, FetchOutcome, Pipeline};
use crate::buffers::Destination;
use crate::gpu::section_restore::{kernels_apply, restore_section_to_device, Route};
use crate::gpu::GpuError;
use crate::metrics::Metrics;
use crate::transport::SectionCheck;

/// One chunk of the fetched prefix.
struct Chunk {
    /// The parsed header (with the chunk's key); section requests after the header round skip it.
    check: Arc<SectionCheck>,
    /// First token of the chunk in the fetched buffer.
    token_start: u32,
    /// Section 0, requested when the header arrived; the section task takes it.
    first: std::sync::Mutex<Option<EarlySection>>,
}

/// A section's bytes as received, holding its share of the byte budget until restored.
struct Received {
    bytes: Bytes,
    /// When the last byte arrived.
    arrived: Instant,
    _budget: OwnedSemaphorePermit,
}

/// A section requested ahead of the planner (a chunk's first, in the header round), on a task
/// of its own; cancelled when dropped, so a dropped fetch stops it.
struct EarlySection(tokio::task::JoinHandle<Result<Received, FetchError>>);

impl EarlySection {
    async fn received(mut self) -> Result<Received, FetchError> {
        (&mut self.0)
            .await
            .map_err(|e| FetchError::Internal(format!("section task: {e}")))?
    }
}

impl Drop for EarlySection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Chunk {
    fn header(&self) -> &ChunkHeader {
        self.check.header()
    }

    fn key(&self) -> ChunkKey {
        self.check.key()
    }
}

/// Runs a whole fetch (see the module doc).
pub(super) async fn fetch(
    p: &Pipeline,
    model: &str,
    token_ids: &[u32],
    layout: &TargetLayout,
    dest: Arc<dyn Destination>,
    events: FetchEvents,
) -> Result<FetchOutcome, FetchError> {
    let started = Instant::now();
    let _active = p.metrics.fetches_active.track();
    let fp = ModelFingerprint::of_bytes(model.as_bytes());
    let keys = chunk_keys(&fp, token_ids, p.save.chunk_tokens as usize);
    let wanted = keys
        .iter()
        .enumerate()
        .map(|(i, &key)| Expected::chunk(key, fp, i, p.save.chunk_tokens, token_ids.len()))
        .collect::<Option<Vec<_>>>()
        .ok_or(FetchError::TooManyTokens)?;
    let (chunks, header_bytes) = stored_prefix(p, &wanted).await?;
    if chunks.is_empty() {
        return Err(FetchError::NotFound(format!(
            "no stored prefix for model {model:?}"
        )));
    }
    let n = chunks.len();
    let headed = started.elapsed();
    let shape = shape_of(&chunks)?;
    // Every profile the chunks name, fetched from the store if not loaded, before the
    // client's buffer exists: a missing or bad profile fails the fetch with nothing written.
    let profiles = chunks
        .iter()
        .filter_map(|c| c.header().transform.as_ref().map(|t| t.profile));
    let registry = p.profiles.resolve(p.source.as_ref(), profiles).await?;
    layout
        .checked_buffer_len(&shape)
        .map_err(|e| FetchError::BadLayout(format!("layout: {e}")))?;
    dest.allocate(&shape)?;
    events.report(FetchEvent::Allocated(shape));
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
        .map_err(|e| FetchError::Internal(format!("plan: {e}")))?;
    let mut tasks = FuturesUnordered::new();
    let mut wire = header_bytes;
    let mut first_layer = false;
    let (mut first_arrival, mut last_arrival) = (None::<Duration>, Duration::ZERO);
    let (mut queue_wait, mut decode_busy) = (Duration::ZERO, Duration::ZERO);
    loop {
        while let Some(s) = planner.poll_request() {
            tasks.push(section(
                p,
                &registry,
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
        let (s, bytes, times) = done?;
        let at = times.arrived.duration_since(started);
        queue_wait += times.started.duration_since(times.arrived);
        decode_busy += times.decoded;
        first_arrival = Some(first_arrival.map_or(at, |f| f.min(at)));
        last_arrival = last_arrival.max(at);
        wire += bytes;
        let event = |e| FetchError::Internal(format!("plan: {e}"));
        planner.handle_received(s).map_err(event)?;
        planner.handle_restored(s).map_err(event)?;
        while let Some(ready) = planner.poll_ready() {
            if !first_layer && ready.start == 0 {
                first_layer = true;
                p.metrics.first_layer_seconds.observe(started.elapsed());
            }
            dest.layers_written(ready.clone());
            events.report(FetchEvent::LayersReady(ready));
        }
    }
    p.metrics.fetch_seconds.observe(started.elapsed());
    tracing::debug!(
        ?headed,
        ?first_arrival,
        ?last_arrival,
        total = ?started.elapsed(),
        ?queue_wait,
        ?decode_busy,
        "fetch phases (from the request; arrivals: sections fully received; queue_wait and \
         decode_busy: summed over sections, from arrival to a decode worker and on it)"
    );
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

/// The stored prefix of the chain `wanted`: asks for each chunk's header, at most the fetch
/// window at once, and stops at the first chunk no store holds. Every header must be the chunk
/// asked for and share the first chunk's geometry (`verify`). Keeps the early first sections
/// of a leading run of chunks only (see the module doc). Returns the chunks and the header
/// bytes received.
async fn stored_prefix(p: &Pipeline, wanted: &[Expected]) -> Result<(Vec<Chunk>, u64), FetchError> {
    // Chunks found corrupt lately end the prefix, as they end a lookup's.
    let keys: Vec<ChunkKey> = wanted.iter().map(|w| w.key).collect();
    let usable = p
        .quarantine
        .first_in(&keys, Instant::now())
        .unwrap_or(keys.len());
    let mut answers = futures::stream::iter(wanted[..usable].iter().copied())
        .map(|want| header_and_first(p, want))
        .buffered(p.fetch.max_inflight_sections);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut token_start = 0u32;
    let mut bytes = 0u64;
    let mut early = true;
    while let Some(answer) = answers.next().await {
        let geometry = chunks.first().map(|c| Geometry::of(c.header()));
        let answer = answer.and_then(|(check, first)| {
            match check_header(check.header(), &wanted[chunks.len()], geometry) {
                Ok(()) => Ok((check, first)),
                Err(m) => Err(p.noted(&check.key(), corrupt_header(&check.key(), &m))),
            }
        });
        let (check, first) = match answer {
            Ok(a) => a,
            Err(FetchError::NotFound(_)) => break,
            // A corrupt chunk (counted and logged) ends the prefix; the good chunks before it
            // are fetched. A corrupt first chunk leaves nothing to fetch.
            Err(e @ FetchError::Corrupt(_)) if chunks.is_empty() => return Err(e),
            Err(FetchError::Corrupt(_)) => break,
            Err(e) => return Err(e),
        };
        early &= first.is_some();
        bytes += check.header_len() as u64;
        let tokens = check.header().token_count;
        chunks.push(Chunk {
            check,
            token_start,
            first: std::sync::Mutex::new(first.filter(|_| early)),
        });
        token_start = token_start
            .checked_add(tokens)
            .ok_or_else(|| FetchError::Internal("token count overflows".into()))?;
    }
    Ok((chunks, bytes))
}

/// One chunk's header, with its first section on the same stream (its bytes follow the header
/// without a second round trip). The section is received on a task of its own when it is the
/// chunk's layer-0 section and the byte budget has room for it now; otherwise the stream is
/// dropped (the store sees it reset) and the planner asks for the section again later. A
/// header that is not the chunk `want` is refused before its section is received.
async fn header_and_first(
    p: &Pipeline,
    want: Expected,
) -> Result<(Arc<SectionCheck>, Option<EarlySection>), FetchError> {
    let key = want.key;
    let link = LinkUse::begin(&p.router);
    let stream = match p.source.open(&key, &[0]).await {
        Ok(s) => s,
        Err(e) => return Err(p.noted(&key, e.into())),
    };
    p.metrics.bytes_in.add(stream.header_len() as u64);
    let check = stream.check().clone();
    let header = check.header();
    if let Err(m) = check_header(header, &want, None) {
        return Err(p.noted(&key, corrupt_header(&key, &m)));
    }
    if header.sections.first().map(|s| s.layer_start) != Some(0) {
        link.end(stream.header_len() as u64);
        return Ok((check, None));
    }
    let want = budget_permits(p, header.sections[0].len);
    let Ok(budget) = p.wire_budget.clone().try_acquire_many_owned(want) else {
        link.end(stream.header_len() as u64);
        return Ok((check, None));
    };
    let task = receive_section(p.metrics.clone(), stream, check.clone(), 0, budget, link);
    Ok((check, Some(EarlySection(tokio::spawn(task)))))
}

/// The error of a header that is not the chunk asked for.
fn corrupt_header(key: &ChunkKey, m: &Mismatch) -> FetchError {
    FetchError::Corrupt(format!("chunk {key}: {m}"))
}

/// Permits of the byte budget a section of `len` bytes holds. A section larger than the whole
/// budget takes all of it, and so runs alone.
fn budget_permits(p: &Pipeline, len: u64) -> u32 {
    let want = len.min(p.fetch.max_inflight_bytes as u64).max(1);
    u32::try_from(want.div_ceil(super::BUDGET_UNIT))
        .unwrap_or(u32::MAX)
        .min(p.budget_permits)
}

/// The shape of the whole prefix; every chunk must agree on layers, heads and head size.
fn shape_of(chunks: &[Chunk]) -> Result<KvShape, FetchError> {
    let h0 = chunks[0].header();
    let mut tokens = 0u32;
    for c in chunks {
        let h = c.header();
        if (h.num_layers, h.kv_heads, h.head_dim) != (h0.num_layers, h0.kv_heads, h0.head_dim) {
            return Err(FetchError::Internal(format!(
                "chunk {} is {}x{}x{}, chunk 0 is {}x{}x{}",
                c.key(),
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

/// When a section's stages happened, for the fetch's phase log.
struct SectionTimes {
    /// Its last byte arrived (and it joined the decode queue).
    arrived: Instant,
    /// A decode worker took it.
    started: Instant,
    /// Time on the decode worker (decode and restore).
    decoded: Duration,
}

/// Fetches, decodes and restores one section; returns it with the bytes it took on the wire.
/// A section found corrupt (checksum, or a payload that does not decode) fails the fetch: its
/// buffer and shape are already the client's. The chunk is quarantined, so the next lookup and
/// fetch stop before it.
async fn section(
    p: &Pipeline,
    registry: &Arc<CodecRegistry>,
    chunk: &Chunk,
    s: SectionRef,
    layout: TargetLayout,
    shape: KvShape,
    dest: Arc<dyn Destination>,
) -> Result<(SectionRef, u64, SectionTimes), FetchError> {
    let _queued = p.metrics.sections_in_flight.track();
    section_inner(p, registry, chunk, s, layout, shape, dest)
        .await
        .map_err(|e| p.noted(&chunk.key(), e))
}

/// [`section`], its errors not yet noted.
async fn section_inner(
    p: &Pipeline,
    registry: &Arc<CodecRegistry>,
    chunk: &Chunk,
    s: SectionRef,
    layout: TargetLayout,
    shape: KvShape,
    dest: Arc<dyn Destination>,
) -> Result<(SectionRef, u64, SectionTimes), FetchError> {
    let early = match s.section {
        0 => chunk.first.lock().unwrap_or_else(|e| e.into_inner()).take(),
        _ => None,
    };
    let got = match early {
        Some(e) => e.received().await?,
        None => {
            // Back-pressure: the section's share of the byte budget before it is requested.
            let len = chunk.header().sections[s.section].len;
            let budget = p
                .wire_budget
                .clone()
                .acquire_many_owned(budget_permits(p, len))
                .await
                .map_err(|_| FetchError::ShutDown)?;
            request_section(p, &chunk.check, s.section, budget).await?
        }
    };
    let Received {
        bytes,
        arrived,
        _budget,
    } = got;
    let wire = bytes.len() as u64;
    let check = chunk.check.clone();
    let registry = registry.clone();
    let metrics = p.metrics.clone();
    let token_start = chunk.token_start;
    let index = s.section;
    let router = p.router.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    router.queued();
    p.decode_pool.spawn_fifo(move || {
        router.dequeued();
        // The fetch was dropped while this section waited: nobody reads the result.
        if tx.is_closed() {
            return;
        }
        let _busy = metrics.decoders_busy.track();
        let started = Instant::now();
        let job = SectionJob {
            header: check.header(),
            index,
            payload: &bytes,
            token_start,
        };
        // A panic stays in this section (a worker of the shared pool must not abort the daemon).
        let restored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let target = RestoreTarget {
                dest: dest.as_ref(),
                layout: &layout,
                shape: &shape,
            };
            restore_section_into(&target, &job, &registry, &router, &metrics)
        }))
        .unwrap_or_else(|_| {
            Err(FetchError::Internal(format!(
                "chunk {}: section {index}: decode panicked",
                check.key()
            )))
        });
        if restored.is_ok() {
            metrics.sections_restored.add(1);
        }
        let _ = tx.send(restored.map(|()| (started, started.elapsed())));
    });
    let (started, decoded) = rx
        .await
        .map_err(|_| FetchError::Internal("decode worker stopped".into()))??;
    let times = SectionTimes {
        arrived,
        started,
        decoded,
    };
    Ok((s, wire, times))
}

/// Requests section `index` of the chunk whose header `check` holds (the store sends it
/// without the header) and receives it; `budget` is its share of the byte budget.
async fn request_section(
    p: &Pipeline,
    check: &Arc<SectionCheck>,
    index: usize,
    budget: OwnedSemaphorePermit,
) -> Result<Received, FetchError> {
    let link = LinkUse::begin(&p.router);
    let stream = p.source.open_known(check, &[index]).await?;
    receive_section(
        p.metrics.clone(),
        stream,
        check.clone(),
        index,
        budget,
        link,
    )
    .await
}

/// Receives section `index` from `stream` (which asked for it alone); `budget` is its share of
/// the byte budget, `link` the request's use of the link (for the router's link rate).
async fn receive_section(
    metrics: Arc<Metrics>,
    mut stream: Box<dyn SectionReader>,
    check: Arc<SectionCheck>,
    index: usize,
    budget: OwnedSemaphorePermit,
    link: LinkUse,
) -> Result<Received, FetchError> {
    match stream.next_section().await {
        Ok(Some((_, bytes))) => {
            metrics.bytes_in.add(bytes.len() as u64);
            link.end((stream.header_len() + bytes.len()) as u64);
            Ok(Received {
                bytes,
                arrived: Instant::now(),
                _budget: budget,
            })
        }
        Ok(None) => Err(FetchError::Internal(format!(
            "chunk {}: section {index} missing",
            check.key()
        ))),
        Err(e) => Err(e.into()),
    }
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

/// Where a section is restored: the fetch's destination, in the client's layout and shape.
#[derive(Clone, Copy)]
pub struct RestoreTarget<'a> {
    /// The fetch buffer.
    pub dest: &'a dyn Destination,
    /// The client's layout.
    pub layout: &'a TargetLayout,
    /// The whole fetch's shape.
    pub shape: &'a KvShape,
}

/// The fetch's decode stage for one section (blocking; runs on a decode slot). Into device
/// memory, `router` picks the decoder among those that can restore the section bit for bit
/// like the CPU path (`route`): the GPU kernels, NVDEC, or the CPU (decoding for the
/// dequantizing kernel, or restoring whole and copying). Host memory is restored on the CPU
/// and placed through `dest.write`.
pub fn restore_section_into(
    target: &RestoreTarget<'_>,
    job: &SectionJob<'_>,
    registry: &CodecRegistry,
    router: &Router,
    metrics: &Metrics,
) -> Result<(), FetchError> {
    let RestoreTarget {
        dest,
        layout,
        shape,
    } = *target;
    let SectionJob {
        header,
        index,
        payload,
        token_start,
    } = *job;
    let bad = |e: FormatError| {
        let m = format!("chunk {}: section {index}: {e}", header.key);
        match e {
            // No decoder here, or the decoder library failed: not the object's fault.
            FormatError::Codec(
                CodecError::Unavailable { .. }
                | CodecError::Library { .. }
                | CodecError::Unsupported { .. },
            ) => FetchError::Decoder(m),
            // This daemon lacks (or has another) codec profile: not the object's fault either.
            FormatError::ProfileMissing(_) | FormatError::ProfileMismatch(_) => {
                FetchError::Decoder(m)
            }
            // The section passed its checksum: a payload that does not decode was stored so.
            _ => FetchError::Corrupt(m),
        }
    };
    if let Some(region) = dest.device() {
        let started = Instant::now();
        let kernels = kernels_apply(header, index, layout);
        if let Err(why) = &kernels {
            tracing::debug!(chunk = %header.key, index, "gpu kernels skipped: {why}");
        }
        let cost = SectionCost {
            variant: header.variant,
            candidates: candidates(
                header.variant,
                kernels.is_ok(),
                region.device.nvdec_sessions(),
            ),
            wire_bytes: payload.len() as u64,
            kv_bytes: section_kv_bytes(header, index, layout),
        };
        let choice = router
            .choose(&cost, region.device.nvdec_sessions())
            .ok_or_else(|| FetchError::Internal("no decoder for the section".into()))?;
        tracing::trace!(chunk = %header.key, index, ?choice, "section routed");
        // Whole on the CPU when the kernels cannot reproduce it, or when the CPU is chosen for
        // a section only the kernels would otherwise decode (transform-coded ones).
        let on_kernels = kernels.is_ok()
            && !(choice.decoder == Decoder::Cpu && header.variant == VariantKind::Rans);
        let done = |used: Decoder, ok: bool| {
            let took = ok.then(|| started.elapsed());
            router.done(choice.decoder, used, header.variant, cost.kv_bytes, took);
        };
        if on_kernels {
            let restored = restore_section_to_device(
                region.device,
                header,
                index,
                payload,
                registry,
                layout,
                shape,
                token_start,
                region.buffer,
                choice.decoder == Decoder::Nvdec,
            )
            .map_err(|e| match e {
                // The section's bytes or profile: the CPU path would fail the same way.
                GpuError::Format(fe) => bad(fe),
                e => FetchError::Gpu(format!(
                    "chunk {}: section {index}: gpu restore: {e}",
                    header.key
                )),
            });
            let route = match restored {
                Ok(route) => route,
                Err(e) => {
                    done(choice.decoder, false);
                    return Err(e);
                }
            };
            let c = &metrics.gpu_sections;
            let used = match route {
                Route::Packed => {
                    c.packed.add(1);
                    Decoder::Gpu
                }
                Route::Rans => {
                    c.rans.add(1);
                    Decoder::Gpu
                }
                Route::Nvdec => {
                    c.nvdec.add(1);
                    Decoder::Nvdec
                }
                Route::CpuDecode => {
                    c.cpu_decode.add(1);
                    Decoder::Cpu
                }
            };
            done(used, true);
            return Ok(());
        }
        // Restored on the CPU below; `write` copies the placed bytes to the device.
        metrics.gpu_sections.cpu_restore.add(1);
        let restored = restore_on_cpu(target, job, registry, &bad);
        done(Decoder::Cpu, restored.is_ok());
        return restored;
    }
    restore_on_cpu(target, job, registry, &bad)
}

/// The decoders that can restore a section of `variant` into device memory: the kernels only
/// where they reproduce the CPU path (`kernels`), NVDEC for HEVC on a device with sessions,
/// and always the CPU.
fn candidates(variant: VariantKind, kernels: bool, nvdec_sessions: usize) -> Candidates {
    if !kernels {
        return Candidates::of(&[Decoder::Cpu]);
    }
    match variant {
        VariantKind::Rans => Candidates::of(&[Decoder::Gpu, Decoder::Cpu]),
        VariantKind::Hevc if nvdec_sessions > 0 => Candidates::of(&[Decoder::Nvdec, Decoder::Cpu]),
        // Unpacking is the cheapest kernel there is; the CPU would only add a copy.
        VariantKind::Packed => Candidates::of(&[Decoder::Gpu]),
        VariantKind::Hevc | VariantKind::Zstd => Candidates::of(&[Decoder::Cpu]),
    }
}

/// Bytes of KV section `index` of `header` restores in `layout`'s dtype.
fn section_kv_bytes(header: &ChunkHeader, index: usize, layout: &TargetLayout) -> u64 {
    let layers = header.sections.get(index).map_or(0, |s| s.layers()) as u64;
    layers
        * 2
        * u64::from(header.token_count)
        * header.channels() as u64
        * layout.dtype.size() as u64
}

/// Decodes and restores section `job` on the CPU and places it through `target.dest.write`.
fn restore_on_cpu(
    target: &RestoreTarget<'_>,
    job: &SectionJob<'_>,
    registry: &CodecRegistry,
    bad: &dyn Fn(FormatError) -> FetchError,
) -> Result<(), FetchError> {
    let RestoreTarget {
        dest,
        layout,
        shape,
    } = *target;
    let SectionJob {
        header,
        index,
        payload,
        token_start,
    } = *job;
    let plane = decode_section(header, index, payload, registry).map_err(bad)?;
    let layers = restore_section(header, index, &plane, registry).map_err(bad)?;
    let first = u32::from(header.sections[index].layer_start);
    place_cache(layout, shape, first, token_start, &layers, &mut |off, b| {
        dest.write(off, b).map_err(FetchError::from)
    })
}
