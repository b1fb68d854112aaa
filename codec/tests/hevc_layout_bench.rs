//! Layout measurement for docs/LAYOUT.md (ignored by default; run with
//! `cargo test --release -p kvfetcher-codec --test hevc_layout_bench -- --ignored --nocapture`).
//!
//! codelm-kv-a, 4 chunks of 256 tokens, one section per chunk of all 8 layers x {K, V}, quantized
//! per channel; prints payload bytes against bit-packed codes, and encode / decode speed.

mod hevc_common;

use std::time::Instant;

use hevc_common::{codelm, decoder, encoder, quantized};
use kvfetcher_codec::{CodePlane, SectionDecoder, SectionEncoder};

fn measure(name: &str, enc: &kvfetcher_codec::HevcEncoder, planes: &[CodePlane]) {
    let Some(dec) = decoder() else { return };
    let (mut bytes, mut packed, mut codes) = (0, 0, 0);
    let (mut te, mut td) = (0.0, 0.0);
    for p in planes {
        let t = Instant::now();
        let s = enc.encode(p).expect("encodes");
        te += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let back = dec.decode(p.shape, &s.params, &s.payload).expect("decodes");
        td += t.elapsed().as_secs_f64();
        assert!(back == *p);
        bytes += s.payload.len() + s.params.len();
        packed += p.shape.packed_bytes();
        codes += p.shape.len();
    }
    let mb = codes as f64 * 2.0 / 1e6; // fp16 KV the codes stand for
    println!(
        "{name:<28} bits {:>2}: {bytes:>8} B, packed {packed:>8} B, {:.3}x smaller than packed, \
         {:.2} bits/code; encode {:.1} MB/s, decode {:.1} MB/s (fp16-equivalent)",
        planes[0].shape.bits,
        packed as f64 / bytes as f64,
        bytes as f64 * 8.0 / codes as f64,
        mb / te,
        mb / td,
    );
}

#[test]
#[ignore = "measurement, not a test: run by hand for docs/LAYOUT.md"]
fn layouts_on_codelm() {
    let cache = codelm();
    let only = std::env::var("HEVC_BENCH").ok();
    let widths: Vec<u8> = match std::env::var("HEVC_BITS") {
        Ok(b) => b.split(',').filter_map(|b| b.parse().ok()).collect(),
        Err(_) => vec![4, 8],
    };
    for bits in widths {
        // Quantized per chunk (min/max over its 256 tokens), or over the whole sequence.
        let whole = std::env::var("HEVC_QUANT").is_ok_and(|q| q == "sequence");
        let all = quantized(&cache, 0..8, 0..1024, bits);
        let planes: Vec<CodePlane> = (0..4)
            .map(|c| {
                if whole {
                    let n = 256 * all.shape.cols;
                    let codes = (0..all.shape.tensors)
                        .flat_map(|t| all.tensor(t)[c * n..(c + 1) * n].to_vec())
                        .collect();
                    let shape = kvfetcher_codec::PlaneShape {
                        rows: 256,
                        ..all.shape
                    };
                    CodePlane { shape, codes }
                } else {
                    quantized(&cache, 0..8, c * 256..(c + 1) * 256, bits)
                }
            })
            .collect();
        let mut runs: Vec<(String, kvfetcher_codec::HevcEncoder)> = Vec::new();
        for layout in ["rows", "rows420", "frames", "frames420", "frames:64"] {
            let Some(e) = encoder(layout) else { return };
            runs.push((layout.to_string(), e));
        }
        for preset in ["medium", "slow"] {
            runs.push((
                format!("rows {preset}"),
                encoder("rows").unwrap().with_preset(preset),
            ));
        }
        runs.push((
            "rows all-intra".into(),
            encoder("rows").unwrap().with_option("keyint", "1"),
        ));
        for (k, v) in [
            ("ctu", "32"),
            ("ctu", "16"),
            ("rect", "1"),
            ("tu-intra-depth", "3"),
        ] {
            runs.push((
                format!("rows {k}={v}"),
                encoder("rows").unwrap().with_option(k, v),
            ));
        }
        runs.push((
            "frames medium".into(),
            encoder("frames").unwrap().with_preset("medium"),
        ));
        for per in [1, 2] {
            for layout in ["frames", "rows"] {
                runs.push((
                    format!("{layout}, {per}-frame streams"),
                    encoder(layout).unwrap().with_stream_frames(Some(per)),
                ));
            }
        }
        // Extra presets for the tokens-along-frames layouts, e.g. HEVC_PRESETS=fast,veryfast.
        for preset in std::env::var("HEVC_PRESETS").unwrap_or_default().split(',') {
            for layout in ["frames", "frames420", "frames:12"] {
                if !preset.is_empty() {
                    let e = encoder(layout).unwrap().with_preset(preset);
                    runs.push((format!("{layout} {preset}"), e));
                }
            }
        }
        for (name, e) in &runs {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            measure(name, e, &planes);
        }
    }
}
