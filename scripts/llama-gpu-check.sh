#!/usr/bin/env bash
# kvf-llama on llama.cpp's CUDA backend, on a GPU host (issue 6, GPU half). One command does it
# all: builds llama.cpp with -DGGML_CUDA=ON from .carry/llama/llama-src.tgz (made by
# scripts/llama-gpu-prep.sh), builds kvf-llama against it and .carry/lib/libkvfetcher.so, starts
# a store and a daemon (.carry/kvfetcher) on loopback, then with every layer and the KV cache on
# GPU $KVF_GPU_ID (default 0):
#   1. --selftest: llama.cpp's state round trip and prefix reuse on the GPU, llama.cpp alone;
#   2. bit-exact store (16-bit, 64-token chunks): a miss that prefills and saves, then hits
#      fetched into GPU memory over CUDA IPC (kvf-llama --kv-gpu): greedy continuations equal
#      those after a full local prefill on the GPU, token for token (several prompts and prefix
#      lengths, mid-chunk included); the logits are also compared, bit for bit, with a local
#      prefill split at the reused length (reported);
#   3. daemon down: prefill with a logged reason, same tokens;
#   4. time to first token, fetch (GPU) vs full prefill (GPU), store at 1 and 10 Gbit/s
#      (store --max-rate), 16-bit and 8-bit stores, 500-token prompt, 256-token chunks.
# Prints one table last (also in $OUT/llama-gpu.txt when OUT is set); exit status 0 when every
# check passes. Re-running reuses the llama.cpp build in $KVF_LLAMA_GPU_DIR (default
# build/llama-gpu, git-ignored), so a run cut short by a time limit resumes where ninja stopped.
#
# KVF_LLAMA_GPU_BUILD_ONLY=1 stops after building kvf-llama (for tests/llama/bench-ttft.sh with
# KVF_GPU, see scripts/llama-gpu-ttft.sh).
# Environment: CARRY (default .carry), KVF_GPU_ID, KVF_LLAMA_GPU_DIR, KVF_TTFT_RUNS (default 5),
# CUDA_HOME (default /usr/local/cuda). KVF_LLAMA_GPU_CHECK_CPU=1 runs the same checks on the CPU
# with the dev machine's builds (build/llama/install, target/$KVF_PROFILE): a test of this
# script itself on a host without a GPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${CARRY:-$ROOT/.carry}"
W="${KVF_LLAMA_GPU_DIR:-$ROOT/build/llama-gpu}"
GPU="${KVF_GPU_ID:-0}"
RUNS="${KVF_TTFT_RUNS:-5}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
RESULTS="${OUT:-$W}/llama-gpu.txt"
export PATH="$CUDA_HOME/bin:$PATH"
CPU_ONLY="${KVF_LLAMA_GPU_CHECK_CPU:-0}"
MEM=gpu
if [[ "$CPU_ONLY" == 1 ]]; then
    MEM=host
    PROFILE="${KVF_PROFILE:-release}"
    CARRY="$(mktemp -d /tmp/kvf-llama-gpu-carry.XXXXXX)"
    mkdir -p "$CARRY/lib" "$CARRY/llama"
    ln -s "$ROOT/target/$PROFILE/kvfetcher" "$CARRY/kvfetcher"
    ln -s "$ROOT/target/$PROFILE/libkvfetcher.so" "$CARRY/lib/libkvfetcher.so"
    ln -s "$ROOT/build/llama/stories260K.gguf" "$CARRY/llama/stories260K.gguf"
    touch "$CARRY/llama/llama-src.tgz"
fi
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:$CUDA_HOME/lib64:$CARRY/lib"
mkdir -p "$W" "$(dirname "$RESULTS")"
: >"$RESULTS"
T0=$SECONDS
say() { echo "== [$((SECONDS - T0))s] $*"; }
status=0
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" >>"$RESULTS"; }

