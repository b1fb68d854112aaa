//! Measures zstd level against ratio and speed on real KV (how DEFAULT_ZSTD_LEVEL was chosen).
//! Ignored by default; run: `cargo test --release -p kvfetcher-codec --test zstd_levels -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use kvfetcher_codec::{
    quantize, CodePlane, Grouping, PlaneShape, SectionDecoder, SectionEncoder, ZstdCodec,
};

#[test]
#[ignore = "a measurement, not a check; takes seconds in release"]
fn zstd_level_sweep() {
    let cache = common::codelm(8, 1024);
    for bits in [4u8, 8] {
        // One section per layer, 256-token chunks, as encode_cache builds them.
        let mut planes = Vec::new();
        for chunk in 0..4 {
            for l in cache.layers() {
                let mut codes = Vec::new();
                for t in [&l.key, &l.value] {
                    let part = t.slice_tokens(chunk * 256, (chunk + 1) * 256).unwrap();
                    quantize(
                        &part.to_f32(),
                        256,
                        256,
                        bits,
                        Grouping::PerChannel,
                        &mut codes,
                    )
                    .unwrap();
                }
                planes.push(CodePlane {
                    shape: PlaneShape {
                        bits,
                        tensors: 2,
                        rows: 256,
                        cols: 256,
                    },
                    codes,
                });
            }
        }
        let fp16_bytes = (planes.len() * 2 * 256 * 256 * 2) as f64;
        for level in [1, 3, 6, 9, 12, 15, 19] {
            let codec = ZstdCodec::new(level);
            let t = Instant::now();
            let enc: Vec<_> = planes.iter().map(|p| codec.encode(p).unwrap()).collect();
            let et = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (e, p) in enc.iter().zip(&planes) {
                assert_eq!(&codec.decode(p.shape, &[], &e.payload).unwrap(), p);
            }
            let dt = t.elapsed().as_secs_f64();
            let size: usize = enc.iter().map(|e| e.payload.len()).sum();
            println!(
                "bits {bits} level {level:2}: {:.3}x vs fp16, encode {:.1} MB/s, decode {:.1} MB/s (of fp16)",
                fp16_bytes / size as f64,
                fp16_bytes / et / 1e6,
                fp16_bytes / dt / 1e6
            );
        }
    }
}
