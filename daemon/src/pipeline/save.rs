//! The save path: copy the client's buffer, quantize and encode its chunks on the save pool,
//! and upload each chunk to the store that holds its key.
//!
//! Encoding runs on a dedicated thread pool of `save.workers` threads, never on the decode
//! slots or the async runtime, so a large save slows fetches only by the cores it is given.
//! Chunks already stored are counted as stored and kept (the store is write-once and answers
//! `Exists`, which the client reports as "already there"); a save with `replace` (allowed by
//! the server's `[save]` lists) overwrites them.

use std::time::Instant;

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use std::sync::Arc;

use kvfetcher_codec::{
    allocate_steps, encode_cache, CodecRegistry, EncodeConfig, ModelFingerprint, QuantConfig,
    TransformConfig, VariantKind,
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
    let cfg = encode_config(&p.save, &p.registry, model)?;
    let ids = token_ids.to_vec();
    let registry = p.registry.clone();
    let pool = p.save_pool.clone();
    let chunks = (token_ids.len()).div_ceil(p.save.chunk_tokens as usize);
    let queued = p.metrics.save_queue.track_n(chunks as i64);
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        let _ = tx.send(encode_cache(&cache, &fp, &ids, &cfg, &registry));
    });
    let objects = rx
        .await
        .map_err(|_| SaveError::WorkerStopped)?
        .map_err(|e| SaveError::Encode(e.to_string()))?;
    drop(queued);
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
}