need=("$CARRY/lib/libkvfetcher.so" "$CARRY/llama/llama-src.tgz")
[[ "${KVF_LLAMA_GPU_BUILD_ONLY:-0}" == 1 ]] || need+=("$CARRY/kvfetcher" "$CARRY/llama/stories260K.gguf")
for f in "${need[@]}"; do
    [[ -e "$f" ]] || { echo "llama-gpu-check: $f missing (run scripts/llama-gpu-prep.sh here and carry .carry)" >&2; exit 1; }
done
if [[ "$CPU_ONLY" == 1 ]]; then
    LLAMA_PREFIX="$ROOT/build/llama/install"
else
    nvidia-smi -L | head -4 || { echo "llama-gpu-check: no GPU (nvidia-smi failed)" >&2; exit 1; }
    LLAMA_PREFIX="$W/install"
fi

# 1. llama.cpp with CUDA (libraries only, as scripts/llama-build.sh; one architecture, no flash
#    attention kernels, no NCCL, nvcc's fastest fatbin compression: the smallest build that runs here).
if [[ "$CPU_ONLY" != 1 && ( ! -f "$W/install/lib/libllama.so" || ! -f "$W/install/lib/libggml-cuda.so" ) ]]; then
    if [[ ! -f "$W/src/CMakeLists.txt" ]]; then
        say "unpack llama.cpp"
        rm -rf "$W/src" && mkdir -p "$W/src"
        tar -xzf "$CARRY/llama/llama-src.tgz" -C "$W/src"
    fi
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    say "configure llama.cpp (CUDA, sm_90)"
    cmake -S "$W/src" -B "$W/cmake" "${gen[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX="$W/install" \
        -DCMAKE_INSTALL_LIBDIR=lib \
        -DCMAKE_INSTALL_RPATH='$ORIGIN' \
        -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
        -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DGGML_CPU=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=speed \
        >"$W/cmake.log" 2>&1 || { cp "$W/cmake.log" "$(dirname "$RESULTS")/"; tail -30 "$W/cmake.log"; exit 1; }
    say "build llama.cpp (-j$(nproc))"
    cmake --build "$W/cmake" --target llama -j "$(nproc)" >"$W/build.log" 2>&1 || { cp "$W/build.log" "$(dirname "$RESULTS")/"; tail -40 "$W/build.log"; exit 1; }
    cmake --install "$W/cmake" >/dev/null
fi
say "llama.cpp: $LLAMA_PREFIX/lib"

# 2. kvf-llama against it.
make -s -B -C "$ROOT/examples/llama" engine LLAMA="$LLAMA_PREFIX" KVF_LIB="$CARRY/lib" \
    KVF_INCLUDE="$ROOT/include" OUT="$W/bin"

if [[ "${KVF_LLAMA_GPU_BUILD_ONLY:-0}" == 1 ]]; then
    say "built $W/bin/kvf-llama (KVF_LLAMA_GPU_BUILD_ONLY=1: no checks)"
    exit 0
fi
KVF="$CARRY/kvfetcher"
ENGINE="$W/bin/kvf-llama"
GGUF="$CARRY/llama/stories260K.gguf"
# shellcheck source=tests/llama/lib.sh
source "$ROOT/tests/llama/lib.sh"
# Every engine call below runs on the GPU: all layers and the KV cache there, fetches into it.
[[ "$CPU_ONLY" == 1 ]] || export KVF_GPU="$GPU"

say "prompts"
engine --sample 300 --seed 11 >"$TMP/pA.txt" || { cat "$TMP/engine.err"; exit 1; }
engine --sample 300 --seed 23 >"$TMP/pB.txt"
engine --sample 500 --seed 5 >"$TMP/p500.txt"
first_n "$TMP/pA.txt" 150 >"$TMP/p150.txt"
first_n "$TMP/pA.txt" 187 >"$TMP/p187.txt"
{ first_n "$TMP/pA.txt" 100; awk '{for (i = 101; i <= 170; i++) printf "%s ", $i} END {print ""}' "$TMP/pB.txt"; } | tr '\n' ' ' >"$TMP/pX.txt"

