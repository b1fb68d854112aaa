#!/usr/bin/env bash
# tests/llama/bench-ttft.sh: time to first token of kvf-llama on a real model (SmolLM2-135M by
# default), reusing a fetched prefix versus a full local prefill, over links emulated with the
# store's --max-rate (1, 10, 25 Gbit/s) and loopback, bit-exact (16-bit) and 8-bit stores,
# 256-token chunks. Prompts are real text (data/texts, then docs/*.md) cut to each size.
# Prints a markdown table for docs/BENCHMARKS.md. Not part of `make test`.
#
#   tests/llama/bench-ttft.sh [SIZES (default "2048 8000")] [RUNS (default 3)]
# Environment: KVF_BENCH_MODEL (a GGUF), KVF_BENCH_THREADS (engine threads, default 2),
# KVF_GPU=N (engine on GPU N, fetches into GPU memory: needs a CUDA llama.cpp build, see
# scripts/llama-gpu-check.sh), KVF_BENCH_PREBUILT=1 (use the binaries already in build/llama/
# and target/$KVF_PROFILE, for a host without cargo such as the GPU host).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROFILE="${KVF_PROFILE:-release}"
HERE="$ROOT/tests/llama"
SIZES="${1:-2048 8000}"
RUNS="${2:-3}"
THREADS="${KVF_BENCH_THREADS:-2}"
# shellcheck source=tests/llama/lib.sh
source "$HERE/lib.sh"

GGUF="${KVF_BENCH_MODEL:-$ROOT/build/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
KVF="$ROOT/target/$PROFILE/kvfetcher"
ENGINE="$ROOT/build/llama/bin/kvf-llama"
if [[ "${KVF_BENCH_PREBUILT:-0}" != 1 ]]; then
    "$ROOT/scripts/llama-build.sh" >/dev/null
    "$ROOT/scripts/fetch-model.sh" >/dev/null
    flags=(--locked -p kvfetcher -p kvfetcher-c)
    [[ "$PROFILE" == release ]] && flags+=(--release)
    (cd "$ROOT" && cargo build --quiet "${flags[@]}")
    make -s -B -C "$ROOT/examples/llama" KVF_LIB="$ROOT/target/$PROFILE"
fi
engine() { "$ENGINE" --model "$GGUF" --threads "$THREADS" "$@" 2>"$TMP/engine.err"; }
median() { sort -g | awk '{a[NR] = $1} END {m = (NR + 1) / 2; print (NR % 2) ? a[m] : (a[m - 0.5] + a[m + 0.5]) / 2}'; }

cat "$ROOT"/data/texts/* "$ROOT"/docs/*.md >"$TMP/corpus.txt"
echo "model $(basename "$GGUF"), engine threads $THREADS${KVF_GPU:+, GPU $KVF_GPU}, medians of $RUNS runs"
echo
echo "| prompt tokens | link (store --max-rate) | store | reused tokens | TTFT fetch (ms) | of which lookup+fetch+load (ms) | TTFT full prefill (ms) | speed-up |"
echo "|---|---|---|---|---|---|---|---|"
for n in $SIZES; do
    engine --prompt-file "$TMP/corpus.txt" --max-tokens "$n" --print-prompt --no-remote --gen 1 | field prompt_ids >"$TMP/prompt.txt"
    got="$(wc -w <"$TMP/prompt.txt")"
    [[ "$got" == "$n" ]] || fail "the corpus has only $got tokens, fewer than $n"
    prefill="$(for _ in $(seq "$RUNS"); do engine --tokens-file "$TMP/prompt.txt" --gen 1 --no-remote | field ttft_ms; done | median)"
    for link in "loopback:" "25 Gbit/s:3125000000" "10 Gbit/s:1250000000" "1 Gbit/s:125000000"; do
        for bits in 16 8; do
            name="${link%%:*}"
            # One store folder per prompt and setting: the first link's run saves the KV (a full
            # prefill), later links' stores serve the same objects at their own rate.
            start_stack "n$n-b$bits" "$bits" 256 "${link##*:}"
            engine --tokens-file "$TMP/prompt.txt" --gen 1 --socket "$SOCK" >/dev/null
            : >"$TMP/t.txt"
            reused=0
            for _ in $(seq "$RUNS"); do
                out="$(engine --tokens-file "$TMP/prompt.txt" --gen 1 --socket "$SOCK" --no-save)"
                reused="$(field reused <<<"$out")"
                [[ "$(field source <<<"$out")" == fetch ]] || { cat "$TMP/engine.err"; fail "no fetch"; }
                echo "$(field ttft_ms <<<"$out") $(field load_ms <<<"$out")" >>"$TMP/t.txt"
            done
            ttft="$(cut -d' ' -f1 "$TMP/t.txt" | median)"
            load="$(cut -d' ' -f2 "$TMP/t.txt" | median)"
            label="$([[ $bits == 16 ]] && echo "bit-exact (16-bit)" || echo "8-bit zstd")"
            printf '| %s | %s | %s | %s of %s | %.0f | %.0f | %.0f | %.1fx |\n' "$n" "$name" "$label" "$reused" "$n" \
                "$ttft" "$load" "$prefill" "$(python3 -c "print($prefill / $ttft)")"
            kill "$DAEMON_PID" "$STORE_PID"
            wait "$DAEMON_PID" "$STORE_PID" 2>/dev/null || true
        done
    done
done
echo
echo "KV of this model: $(engine --info | awk -F= '/^(n_layer|kv_heads|head_dim)=/ {p = p ? p * $2 : $2} END {print p * 2 * 2}') bytes per token at f16"
