//! The save path: copy the client's buffer, quantize and encode its chunks on the save pool,
//! and upload each chunk to the store that holds its key.
//!
//! Encoding runs on a dedicated thread pool of `save.workers` threads, never on the decode
//! slots or the async runtime, so a large save slows fetches only by the cores it is given.
//! Chunks already stored are counted as stored and kept (the store is write-once and answers
//! `Exists`, which the client reports as "already there"); a save with `replace` (allowed by
//! the server's `[save]` lists) overwrites them. A transform-coded save first puts its codec
//! profile to the store (once per profile per daemon run; see `profiles`), so any node can
//! restore its chunks.

use std::time::Instant;

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use std::sync::Arc;

use kvfetcher_codec::{
    allocate_steps, encode_cache, CodecRegistry, EncodeConfig, ModelFingerprint, ProfileId,
    QuantConfig, TransformConfig, VariantKind,
};
use kvfetcher_protocol::{KvShape, TargetLayout};

use super::layout::extract_cache;
use super::Pipeline;
use super::SaveError;
use crate::config::SaveConfig;

/// The fingerprint codec profiles are calibrated under for a model id: that of the id up to the
/// first `;` (the model file, `sha256:...`), without the engine's cache settings that engines
/// append (`;kv=f16;fa=0`), which change the KV's bits but not its statistics.
pub fn profile_model(model_id: &str) -> ModelFingerprint {
    ModelFingerprint::of_bytes(model_id.split(';').next().unwrap_or(model_id).as_bytes())
}

/// The codec settings a save config stands for, for `model_id`'s KV: `rans` with the model's
/// profile in `registry` (steps for `save.target_kl`), `zstd` at `save.bits` for a model
/// without one.
pub fn encode_config(
    save: &SaveConfig,
    registry: &CodecRegistry,
    model_id: &str,
) -> Result<EncodeConfig, SaveError> {
    let variant = match save.variant.as_str() {
        "zstd" => VariantKind::Zstd,
        "packed" => VariantKind::Packed,
        "hevc" => VariantKind::Hevc,
        "rans" => match registry.profile_for_model(&profile_model(model_id)) {
            Some(profile) => {
                let a = allocate_steps(&profile, save.target_kl)
                    .map_err(|e| SaveError::Encode(format!("profile {}: {e}", profile.id())))?;
                return Ok(EncodeConfig {
                    quant: QuantConfig::Transform(Arc::new(TransformConfig {
                        profile,
                        steps: a.steps,
                    })),
                    variant: VariantKind::Rans,
                    hevc_layout: None,
                    hevc_stream_frames: None,
                    chunk_tokens: save.chunk_tokens as usize,
                    layers_per_section: save.layers_per_group as usize,
                });
            }
            None => {
                tracing::warn!(model_id, "no codec profile for this model: saving as zstd");
                VariantKind::Zstd
            }
        },
        other => return Err(SaveError::UnknownVariant(other.to_string())),
    };
    let quant = if save.bits == 16 {
        QuantConfig::Exact
    } else {
        QuantConfig::bits(save.bits)
    };
    Ok(EncodeConfig {
        quant,
        variant,
        hevc_layout: save.hevc_layout.clone(),
        hevc_stream_frames: save.hevc_stream_frames(),
        chunk_tokens: save.chunk_tokens as usize,
        layers_per_section: save.layers_per_group as usize,
    })
}

/// The fp16 KV a transform-coded section holds at least, when the model's layers allow: the
/// GPU route pays a fixed cost per section (uploads, four launches, a wait), which held it at
/// 11-13 GB/s on an H200 with 1 MB sections and 38-47 GB/s with 4-32 MB ones
/// (docs/BENCHMARKS.md). Engines still see layers as ready section by section.
pub const MIN_RANS_SECTION_BYTES: usize = 4 << 20;

/// Layers per transform-coded section: `configured` (`[save] layers_per_group`), or more so
/// that a section of `chunk_tokens` holds at least [`MIN_RANS_SECTION_BYTES`] of fp16 KV, at
/// most every layer.
pub fn rans_section_layers(configured: usize, chunk_tokens: usize, shape: &KvShape) -> usize {
    let layer = chunk_tokens
        .saturating_mul(shape.kv_heads as usize)
        .saturating_mul(shape.head_dim as usize)
        .saturating_mul(4)
        .max(1);
    let layers = (shape.num_layers as usize).max(1);
    configured
        .max(MIN_RANS_SECTION_BYTES.div_ceil(layer))
        .min(layers)
}

