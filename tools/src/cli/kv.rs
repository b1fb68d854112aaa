//! `kvfetcher-bench kv ...`: produce real KV caches (`capture`: a GGUF model's KV as llama.cpp computes
//! it for a text, or a llama2.c toy's), measure how well a decoded cache preserves a llama2.c
//! model's predictions (`fidelity`), and describe a KV file (`info`).
//!
//! Thin wrappers over `kvfetcher_kv` and the engine driver; nothing here touches the network
//! or a GPU.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use clap::{Args, Subcommand, ValueEnum};
use kvfetcher_client::model_id::model_id_from_file;
use kvfetcher_kv::{fidelity, DType, KvFile, Llama2Model, BOS_TOKEN};

use super::engine::Engine;

/// Print a progress line every this many positions: often enough for a 512-token debug build
/// run, rare enough not to flood a log.
const PROGRESS_EVERY: usize = 128;

/// `kvfetcher kv`: real KV caches and their fidelity.
#[derive(Debug, Args)]
pub struct KvArgs {
    /// The `kv` subcommand to run.
    #[command(subcommand)]
    pub command: KvCommand,
}

/// The `kv` subcommands.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Write the KV cache a model computes: a GGUF model over a text (through llama.cpp), or a
    /// llama2.c model over tokens it samples.
    Capture(CaptureArgs),
    /// Compare next-token predictions made from an original and a decoded KV cache.
    Fidelity(FidelityArgs),
    /// Describe a KV safetensors file.
    Info(InfoArgs),
}

/// Arguments of `kvfetcher-bench kv capture`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["model", "gguf"]))]
pub struct CaptureArgs {
    /// A GGUF model: its KV (K after RoPE, V) for --text, computed by llama.cpp through the
    /// engine (`make engine`); shapes and metadata come from the model.
    #[arg(long, requires = "text")]
    pub gguf: Option<PathBuf>,
    /// The text whose KV to capture (with --gguf).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// With --gguf: the text is one user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// With --gguf: the engine binary (default $KVF_LLAMA or build/llama/bin/kvf-llama).
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// With --gguf: engine CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// A llama2.c checkpoint (e.g. stories260K.bin): KV of tokens it samples itself (a toy).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens to capture: the text's first N (--gguf), or positions to generate, BOS
    /// included (--model, 1..=seq_len).
    #[arg(long)]
    pub tokens: usize,
    /// Sampler seed (xorshift64*, as in llama2.c's run.c).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sampling temperature; 0 is greedy (which loops on small models).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Element type written.
    #[arg(long, value_enum, default_value_t = DTypeArg::F16)]
    pub dtype: DTypeArg,
    /// The safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `kvfetcher-bench kv fidelity`.
#[derive(Debug, Args)]
pub struct FidelityArgs {
    /// The llama2.c checkpoint that produced the original cache.
    #[arg(long)]
    pub model: PathBuf,
    /// The original KV file (must hold token ids).
    #[arg(long)]
    pub original: PathBuf,
    /// The decoded KV file to judge.
    #[arg(long)]
    pub decoded: PathBuf,
    /// Print JSON instead of aligned text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kvfetcher-bench kv info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The KV safetensors file.
    pub file: PathBuf,
}

/// Element types accepted on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// Single precision.
    F32,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F32 => DType::F32,
        }
    }
}

/// Runs a `kv` subcommand, printing results on stdout and progress on stderr.
pub fn run(args: KvArgs) -> anyhow::Result<()> {
    run_to(args, &mut std::io::stdout().lock())
}

/// [`run`], printing results to `out`.
pub fn run_to(args: KvArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        KvCommand::Capture(a) => capture(&a, out),
        KvCommand::Fidelity(a) => fidelity_cmd(&a, out),
        KvCommand::Info(a) => info(&a.file, out),
    }
}

