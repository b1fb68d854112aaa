#!/usr/bin/env bash
# tests/llama/bench-ttft.sh: time to first token of kvf-llama (stories260K, llama.cpp CPU),
# reusing a fetched prefix versus a full local prefill, over links emulated with the store's
# --max-rate (1 and 10 Gbit/s), bit-exact (16-bit) and 8-bit stores, 256-token chunks.
# Prints a markdown table for docs/BENCHMARKS.md. Not part of `make test`.
#
#   tests/llama/bench-ttft.sh [PROMPT_TOKENS (default 500)] [RUNS (default 7)]
#
# Builds like tests/llama/run.sh unless KVF_BENCH_PREBUILT=1, which uses the binaries already in
# build/llama/ and target/$KVF_PROFILE (for a host without cargo, such as the GPU host).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROFILE="${KVF_PROFILE:-release}"
HERE="$ROOT/tests/llama"
N_PROMPT="${1:-500}"
RUNS="${2:-7}"
# shellcheck source=tests/llama/lib.sh
source "$HERE/lib.sh"

GGUF="$ROOT/build/llama/stories260K.gguf"
KVF="$ROOT/target/$PROFILE/kvfetcher"
ENGINE="$ROOT/build/llama/bin/kvf-llama"
if [[ "${KVF_BENCH_PREBUILT:-0}" != 1 ]]; then
    "$ROOT/scripts/llama-build.sh" >/dev/null
    [[ -f "$GGUF" ]] || python3 "$ROOT/scripts/convert-stories-gguf.py" --out "$GGUF" >/dev/null
    flags=(--locked -p kvfetcher -p kvfetcher-c)
    [[ "$PROFILE" == release ]] && flags+=(--release)
    (cd "$ROOT" && cargo build --quiet "${flags[@]}")
    make -s -B -C "$ROOT/examples/llama" KVF_LIB="$ROOT/target/$PROFILE"
fi

median() { sort -g | awk '{a[NR] = $1} END {m = (NR + 1) / 2; print (NR % 2) ? a[m] : (a[m - 0.5] + a[m + 0.5]) / 2}'; }

engine --sample "$N_PROMPT" --seed 5 >"$TMP/prompt.txt"
prefill="$(for _ in $(seq "$RUNS"); do engine --tokens-file "$TMP/prompt.txt" --gen 1 --no-remote | field ttft_ms; done | median)"
prefill_fa="$(for _ in $(seq "$RUNS"); do engine --tokens-file "$TMP/prompt.txt" --gen 1 --no-remote --flash-attn | field ttft_ms; done | median)"

echo "| link (store --max-rate) | store | reused tokens | TTFT fetch (ms) | of which lookup+fetch+load (ms) | TTFT full prefill (ms) | full prefill, --flash-attn (ms) |"
echo "|---|---|---|---|---|---|---|"
for link in "1 Gbit/s:125000000" "10 Gbit/s:1250000000"; do
    for bits in 16 8; do
        name="${link%%:*}"
        start_stack "b$bits-${name// /}" "$bits" 256 "${link##*:}"
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
        echo "| $name | $label | $reused of $N_PROMPT | $ttft | $load | $prefill | $prefill_fa |"
        kill "$DAEMON_PID" "$STORE_PID"
        wait "$DAEMON_PID" "$STORE_PID" 2>/dev/null || true
    done
done
echo
echo "medians of $RUNS runs each, 1 CPU thread, flash attention off unless noted; KV of this model: 640 bytes per token at f16"
