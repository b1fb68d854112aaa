//! `kvfetcher decode`: a directory of chunk object files back into one KV safetensors file.
//!
//! Chunks are put in token order by the `token_start` of their headers; they must start at token
//! 0, follow each other without gaps or overlaps, and agree on model, shape and dtype, else the
//! command fails naming the files. Chunk objects carry no token ids, so the written file has no
//! `token_ids` tensor; its metadata names the model fingerprint and the chunk count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use kvfetcher_codec::{decode_chunk, ChunkHeader, ChunkView, CodecRegistry};
use kvfetcher_kv::{KvCache, KvFile};
use rayon::prelude::*;

/// Arguments of `kvfetcher decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// Directory of chunk object files (every regular file not starting with `.`).
    #[arg(long)]
    pub input: PathBuf,
    /// The KV safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Codec profiles that transform-coded chunks name (repeatable).
    #[arg(long)]
    pub profile: Vec<PathBuf>,
}

/// One chunk object file, read and its header parsed.
struct ChunkFile {
    path: PathBuf,
    bytes: Vec<u8>,
    header: ChunkHeader,
}

/// Reads every chunk object of `dir`, in token order, checking that together they cover tokens
/// `0..n` of one model exactly once.
fn read_chunks(dir: &Path) -> anyhow::Result<Vec<ChunkFile>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    let mut chunks = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let header = ChunkView::parse(&bytes)
            .with_context(|| format!("{}: not a valid chunk object", path.display()))?
            .header()
            .clone();
        chunks.push(ChunkFile {
            path,
            bytes,
            header,
        });
    }
    if chunks.is_empty() {
        bail!("{} holds no chunk objects", dir.display());
    }
    chunks.sort_by_key(|c| c.header.token_start);
    let first = &chunks[0];
    let shape = |h: &ChunkHeader| (h.num_layers, h.kv_heads, h.head_dim, h.dtype);
    let mut next = 0u64;
    for c in &chunks {
        let h = &c.header;
        if h.model != first.header.model {
            bail!(
                "mixed models: {} holds model {}, {} model {}",
                first.path.display(),
                first.header.model,
                c.path.display(),
                h.model
            );
        }
        if shape(h) != shape(&first.header) {
            bail!(
                "mixed shapes: {} is {:?}, {} is {:?} (layers, kv heads, head dim, dtype)",
                first.path.display(),
                shape(&first.header),
                c.path.display(),
                shape(h)
            );
        }
        let start = u64::from(h.token_start);
        if start > next {
            bail!(
                "gap in the chunks: tokens {next}..{start} missing (next chunk: {})",
                c.path.display()
            );
        }
        if start < next {
            bail!(
                "overlapping chunks: {} starts at token {start}, before token {next}",
                c.path.display()
            );
        }
        next = start + u64::from(h.token_count);
    }
    Ok(chunks)
}

/// Runs `kvfetcher decode`.
pub(crate) fn run_decode(args: DecodeArgs) -> anyhow::Result<()> {
    let chunks = read_chunks(&args.input)?;
    let mut registry = CodecRegistry::standard();
    for p in &args.profile {
        registry = registry.with_profile(super::load_profile(p)?);
    }
    let bar = super::progress(chunks.len() as u64, "decode");
    let parts = chunks
        .par_iter()
        .map(|c| {
            let kv =
                decode_chunk(&c.bytes, &registry).with_context(|| format!("{}", c.path.display()));
            bar.inc(1);
            kv
        })
        .collect::<anyhow::Result<Vec<KvCache>>>()?;
    bar.finish_and_clear();
    let cache = KvCache::concat_tokens(&parts)?;
    let header = &chunks[0].header;
    let metadata: BTreeMap<String, String> = [
        ("model_fingerprint", header.model.to_hex()),
        ("chunks", chunks.len().to_string()),
        ("decoded_from", args.input.display().to_string()),
        (
            "generator",
            format!("kvfetcher decode {}", env!("CARGO_PKG_VERSION")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let file = KvFile { cache, metadata };
    file.write(&args.out)?;
    println!(
        "wrote {}: {} chunks, {} layers x {} tokens x {} kv heads x {} head_dim, {} (no token ids)",
        args.out.display(),
        chunks.len(),
        file.cache.num_layers(),
        file.cache.tokens(),
        file.cache.kv_heads(),
        file.cache.head_dim(),
        file.cache.dtype().safetensors_name()
    );
    Ok(())
}
