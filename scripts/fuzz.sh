#!/usr/bin/env bash
# Builds the `parse_chunk` fuzz target (fuzz/, a cargo-fuzz project outside the workspace) and
# runs it for SECONDS (default 60) from a seed corpus of real chunk objects encoded from
# shared/data/codelm-kv-a.safetensors. Needs cargo-fuzz; on a stable toolchain it runs with
# RUSTC_BOOTSTRAP=1 for the sanitizer flags. Crashes land in fuzz/artifacts/parse_chunk/.
set -euo pipefail

secs="${1:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
corpus="$root/fuzz/corpus/parse_chunk"
data="$root/../shared/data/codelm-kv-a.safetensors"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1

cd "$root/fuzz"
mkdir -p "$corpus"
if [[ -f "$data" ]]; then
    cargo run --quiet --bin make_seeds -- "$corpus" "$data"
else
    echo "fuzz.sh: $data not found; fuzzing from an empty corpus" >&2
fi
cargo fuzz build parse_chunk
# rss_limit: decoding a resealed header may legitimately allocate up to the format's limits.
cargo fuzz run parse_chunk "$corpus" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=262144
