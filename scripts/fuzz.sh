#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/, a cargo-fuzz project outside the workspace) and runs each
# for its share of SECONDS (default 60, split evenly, at least 1 s each), so the total stays
# SECONDS:
#   parse_chunk   the chunk object parser and decoders, from a seed corpus of real chunk objects
#                 encoded from data/codelm-kv-a.safetensors
#   local_frames  the local protocol's hello, framing, messages and fd pairing
#   store_wire    the store wire protocol's request and response decoding
#   layout_math   the byte arithmetic of restored buffers (TargetLayout)
#   codec_profile the codec profile parser (transform coding's per-model profiles)
#   rans_stream   the rANS value stream parser and decoder (codec/src/rans/)
#   hevc_params   the hevc section parameters (lossless KVH1, lossy KVH2) of codec/src/hevc/
# Needs cargo-fuzz; on a stable toolchain it runs with RUSTC_BOOTSTRAP=1 for the sanitizer
# flags. Crashes land in fuzz/artifacts/<target>/; each one found becomes a regression test in
# the owning crate's normal tests.
set -euo pipefail

secs="${1:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$root/data/codelm-kv-a.safetensors"
targets=(parse_chunk local_frames store_wire layout_math codec_profile rans_stream hevc_params)
share=$(( secs / ${#targets[@]} ))
(( share >= 1 )) || share=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1

cd "$root/fuzz"
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
done
if [[ -f "$data" ]]; then
    cargo run --quiet --bin make_seeds -- "corpus/parse_chunk" "$data"
else
    echo "fuzz.sh: $data not found; fuzzing parse_chunk from an empty corpus" >&2
fi
cargo run --quiet --bin make_rans_seeds -- "corpus/rans_stream"
for t in "${targets[@]}"; do
    cargo fuzz build "$t"
done
# rss_limit: decoding a resealed header may legitimately allocate up to the format's limits.
cargo fuzz run parse_chunk corpus/parse_chunk -- \
    -max_total_time="$share" -rss_limit_mb=4096 -max_len=262144
cargo fuzz run local_frames corpus/local_frames -- -max_total_time="$share" -max_len=65536
cargo fuzz run store_wire corpus/store_wire -- -max_total_time="$share" -max_len=65536
cargo fuzz run layout_math corpus/layout_math -- -max_total_time="$share" -max_len=4096
cargo fuzz run codec_profile corpus/codec_profile -- -max_total_time="$share" -max_len=1048576
cargo fuzz run rans_stream corpus/rans_stream -- -max_total_time="$share" -max_len=65536