say "selftest on the GPU (llama.cpp alone)"
if out="$(engine --tokens-file "$TMP/p150.txt" --gen 24 --selftest)"; then
    row "selftest (state round trip, prefix reuse)" pass "$(grep -E '^prefix=' <<<"$out" | tr '\n' ' ')"
else
    row "selftest (state round trip, prefix reuse)" FAIL "$(grep -vE '^gen=' <<<"$out" | tr '\n' ' ') $(tail -2 "$TMP/engine.err" | tr '\n' ' ')"
    status=1
fi

# gpu_case LABEL PROMPT WANT_SOURCE: a request through the daemon vs a full local prefill
# (tokens must match) and vs a local prefill split at the reused length (logits reported).
GEN=32
gpu_case() {
    local label="$1" prompt="$2" want="$3" out ref split src reused mem verdict logits
    out="$(engine --tokens-file "$prompt" --gen "$GEN" --socket "$SOCK" --logits-out "$TMP/case.f32")" ||
        { row "$label" FAIL "engine failed: $(tail -2 "$TMP/engine.err" | tr '\n' ' ')"; status=1; return 0; }
    cp "$TMP/engine.err" "$TMP/case.err"
    src="$(field source <<<"$out")"
    reused="$(field reused <<<"$out")"
    mem="$(field fetch_memory <<<"$out")"
    ref="$(engine --tokens-file "$prompt" --gen "$GEN" --no-remote | field gen)"
    logits="n/a"
    if [[ "$reused" -gt 0 ]]; then
        split="$(engine --tokens-file "$prompt" --gen "$GEN" --split "$reused" --logits-out "$TMP/split.f32" | field gen)"
        cmp -s "$TMP/case.f32" "$TMP/split.f32" && logits="bit-identical" || logits="differ"
        [[ "$(field gen <<<"$out")" == "$split" ]] || logits="$logits, tokens differ from split"
    fi
    verdict=pass
    [[ "$src" == "$want" ]] || verdict=FAIL
    [[ "$want" != fetch || "$mem" == "$MEM" ]] || verdict=FAIL
    [[ "$(field gen <<<"$out")" == "$ref" ]] || verdict=FAIL
    [[ "$verdict" == pass ]] || status=1
    row "$label" "$verdict" "source=$src reused=$reused memory=$mem ttft_ms=$(field ttft_ms <<<"$out") tokens=$([[ "$(field gen <<<"$out")" == "$ref" ]] && echo same || echo DIFFER) as full prefill; logits vs split prefill: $logits"
    [[ "$verdict" == pass ]] || sed 's/^/     /' "$TMP/case.err" | tail -5
}

say "bit-exact store (bits 16, 64-token chunks), fetches into gpu:$GPU"
start_stack exact 16 64
gpu_case "150 tokens, cold (prefill + save)" "$TMP/p150.txt" prefill
gpu_case "150 again (mid-chunk 149)" "$TMP/p150.txt" fetch
gpu_case "187 = 150 + 37 (whole chunks, 128)" "$TMP/p187.txt" fetch
gpu_case "187 again (mid-chunk 186)" "$TMP/p187.txt" fetch
gpu_case "shares 100 tokens, then differs (64)" "$TMP/pX.txt" fetch
gpu_case "300 tokens (first 128 stored)" "$TMP/pA.txt" fetch
gpu_case "300 again (mid-chunk 299)" "$TMP/pA.txt" fetch

say "daemon down"
out="$(engine --tokens-file "$TMP/p150.txt" --gen "$GEN" --socket "$TMP/no-such.sock" || true)"
cp "$TMP/engine.err" "$TMP/down.err"
ref="$(engine --tokens-file "$TMP/p150.txt" --gen "$GEN" --no-remote | field gen)"
if [[ "$(field source <<<"$out")" == prefill && "$(field gen <<<"$out")" == "$ref" ]] &&
    grep -q 'daemon unavailable' "$TMP/down.err"; then
    row "daemon down" pass "prefill, same tokens, logged"