fn capture(a: &CaptureArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(gguf) = &a.gguf {
        return capture_gguf(a, gguf, out);
    }
    let model_path = a
        .model
        .as_deref()
        .context("--model or --gguf is required")?;
    let model = Llama2Model::load(model_path)?;
    let total = a.tokens;
    let mut next_report = PROGRESS_EVERY;
    let generation = model.generate_with_progress(total, a.seed, a.temperature, |done| {
        if done >= next_report || (done == total && total >= PROGRESS_EVERY) {
            eprintln!("kv capture: {done}/{total} tokens");
            next_report = done + PROGRESS_EVERY;
        }
    })?;
    let dtype = DType::from(a.dtype);
    let cache = generation.cache.to_dtype(dtype);
    let cfg = model.config();
    let file_name = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let metadata: BTreeMap<String, String> = [
        ("source", "llama2.c".to_string()),
        ("model_file", file_name),
        ("model_sha256", model.fingerprint_hex()),
        ("seed", a.seed.to_string()),
        ("temperature", a.temperature.to_string()),
        ("tokens", total.to_string()),
        ("dtype", dtype.safetensors_name().to_string()),
        ("bos_token", BOS_TOKEN.to_string()),
        (
            "sampler",
            "xorshift64* multinomial over softmax(logits/temperature), run.c without top-p"
                .to_string(),
        ),
        ("key", "after RoPE".to_string()),
        ("n_heads", cfg.n_heads.to_string()),
        ("dim", cfg.dim.to_string()),
        (
            "generator",
            format!("kvfetcher-bench kv capture {}", env!("CARGO_PKG_VERSION")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    write_capture(KvFile { cache, metadata }, &a.out, out)
}

/// `kv capture --gguf`: the engine's own KV for the first `--tokens` tokens of `--text`.
fn capture_gguf(a: &CaptureArgs, gguf: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let text = a.text.as_deref().context("--gguf needs --text")?;
    ensure!(a.tokens > 0, "--tokens must be at least 1");
    let engine = Engine::locate(a.engine.as_deref(), gguf, a.threads)?;
    let info = engine.info()?;
    let scratch = tempfile::tempdir()?;
    eprintln!(
        "kv capture: prefilling up to {} tokens of {} with llama.cpp",
        a.tokens,
        text.display()
    );
    let capture = engine.capture(text, a.tokens, a.chat, scratch.path())?;
    if capture.token_ids.len() < a.tokens {
        eprintln!(
            "kv capture: {} holds only {} tokens",
            text.display(),
            capture.token_ids.len()
        );
    }
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut metadata: BTreeMap<String, String> = [
        ("source", "llama.cpp".to_string()),
        ("model_file", file_name(gguf)),
        ("model_id", model_id_from_file(gguf)?),
        ("text_file", file_name(text)),
        ("chat_template", a.chat.to_string()),
        ("tokens", capture.token_ids.len().to_string()),
        ("dtype", DType::F16.safetensors_name().to_string()),
        ("key", "after RoPE".to_string()),
        (
            "generator",
            format!("kvfetcher-bench kv capture {}", env!("CARGO_PKG_VERSION")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in &info.fields {
        metadata.entry(k.clone()).or_insert_with(|| v.clone());
    }
    write_capture(
        KvFile {
            cache: capture.cache,
            metadata,
        },
        &a.out,
        out,
    )
}

fn write_capture(file: KvFile, path: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    file.write(path)?;
    let dtype = file.cache.dtype();
    writeln!(
        out,
        "wrote {}: {} layers x {} tokens x {} kv heads x {} head_dim, {}, {} bytes of KV",
        path.display(),
        file.cache.num_layers(),
        file.cache.tokens(),
        file.cache.kv_heads(),
        file.cache.head_dim(),
        dtype.safetensors_name(),
        file.cache.nbytes()
    )?;
    Ok(())
}

fn fidelity_cmd(a: &FidelityArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let model = Llama2Model::load(&a.model)?;
    let read = |p: &Path| KvFile::read(p).with_context(|| format!("reading {}", p.display()));
    let original = read(&a.original)?;
    let decoded = read(&a.decoded)?;
    let Some(ids) = original.cache.token_ids() else {
        bail!(
            "{} has no token_ids; fidelity needs them",
            a.original.display()
        );
    };
    if let Some(other) = decoded.cache.token_ids() {
        if other != ids {
            bail!("original and decoded files hold different token ids");
        }
    }
    let f = fidelity(&model, ids, &original.cache, &decoded.cache)?;
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&f)?)?;
    } else {
        writeln!(out, "positions        {}", f.positions)?;
        writeln!(out, "top1_agreement   {:.6}", f.top1_agreement)?;
        writeln!(out, "mean_kl_nats     {:.6e}", f.mean_kl)?;
        writeln!(out, "max_kl_nats      {:.6e}", f.max_kl)?;
        writeln!(out, "max_logit_diff   {:.6e}", f.max_logit_diff)?;
    }
    Ok(())
}

fn info(path: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let f = KvFile::read(path).with_context(|| format!("reading {}", path.display()))?;
    let c = &f.cache;
    writeln!(out, "file       {}", path.display())?;
    writeln!(out, "layers     {}", c.num_layers())?;
    writeln!(out, "tokens     {}", c.tokens())?;
    writeln!(out, "kv_heads   {}", c.kv_heads())?;
    writeln!(out, "head_dim   {}", c.head_dim())?;
    writeln!(out, "dtype      {}", c.dtype().safetensors_name())?;
    writeln!(out, "kv_bytes   {}", c.nbytes())?;
    match c.token_ids() {
        Some(ids) => {
            let head: Vec<String> = ids.iter().take(8).map(u32::to_string).collect();
            let more = if ids.len() > 8 { " ..." } else { "" };
            writeln!(
                out,
                "token_ids  present ({}): {}{more}",
                ids.len(),
                head.join(" ")
            )?;
        }
        None => writeln!(out, "token_ids  absent")?,
    }
    for (k, v) in &f.metadata {
        writeln!(out, "meta       {k} = {v}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use kvfetcher_testkit::data_file;

    fn run_line(line: &[&str]) -> anyhow::Result<String> {
        let cli = crate::cli::Cli::try_parse_from(line)?;
        let crate::cli::Command::Kv(args) = cli.command else {
            bail!("not a kv command");
        };
        let mut out = Vec::new();
        run_to(args, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    #[test]
    fn capture_round_trips_through_kv_file_and_fidelity() {
        let model = data_file("stories260K.bin");
        let dir = tempfile::tempdir().unwrap();
        let kv = dir.path().join("kv.safetensors");
        let (m, o) = (model.to_str().unwrap(), kv.to_str().unwrap());
        let line = [
            "kvfetcher",
            "kv",
            "capture",
            "--model",
            m,
            "--tokens",
            "48",
            "--seed",
            "7",
        ];
        let printed = run_line(&[&line[..], &["--dtype", "bf16", "--out", o]].concat()).unwrap();
        assert!(printed.contains("5 layers x 48 tokens"), "{printed}");

        let file = KvFile::read(&kv).unwrap();
        let direct = Llama2Model::load(&model)
            .unwrap()
            .generate(48, 7, 1.0)
            .unwrap();
        assert_eq!(file.cache.dtype(), DType::BF16);
        assert_eq!(file.cache.token_ids(), Some(&direct.token_ids[..]));
        assert_eq!(file.cache, direct.cache.to_dtype(DType::BF16));
        assert_eq!(file.metadata["seed"], "7");
        assert_eq!(file.metadata["model_sha256"].len(), 64);

        let fid = ["kvfetcher", "kv", "fidelity", "--model", m, "--original", o];
        let json = run_line(&[&fid[..], &["--decoded", o, "--json"]].concat()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["top1_agreement"], 1.0);
        assert_eq!(v["mean_kl"], 0.0);
        assert_eq!(v["positions"], 48);

        let info = run_line(&["kvfetcher", "kv", "info", o]).unwrap();
        assert!(info.contains("token_ids  present (48): 1 "), "{info}");
        assert!(info.contains("dtype      BF16"), "{info}");
    }

    #[test]
    fn info_reads_a_file_without_token_ids() {
        let path = data_file("codelm-kv-a.safetensors");
        let info = run_line(&["kvfetcher", "kv", "info", path.to_str().unwrap()]).unwrap();
        for want in [
            "layers     8",
            "tokens     1024",
            "kv_heads   2",
            "head_dim   128",
            "token_ids  absent",
        ] {
            assert!(info.contains(want), "missing {want:?} in {info}");
        }
    }

    #[test]
    fn fidelity_needs_token_ids_and_bad_model_fails() {
        let (model, codelm) = (
            data_file("stories260K.bin"),
            data_file("codelm-kv-a.safetensors"),
        );
        let (m, c) = (model.to_str().unwrap(), codelm.to_str().unwrap());
        let line = [
            "kvfetcher",
            "kv",
            "fidelity",
            "--model",
            m,
            "--original",
            c,
            "--decoded",
            c,
        ];
        let err = run_line(&line).unwrap_err();
        assert!(err.to_string().contains("no token_ids"), "{err}");
        let bad = [
            "kvfetcher",
            "kv",
            "capture",
            "--model",
            c,
            "--tokens",
            "4",
            "--out",
            "/nonexistent/x",
        ];
        assert!(run_line(&bad).is_err());
    }
}
