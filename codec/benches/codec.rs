//! Encode and decode throughput of whole chunks on real KV (codelm-kv-a, one 256-token chunk of
//! 8 layers), per variant, at 4 and 8 bits and in exact mode.
//! Run: `cargo bench -p kvfetcher-codec --bench codec`.

#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvfetcher_codec::{
    decode_chunk, encode_cache, CodecRegistry, EncodeConfig, ModelFingerprint, QuantConfig,
    VariantKind,
};
use kvfetcher_kv::KvFile;

fn bench(c: &mut Criterion) {
    let path = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let cache = KvFile::read(&path)
        .expect("reads")
        .cache
        .slice_tokens(0, 256)
        .expect("256 tokens");
    let ids: Vec<u32> = (0..256).collect();
    let reg = CodecRegistry::default();
    let model = ModelFingerprint::of_bytes(b"bench");
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(cache.nbytes() as u64));
    g.sample_size(10);
    for variant in [VariantKind::Packed, VariantKind::Zstd, VariantKind::Hevc] {
        if reg.encoder(variant).is_err() || reg.decoder(variant).is_err() {
            eprintln!("skipped {}: not available", variant.name());
            continue;
        }
        for (name, quant) in [
            ("4bit", QuantConfig::bits(4)),
            ("8bit", QuantConfig::bits(8)),
            ("exact", QuantConfig::Exact),
        ] {
            let cfg = EncodeConfig {
                quant,
                variant,
                ..EncodeConfig::default()
            };
            let id = format!("{}-{name}", variant.name());
            g.bench_function(format!("encode/{id}"), |b| {
                b.iter(|| encode_cache(&cache, &model, &ids, &cfg, &reg).expect("encodes"))
            });
            let obj = encode_cache(&cache, &model, &ids, &cfg, &reg)
                .expect("encodes")
                .remove(0)
                .1;
            eprintln!(
                "{id}: {:.2}x smaller than the original",
                cache.nbytes() as f64 / obj.len() as f64
            );
            g.bench_function(format!("decode/{id}"), |b| {
                b.iter(|| decode_chunk(&obj, &reg).expect("decodes"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
