#!/usr/bin/env bash
# Time to first token of kvf-llama on llama.cpp's CUDA backend with a real model, on a GPU host
# (no network, no Rust): tests/llama/bench-ttft.sh with every layer and the KV cache on GPU
# $KVF_GPU_ID (default 0) and fetches restored into that GPU's memory over CUDA IPC.
#
#   scripts/llama-gpu-ttft.sh MODEL.gguf [SIZES] [RUNS]
#
# Needs what scripts/llama-gpu-check.sh needs in .carry/ (llama-src.tgz, lib/libkvfetcher.so,
# kvfetcher); builds llama.cpp with CUDA there (resumable) and kvf-llama against it, puts them
# where bench-ttft.sh looks (build/llama/bin, target/release), and runs it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${CARRY:-$ROOT/.carry}"
W="${KVF_LLAMA_GPU_DIR:-$ROOT/build/llama-gpu}"
MODEL="${1:?usage: scripts/llama-gpu-ttft.sh MODEL.gguf [SIZES] [RUNS]}"
[[ -f "$MODEL" ]] || { echo "llama-gpu-ttft: $MODEL missing" >&2; exit 1; }
[[ -x "$CARRY/kvfetcher" ]] || { echo "llama-gpu-ttft: $CARRY/kvfetcher missing" >&2; exit 1; }
KVF_LLAMA_GPU_BUILD_ONLY=1 "$ROOT/scripts/llama-gpu-check.sh"
mkdir -p "$ROOT/build/llama/bin" "$ROOT/target/release"
cp "$W/bin/kvf-llama" "$ROOT/build/llama/bin/kvf-llama"
cp "$CARRY/kvfetcher" "$ROOT/target/release/kvfetcher"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:${CUDA_HOME:-/usr/local/cuda}/lib64:$CARRY/lib"
KVF_GPU="${KVF_GPU_ID:-0}" KVF_BENCH_PREBUILT=1 KVF_BENCH_MODEL="$MODEL" \
    "$ROOT/tests/llama/bench-ttft.sh" "${2:-2048 8000}" "${3:-3}"