/// Runs a whole save; returns the number of chunks stored.
#[allow(clippy::too_many_arguments)]
pub(super) async fn save(
    p: &Pipeline,
    model: &str,
    token_ids: &[u32],
    layout: &TargetLayout,
    shape: &KvShape,
    data: &[u8],
    replace: bool,
) -> Result<u32, SaveError> {
    let started = Instant::now();
    if shape.tokens as usize != token_ids.len() {
        return Err(SaveError::TokenCount {
            ids: token_ids.len(),
            tokens: shape.tokens,
        });
    }
    if token_ids.is_empty() {
        return Ok(0);
    }
    // The copy: from here on the client's buffer is not needed.
    let cache = extract_cache(layout, shape, data, Some(token_ids.to_vec()))?;
    p.metrics.bytes_saved_raw.add(data.len() as u64);
    let fp = ModelFingerprint::of_bytes(model.as_bytes());
    let registry = p.profiles.registry();
    let mut cfg = encode_config(&p.save, &registry, model)?;
    if cfg.variant == VariantKind::Rans {
        cfg.layers_per_section =
            rans_section_layers(cfg.layers_per_section, cfg.chunk_tokens, shape);
    }
    // The profile a transform-coded save uses goes to the store first (once per run), so no
    // stored chunk names a profile the store lacks.
    let publish = match &cfg.quant {
        QuantConfig::Transform(t) => {
            let id = registry
                .registered_id(&t.profile)
                .unwrap_or_else(|| t.profile.id());
            (!p.profiles.is_stored(&id)).then(|| (id, t.profile.clone()))
        }
        _ => None,
    };
    let ids = token_ids.to_vec();
    let pool = p.save_pool.clone();
    let chunks = (token_ids.len()).div_ceil(p.save.chunk_tokens as usize);
    let queued = p.metrics.save_queue.track_n(chunks as i64);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let profile = publish.as_ref().map(|(_, profile)| profile.clone());
    pool.spawn(move || {
        let bytes = profile.map(|p| Bytes::from(p.to_bytes()));
        let _ = tx.send((encode_cache(&cache, &fp, &ids, &cfg, &registry), bytes));
    });
    let (objects, profile_bytes) = rx.await.map_err(|_| SaveError::WorkerStopped)?;
    let objects = objects.map_err(|e| SaveError::Encode(e.to_string()))?;
    drop(queued);
    if let (Some((id, _)), Some(bytes)) = (publish, profile_bytes) {
        put_profile(p, id, bytes).await?;
    }
    let stored = futures::stream::iter(objects)
        .map(|(key, bytes)| async move {
            let len = bytes.len() as u64;
            let client = p.stores.client_for(&key).await?;
            match client.put_object(Bytes::from(bytes), replace).await {
                Ok(_) => {
                    p.metrics.bytes_out.add(len);
                    // Saved again: a damaged copy this daemon found is replaced.
                    p.quarantine.remove(&key);
                    Ok(1u32)
                }
                Err(e) => Err(SaveError::Store(p.stores.failed(&key, e).await)),
            }
        })
        .buffer_unordered(p.fetch.max_inflight_sections)
        .try_fold(0u32, |a, b| async move { Ok(a + b) })
        .await?;
    p.metrics.save_seconds.observe(started.elapsed());
    tracing::info!(
        model,
        tokens = shape.tokens,
        chunks = stored,
        ms = started.elapsed().as_millis() as u64,
        "saved"
    );
    Ok(stored)
}

/// Puts codec profile `id` (`bytes`) to the store that holds its key, and records it as
/// stored. Already there (a racing save, another node, an earlier run) is success.
async fn put_profile(p: &Pipeline, id: ProfileId, bytes: Bytes) -> Result<(), SaveError> {
    let key = id.object_key();
    let client = p.stores.client_for(&key).await?;
    let len = bytes.len() as u64;
    match client.put_profile(bytes).await {
        Ok(created) => {
            if created {
                p.metrics.bytes_out.add(len);
                tracing::info!(profile = %id, bytes = len, "codec profile put to the store");
            }
            p.profiles.mark_stored(id);
            Ok(())
        }
        Err(e) => Err(SaveError::Store(p.stores.failed(&key, e).await)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_found_by_the_model_file_whatever_the_cache_settings() {
        let file = ModelFingerprint::of_bytes(b"sha256:ab12");
        assert_eq!(profile_model("sha256:ab12;kv=f16;fa=0"), file);
        assert_eq!(profile_model("sha256:ab12;kv=f16;fa=1;dev=cuda"), file);
        assert_eq!(profile_model("sha256:ab12"), file);
        assert_ne!(profile_model("sha256:cd34;kv=f16"), file);
    }

    fn shape(layers: u32, heads: u32, dim: u32) -> KvShape {
        KvShape {
            num_layers: layers,
            tokens: 1024,
            kv_heads: heads,
            head_dim: dim,
        }
    }

    /// Sections grow to 4 MiB of fp16 KV where layers are small, never beyond the model,
    /// never below the configured grouping.
    #[test]
    fn rans_sections_hold_at_least_four_mib() {
        // 8 x 128 heads, 256 tokens: 1 MiB per layer -> 4 layers.
        assert_eq!(rans_section_layers(1, 256, &shape(32, 8, 128)), 4);
        assert_eq!(rans_section_layers(8, 256, &shape(32, 8, 128)), 8);
        // SmolLM2-135M (3 x 64, 30 layers): 192 KiB per layer -> 22 layers.
        assert_eq!(rans_section_layers(1, 256, &shape(30, 3, 64)), 22);
        // A toy: every layer in one section.
        assert_eq!(rans_section_layers(1, 256, &shape(4, 1, 8)), 4);
        // Large layers already exceed it.
        assert_eq!(rans_section_layers(1, 4096, &shape(80, 8, 128)), 1);
    }
}
