#!/usr/bin/env bash
# Prepares what scripts/llama-gpu-check.sh needs on a GPU host that has no network, no Rust
# and maybe no PyYAML, under .carry/llama/ (git-ignored):
#   llama-src.tgz       the llama.cpp sources of the pinned llama-cpp-python sdist, without the
#                       other GPU backends' folders (~4 MB instead of ~40)
#   stories260K.gguf    the GGUF of data/stories260K.bin (scripts/convert-stories-gguf.py)
# The lead carries .carry/kvfetcher (release) and .carry/lib/libkvfetcher.so next to them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.carry/llama"
SRC="$ROOT/build/llama/src/llama_cpp_python-0.3.36/vendor/llama.cpp"
GGUF="$ROOT/build/llama/stories260K.gguf"
mkdir -p "$OUT"

# llama-build.sh unpacks the sdist (and builds the CPU llama.cpp, cached after the first time).
[[ -f "$SRC/CMakeLists.txt" ]] || "$ROOT/scripts/llama-build.sh"
[[ -f "$SRC/CMakeLists.txt" ]] || { echo "llama-gpu-prep: $SRC missing" >&2; exit 1; }
if [[ ! -f "$GGUF" ]]; then
    python3 -c "import numpy, yaml" 2>/dev/null || python3 -m pip install --quiet numpy pyyaml
    python3 "$ROOT/scripts/convert-stories-gguf.py" --model "$ROOT/data/stories260K.bin" --out "$GGUF"
fi
cp "$GGUF" "$OUT/stories260K.gguf"

excl=()
for b in vulkan sycl metal opencl cann webgpu musa hip zdnn zendnn kompute hexagon et openvino virtgpu; do
    excl+=(--exclude "./ggml/src/ggml-$b")
done
have=()
for p in CMakeLists.txt cmake ggml src include common vendor licenses LICENSE; do
    [[ -e "$SRC/$p" ]] && have+=("./$p")
done
tar -C "$SRC" "${excl[@]}" --exclude='*.gguf' -czf "$OUT/llama-src.tgz" "${have[@]}"
du -sh "$OUT"/* | sed 's/^/llama-gpu-prep: /'
total_kb="$(du -sk "$OUT" | cut -f1)"
[[ "$total_kb" -le 12288 ]] || { echo "llama-gpu-prep: .carry/llama is ${total_kb} KB, over 12 MB" >&2; exit 1; }
echo "llama-gpu-prep: ready in $OUT"
