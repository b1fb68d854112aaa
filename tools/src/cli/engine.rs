//! The llama.cpp engine (`kvf-llama`, examples/llama) driven as a subprocess, so that KV
//! captures and fidelity figures come from a real engine running a real GGUF model.
//!
//! Each call starts the engine once: `info` (the model's KV geometry and GGUF metadata),
//! `capture` (a text's token ids and the KV llama.cpp computed for them), `score` (the logits
//! of a continuation after loading a given prefix KV). The engine is found through `--engine`,
//! `$KVF_LLAMA`, or `build/llama/bin/kvf-llama` (built by `make engine`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use kvfetcher_kv::{DType, KvCache, KvFile};

/// Where `make engine` puts the engine, relative to the repository root.
const DEFAULT_ENGINE: &str = "build/llama/bin/kvf-llama";

/// A GGUF model opened through the engine binary.
#[derive(Debug, Clone)]
pub struct Engine {
    binary: PathBuf,
    model: PathBuf,
    threads: usize,
}

/// What the engine reports about a model: KV geometry and scalar GGUF metadata.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Transformer layers (each with its own K and V).
    pub n_layer: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Vocabulary size (the length of a logits row).
    pub n_vocab: usize,
    /// Every `key=value` line the engine printed (`meta.*` are GGUF metadata).
    pub fields: BTreeMap<String, String>,
}

/// A text's tokens and the KV the engine computed for them.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Token ids as the engine's tokenizer produced them (BOS first where the model adds one).
    pub token_ids: Vec<u32>,
    /// K (after RoPE, as llama.cpp caches it) and V of every token, with the token ids.
    pub cache: KvCache,
}

/// One `score` run: logits for every continuation position and a greedy continuation.
#[derive(Debug, Clone)]
pub struct Scored {
    /// `positions x n_vocab` logits, row `i` from the token at prefix length + `i`.
    pub logits: Vec<f32>,
    /// Greedy tokens generated after the last scored position.
    pub generated: Vec<u32>,
}

