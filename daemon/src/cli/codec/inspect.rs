//! `kvfetcher inspect`: what one chunk object holds (header, sections, sizes, ratios), with its
//! checksums verified; `--extract-streams` writes each HEVC section's raw Annex-B bitstream(s)
//! as `.hevc` files that ffprobe, ffmpeg or any HEVC decoder read.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use kvfetcher_codec::{extract_streams, ChunkView, Grouping, HevcParams, VariantKind};

/// Arguments of `kvfetcher inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The chunk object file.
    pub file: PathBuf,
    /// Write each HEVC section's bitstream(s) here as `<key>.s<section>[.<stream>].hevc`.
    #[arg(long)]
    pub extract_streams: Option<PathBuf>,
}

fn grouping_name(g: Grouping) -> &'static str {
    match g {
        Grouping::PerChannel => "per channel",
        Grouping::PerToken => "per token",
    }
}

/// Runs `kvfetcher inspect`, printing to stdout.
pub(crate) fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("read {}", args.file.display()))?;
    let view = ChunkView::parse(&bytes)
        .with_context(|| format!("{}: not a valid chunk object", args.file.display()))?;
    let mut out = std::io::stdout().lock();
    describe(&view, &mut out)?;
    view.verify()
        .with_context(|| format!("{}", args.file.display()))?;
    writeln!(
        out,
        "checksums   header and every section verified (crc32c)"
    )?;
    if let Some(dir) = &args.extract_streams {
        extract(&view, dir, &mut out)?;
    }
    Ok(())
}

/// Prints the header and the section table.
fn describe(view: &ChunkView<'_>, out: &mut dyn Write) -> anyhow::Result<()> {
    let h = view.header();
    let raw16 = u64::from(h.token_count) * u64::from(h.num_layers) * 2 * h.channels() as u64 * 2;
    let packed: u64 = h
        .sections
        .iter()
        .map(|s| s.shape.packed_bytes() as u64)
        .sum();
    let total = view.bytes().len() as u64;
    writeln!(out, "key         {}", h.key)?;
    writeln!(out, "model       {}", h.model)?;
    writeln!(
        out,
        "tokens      {}..{} ({})",
        h.token_start,
        u64::from(h.token_start) + u64::from(h.token_count),
        h.token_count
    )?;
    writeln!(
        out,
        "shape       {} layers x {} kv heads x {} head_dim, {}",
        h.num_layers,
        h.kv_heads,
        h.head_dim,
        h.dtype.safetensors_name()
    )?;
    writeln!(out, "variant     {}", h.variant.name())?;
    if h.exact {
        writeln!(
            out,
            "mode        exact ({} byte planes per value)",
            h.planes()
        )?;
    } else if let Some(t) = &h.transform {
        writeln!(out, "mode        transform-coded (format version 2)")?;
        writeln!(out, "profile     {}", t.profile)?;
        writeln!(
            out,
            "sinks       {} exact token(s) in this chunk",
            t.sink_tokens
        )?;
        writeln!(out, "steps       layer: K step, V step (the allocation)")?;
        for (l, (k, v)) in t.steps.iter().enumerate() {
            writeln!(out, "  {l:>5}: {k:.4e} {v:.4e}")?;
        }
    } else {
        writeln!(
            out,
            "mode        quantized, K {}, V {}",
            grouping_name(h.key_grouping),
            grouping_name(h.value_grouping)
        )?;
    }
    writeln!(out, "header      {} bytes", view.header_len())?;
    writeln!(out, "object      {total} bytes")?;
    writeln!(
        out,
        "ratio       {:.3}x vs the 16-bit KV ({raw16} bytes), {:.3}x vs bit-packed codes ({packed} bytes)",
        raw16 as f64 / total as f64,
        packed as f64 / total as f64
    )?;
    writeln!(out, "sections    {}", h.sections.len())?;
    writeln!(
        out,
        "  {:>3} {:>9} {:>4} {:>10} {:>10} {:>9} {:>8}  hevc",
        "#", "layers", "bits", "offset", "bytes", "vs packed", "crc32c"
    )?;
    for (i, s) in h.sections.iter().enumerate() {
        let hevc = if h.variant == VariantKind::Hevc {
            match HevcParams::from_bytes(&s.params) {
                Ok(p) => {
                    let g = p.geometry;
                    let mode = if p.is_lossy() {
                        format!("lossy qp {}", p.qp)
                    } else {
                        "lossless".into()
                    };
                    format!(
                        "{} {}x{} {}-bit, {} frames, {} stream(s), {mode}",
                        g.spec(),
                        g.width,
                        g.height,
                        g.bit_depth,
                        g.frames,
                        p.streams.len()
                    )
                }
                Err(e) => format!("bad params: {e}"),
            }
        } else {
            String::new()
        };
        writeln!(
            out,
            "  {:>3} {:>9} {:>4} {:>10} {:>10} {:>8.3}x {:08x}  {hevc}",
            i,
            format!("{}..{}", s.layer_start, s.layer_end),
            s.shape.bits,
            s.offset,
            s.len,
            s.shape.packed_bytes() as f64 / s.len.max(1) as f64,
            s.crc32c
        )?;
    }
    Ok(())
}

/// Writes every HEVC bitstream of the object under `dir`.
fn extract(view: &ChunkView<'_>, dir: &std::path::Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let h = view.header();
    if h.variant != VariantKind::Hevc {
        bail!(
            "the chunk's variant is {}: it holds no HEVC streams",
            h.variant.name()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for (i, s) in h.sections.iter().enumerate() {
        let streams = extract_streams(&s.params, view.section_bytes(i))
            .with_context(|| format!("section {i}"))?;
        let many = streams.len() > 1;
        for (j, stream) in streams.iter().enumerate() {
            let name = if many {
                format!("{}.s{i}.{j}.hevc", h.key)
            } else {
                format!("{}.s{i}.hevc", h.key)
            };
            let path = dir.join(name);
            std::fs::write(&path, stream).with_context(|| format!("write {}", path.display()))?;
            writeln!(
                out,
                "wrote       {} ({} bytes)",
                path.display(),
                stream.len()
            )?;
        }
    }
    Ok(())
}