else
    row "daemon down" FAIL "$(tail -1 "$TMP/down.err")"
    status=1
fi
kill "$DAEMON_PID" "$STORE_PID"
wait "$DAEMON_PID" "$STORE_PID" 2>/dev/null || true

say "time to first token (500-token prompt, $RUNS runs each)"
median() { sort -g | awk '{a[NR] = $1} END {m = (NR + 1) / 2; print (NR % 2) ? a[m] : (a[m - 0.5] + a[m + 0.5]) / 2}'; }
prefill="$(for _ in $(seq "$RUNS"); do engine --tokens-file "$TMP/p500.txt" --gen 1 --no-remote | field ttft_ms; done | median)"
TTFT="$TMP/ttft.md"
{
    echo "| link (store --max-rate) | store | reused tokens | TTFT fetch to gpu:$GPU (ms) | of which lookup+fetch+copy+load (ms) | TTFT full prefill on gpu:$GPU (ms) |"
    echo "|---|---|---|---|---|---|"
} >"$TTFT"
for link in "1 Gbit/s:125000000" "10 Gbit/s:1250000000"; do
    for bits in 16 8; do
        name="${link%%:*}"
        start_stack "t$bits-${name// /}" "$bits" 256 "${link##*:}"
        engine --tokens-file "$TMP/p500.txt" --gen 1 --socket "$SOCK" >/dev/null
        : >"$TMP/t.txt"
        reused=0
        ok=1
        for _ in $(seq "$RUNS"); do
            out="$(engine --tokens-file "$TMP/p500.txt" --gen 1 --socket "$SOCK" --no-save)" || ok=0
            reused="$(field reused <<<"$out")"
            [[ "$(field source <<<"$out")" == fetch && "$(field fetch_memory <<<"$out")" == "$MEM" ]] || ok=0
            echo "$(field ttft_ms <<<"$out") $(field load_ms <<<"$out")" >>"$TMP/t.txt"
        done
        label="$([[ $bits == 16 ]] && echo "bit-exact (16-bit)" || echo "8-bit zstd")"
        if [[ $ok == 1 ]]; then
            echo "| $name | $label | $reused of 500 | $(cut -d' ' -f1 "$TMP/t.txt" | median) | $(cut -d' ' -f2 "$TMP/t.txt" | median) | $prefill |" >>"$TTFT"
        else
            echo "| $name | $label | FAIL: no GPU fetch ($(tail -1 "$TMP/engine.err")) | | | $prefill |" >>"$TTFT"
            status=1
        fi
        kill "$DAEMON_PID" "$STORE_PID"
        wait "$DAEMON_PID" "$STORE_PID" 2>/dev/null || true
    done
done
{
    echo
    cat "$TTFT"
    echo
    echo "medians of $RUNS runs; stories260K (640 bytes of f16 KV per token), llama.cpp CUDA (sm_90, flash attention off), every layer and the KV cache on gpu:$GPU; fetch = lookup + fetch into GPU memory over CUDA IPC + per-layer device->host copy + llama_state_seq_set_data upload, then decode of the rest"
} >>"$RESULTS"

say "done"
[[ "$CPU_ONLY" == 1 ]] && rm -rf "$CARRY" && echo "CPU-only run (KVF_LLAMA_GPU_CHECK_CPU=1): not a GPU result"
[[ "$CPU_ONLY" == 1 ]] || nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1 | sed 's/^/GPU: /'
echo
echo "| check | result | detail |"
echo "|---|---|---|"
cat "$RESULTS"
echo
echo "llama-gpu-check: $([[ $status == 0 ]] && echo "all checks passed" || echo "SOME CHECKS FAILED") in $((SECONDS - T0)) s"
exit "$status"
