//! The benchmark's chunk set: real chunk objects (the codelm KV, 8-bit zstd) re-keyed into as
//! many distinct, valid objects as the requested size needs. Server and client build the same
//! set deterministically.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use kvfetcher_codec::{
    encode_cache, ChunkHeader, ChunkKey, CodecRegistry, EncodeConfig, ModelFingerprint,
};
use kvfetcher_kv::KvFile;
use sha2::{Digest, Sha256};

/// The model fingerprint of every benchmark object.
pub(super) fn bench_model() -> ModelFingerprint {
    ModelFingerprint::of_bytes(b"kvfetcher bench net")
}

/// Builds objects from the KV file at `kv` until they total at least `total_bytes`.
pub(super) fn build(kv: &Path, total_bytes: u64) -> anyhow::Result<Vec<(ChunkKey, Bytes)>> {
    let file = KvFile::read(kv).with_context(|| format!("read {}", kv.display()))?;
    let cache = file.cache;
    let ids: Vec<u32> = cache
        .token_ids()
        .map(|t| t.to_vec())
        .unwrap_or_else(|| (0..cache.tokens() as u32).collect());
    let cfg = EncodeConfig {
        layers_per_section: 2,
        ..EncodeConfig::default()
    };
    let base = encode_cache(
        &cache,
        &bench_model(),
        &ids,
        &cfg,
        &CodecRegistry::software(),
    )?;
    anyhow::ensure!(!base.is_empty(), "the KV file gave no chunks");
    let model = bench_model();
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut i = 0u64;
    while total < total_bytes {
        let (_, bytes) = &base[(i as usize) % base.len()];
        let (mut header, header_len) = ChunkHeader::parse_prefix(bytes)?;
        header.key = ChunkKey(Sha256::digest(i.to_le_bytes()).into());
        header.model = model;
        let mut obj = header.to_bytes()?;
        obj.extend_from_slice(&bytes[header_len..]);
        total += obj.len() as u64;
        out.push((header.key, Bytes::from(obj)));
        i += 1;
    }
    Ok(out)
}