impl Engine {
    /// The engine binary for `model`: `explicit`, else `$KVF_LLAMA`, else [`DEFAULT_ENGINE`]
    /// under the current directory or the repository this executable was built in.
    pub fn locate(explicit: Option<&Path>, model: &Path, threads: usize) -> anyhow::Result<Self> {
        let candidates: Vec<PathBuf> = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => match std::env::var_os("KVF_LLAMA").filter(|v| !v.is_empty()) {
                Some(p) => vec![PathBuf::from(p)],
                None => {
                    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                    vec![PathBuf::from(DEFAULT_ENGINE), repo.join(DEFAULT_ENGINE)]
                }
            },
        };
        let Some(binary) = candidates.iter().find(|p| p.is_file()) else {
            bail!(
                "the llama.cpp engine was not found at {}: build it with `make engine` \
                 (or pass --engine / set KVF_LLAMA)",
                candidates[0].display()
            );
        };
        ensure!(model.is_file(), "model {} does not exist", model.display());
        Ok(Engine {
            binary: binary.clone(),
            model: model.to_path_buf(),
            threads: threads.max(1),
        })
    }

    /// This engine over a copy of the model with every weight dequantized to f32, written to
    /// `out`. llama.cpp's CPU kernels round activations to 8 bits against quantized weights, so
    /// on a quantized model any change of the KV (measured: 0.05% noise in one layer's K)
    /// moves the next-token distribution by a floor of its own (mean KL ~0.02 on SmolLM2
    /// Q4_1); over f32 weights the same model's response to KV error is measured smoothly.
    pub fn dequantized(&self, out: &Path) -> anyhow::Result<Engine> {
        self.run(&["--write-f32".as_ref(), out.as_os_str()])?;
        Ok(Engine {
            model: out.to_path_buf(),
            ..self.clone()
        })
    }

    /// The model's KV geometry and metadata.
    pub fn info(&self) -> anyhow::Result<ModelInfo> {
        let fields = self.run(&["--info".as_ref()])?;
        let num = |k: &str| -> anyhow::Result<usize> {
            fields
                .get(k)
                .with_context(|| format!("the engine did not report {k}"))?
                .parse()
                .with_context(|| format!("the engine reported a bad {k}"))
        };
        Ok(ModelInfo {
            n_layer: num("n_layer")?,
            kv_heads: num("kv_heads")?,
            head_dim: num("head_dim")?,
            n_vocab: num("n_vocab")?,
            fields,
        })
    }

    /// Tokenizes `text` (its first `max_tokens` tokens; `chat`: as one user turn in the model's
    /// chat template), prefills it and returns the ids and the f16 KV llama.cpp cached.
    pub fn capture(
        &self,
        text: &Path,
        max_tokens: usize,
        chat: bool,
        scratch: &Path,
    ) -> anyhow::Result<Capture> {
        let kv_out = scratch.join("capture.safetensors");
        let max = max_tokens.to_string();
        let mut args = vec![
            "--prompt-file".as_ref(),
            text.as_os_str(),
            "--max-tokens".as_ref(),
            max.as_ref(),
            "--no-remote".as_ref(),
            "--gen".as_ref(),
            "1".as_ref(),
            "--print-prompt".as_ref(),
            "--kv-out".as_ref(),
            kv_out.as_os_str(),
        ];
        if chat {
            args.push("--chat".as_ref());
        }
        let fields = self.run(&args)?;
        let token_ids = parse_ids(fields.get("prompt_ids").context("no prompt_ids")?)?;
        let file = KvFile::read(&kv_out).with_context(|| format!("{}", kv_out.display()))?;
        ensure!(
            file.cache.tokens() == token_ids.len(),
            "the engine cached {} tokens for a {}-token prompt",
            file.cache.tokens(),
            token_ids.len()
        );
        let cache = KvCache::new(file.cache.layers().to_vec(), Some(token_ids.clone()))?;
        Ok(Capture { token_ids, cache })
    }

    /// Loads `prefix` (the KV of `ids[..prefix.tokens()]`, exact or decoded) into the engine,
    /// decodes the rest of `ids` keeping every position's logits, then generates `gen` greedy
    /// tokens.
    pub fn score(
        &self,
        ids: &[u32],
        prefix: &KvCache,
        gen: usize,
        vocab: usize,
        scratch: &Path,
    ) -> anyhow::Result<Scored> {
        let p = prefix.tokens();
        ensure!(
            p < ids.len(),
            "a prefix of {p} of {} tokens leaves nothing to score",
            ids.len()
        );
        ensure!(prefix.dtype() == DType::F16, "the engine's cache is f16");
        let tokens = scratch.join("score-ids.txt");
        let kv = scratch.join("score-prefix.kv");
        let logits = scratch.join("score-logits.f32");
        std::fs::write(&tokens, format_ids(ids))?;
        std::fs::write(&kv, host_layout(prefix))?;
        let (p_arg, gen_arg) = (p.to_string(), gen.max(1).to_string());
        let fields = self.run(&[
            "--tokens-file".as_ref(),
            tokens.as_os_str(),
            "--score".as_ref(),
            p_arg.as_ref(),
            "--prefix-kv".as_ref(),
            kv.as_os_str(),
            "--logits-out".as_ref(),
            logits.as_os_str(),
            "--gen".as_ref(),
            gen_arg.as_ref(),
        ])?;
        let bytes = std::fs::read(&logits)?;
        let rows = ids.len() - p;
        ensure!(
            bytes.len() == rows * vocab * 4,
            "the engine wrote {} bytes of logits for {rows} positions x {vocab}",
            bytes.len()
        );
        let logits = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let generated = parse_ids(fields.get("gen").context("no gen")?)?;
        Ok(Scored { logits, generated })
    }

    /// Runs the engine on the model with `args`; returns its `key=value` stdout lines.
    fn run(&self, args: &[&std::ffi::OsStr]) -> anyhow::Result<BTreeMap<String, String>> {
        let out = Command::new(&self.binary)
            .arg("--model")
            .arg(&self.model)
            .arg("--threads")
            .arg(self.threads.to_string())
            .args(args)
            .output()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} failed ({}): {}",
                self.binary.display(),
                out.status,
                tail.join("\n")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// The engine's host KV layout: per layer K then V, each `[tokens, kv_heads, head_dim]`.
pub fn host_layout(cache: &KvCache) -> Vec<u8> {
    let mut out = Vec::with_capacity(cache.nbytes());
    for layer in cache.layers() {
        out.extend_from_slice(layer.key.data());
        out.extend_from_slice(layer.value.data());
    }
    out
}

fn format_ids(ids: &[u32]) -> String {
    let mut s = String::with_capacity(ids.len() * 6);
    for id in ids {
        let _ = write!(s, "{id} ");
    }
    s
}

fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    s.split_whitespace()
        .map(|t| t.parse().with_context(|| format!("bad token id {t:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_kv::{LayerKv, Tensor};

    #[test]
    fn ids_round_trip_through_the_engine_text_form() {
        assert_eq!(
            parse_ids(&format_ids(&[1, 0, 49151])).unwrap(),
            vec![1, 0, 49151]
        );
        assert!(parse_ids("1 x").is_err());
        assert!(parse_ids("").unwrap().is_empty());
    }

    #[test]
    fn host_layout_is_k_then_v_per_layer() {
        let t = |v: f32| Tensor::from_f32(DType::F16, [2, 1, 2], &[v; 4]).unwrap();
        let cache = KvCache::new(
            vec![
                LayerKv {
                    key: t(1.0),
                    value: t(2.0),
                },
                LayerKv {
                    key: t(3.0),
                    value: t(4.0),
                },
            ],
            None,
        )
        .unwrap();
        let bytes = host_layout(&cache);
        assert_eq!(bytes.len(), cache.nbytes());
        let halves: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let want: Vec<f32> = [1.0, 2.0, 3.0, 4.0].iter().flat_map(|&v| [v; 4]).collect();
        assert_eq!(halves, want);
    }

    #[test]
    fn a_missing_engine_is_named_with_how_to_build_it() {
        let err = Engine::locate(Some(Path::new("/nonexistent/kvf-llama")), Path::new("m"), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("make engine"), "{err}");
    }
}
