// Included by make_seeds and parse_chunk: the codec profile the transform-coded seeds use, built
// the same way in both (identity bases, K with RoPE undone), so resealed mutations of those seeds
// reach the transform restore step.

/// The seeds' profile: 2 layers x 2 KV heads x 128 dims (codelm's shape), 4 sinks.
fn seed_profile() -> kvfetcher_codec::CodecProfile {
    use kvfetcher_codec::{
        CodecProfile, HeadBasis, LayerProfile, ModelFingerprint, Rope, RopeStyle, TensorProfile,
    };
    let d = 128;
    let tensor = || TensorProfile {
        heads: (0..2)
            .map(|_| HeadBasis::identity(vec![0.0; d], vec![1.0; d]))
            .collect(),
        sensitivity: 1.0,
        curve: Vec::new(),
    };
    CodecProfile {
        model: ModelFingerprint::of_bytes(b"seed"),
        kv_heads: 2,
        head_dim: d,
        sinks: 4,
        rope: Rope {
            style: RopeStyle::Halves,
            dims: d as u16,
            base: 10000.0,
            freq_scale: 1.0,
        },
        layers: (0..2)
            .map(|_| LayerProfile {
                key: tensor(),
                value: tensor(),
            })
            .collect(),
    }
}
