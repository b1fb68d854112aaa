#!/usr/bin/env bash
# The main job on a real model, on embedded defaults (`make demo` builds everything first).
#
# A store and a daemon on loopback (temp dirs, dev certificates); SmolLM2-135M-Instruct in
# llama.cpp (examples/llama's kvf-llama). Engine A reads a document (data/texts/declaration.txt,
# ~2,300 tokens with the chat template) and answers a question: a full prefill, whose KV it
# saves through the daemon. Engine B, a fresh process, asks another question about the same
# document: it fetches the document's KV from the store through the daemon and prefills only
# its question. Printed: both answers, B's time to first token against a full prefill, and the
# bytes on the wire against the raw f16 KV. In exact mode B's answer must equal a full
# prefill's token for token (checked); then the same with the daemon's default 8-bit setting.
#
#   scripts/demo.sh [--model FILE.gguf] [--doc FILE] [--threads N]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GGUF="$ROOT/build/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DOC="$ROOT/data/texts/declaration.txt"
THREADS=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) GGUF="$2"; shift 2 ;;
        --doc) DOC="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
KVF="$ROOT/target/release/kvfetcher"
ENGINE="$ROOT/build/llama/bin/kvf-llama"
for f in "$GGUF" "$DOC" "$KVF" "$ENGINE"; do
    [[ -f "$f" ]] || { echo "demo: $f is missing: run 'make demo'" >&2; exit 1; }
done
# shellcheck source=tests/llama/lib.sh
source "$ROOT/tests/llama/lib.sh"
engine() { "$ENGINE" --model "$GGUF" --threads "$THREADS" "$@" 2>"$TMP/engine.err"; }
metric() {
    python3 -c "import sys,urllib.request
for l in urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read().decode().splitlines():
    if l.startswith(sys.argv[1] + ' '): print(int(float(l.split()[1]))); break
else: print(0)" "$1"
}
unescape() { python3 -c "import sys; print(sys.argv[1].replace('\\\\n', '\n').replace('\\\\\\\\', '\\\\').strip())" "$1"; }

QA="Which grievances against the King does the document list about trial by jury? Answer briefly."
QB="What does the First Amendment protect? Answer in one sentence."
{ cat "$DOC"; printf '\n\nQuestion: %s' "$QA"; } >"$TMP/a.txt"
{ cat "$DOC"; printf '\n\nQuestion: %s' "$QB"; } >"$TMP/b.txt"
ASK=(--chat --gen 96 --stop-eog --text)

# round LABEL BITS: store + daemon with that setting, then engines A, B and B's full prefill.
round() {
    local label="$1" bits="$2" a b ref
    step "$label: store and daemon on loopback ([save] variant = ${SAVE_VARIANT:-zstd}, bits = $bits, 256-token chunks)"
    start_stack "$label" "$bits" 256
    step "$label: engine A prefills the document + question A and saves its KV"
    a="$(engine --prompt-file "$TMP/a.txt" "${ASK[@]}" --socket "$SOCK")" || { cat "$TMP/engine.err"; fail "engine A"; }
    printf '   A: %s prompt tokens, full prefill: TTFT %.0f ms, saved as %s chunks\n' "$(field prompt <<<"$a")" \
        "$(field ttft_ms <<<"$a")" "$(field saved_chunks <<<"$a")"
    echo "   A answers: $(unescape "$(field text <<<"$a")")"
    step "$label: engine B (a fresh process) fetches the document's KV and answers question B"
    b="$(engine --prompt-file "$TMP/b.txt" "${ASK[@]}" --socket "$SOCK" --no-save)" || { cat "$TMP/engine.err"; fail "engine B"; }
    [[ "$(field source <<<"$b")" == fetch ]] || { cat "$TMP/engine.err"; fail "$label: engine B did not fetch"; }
    echo "   B answers: $(unescape "$(field text <<<"$b")")"
    step "$label: engine B's question again, by a full prefill (the reference)"
    ref="$(engine --prompt-file "$TMP/b.txt" "${ASK[@]}" --no-remote)" || { cat "$TMP/engine.err"; fail "reference"; }
    local wire raw
    wire="$(metric kvfetcher_bytes_in_total)"
    raw="$(metric kvfetcher_bytes_restored_total)"
    printf '   B reused %s of %s prompt tokens: TTFT %.0f ms (fetch + load %.0f ms) vs %.0f ms full prefill: %.1fx faster\n' \
        "$(field reused <<<"$b")" "$(field prompt <<<"$b")" "$(field ttft_ms <<<"$b")" "$(field load_ms <<<"$b")" \
        "$(field ttft_ms <<<"$ref")" "$(python3 -c "print($(field ttft_ms <<<"$ref") / $(field ttft_ms <<<"$b"))")"
    printf '   bytes on the wire %s for %s bytes of f16 KV: %.2fx smaller\n' "$wire" "$raw" \
        "$(python3 -c "print($raw / max($wire, 1))")"
    if [[ "$(field gen <<<"$b")" == "$(field gen <<<"$ref")" ]]; then
        echo "   B's answer equals the full prefill's, token for token ($(wc -w <<<"$(field gen <<<"$b")") tokens)"
    elif [[ "$bits" == 16 ]]; then
        echo "   full prefill answers: $(unescape "$(field text <<<"$ref")")"
        fail "exact mode: B's answer differs from a full prefill's"
    else
        echo "   full prefill answers: $(unescape "$(field text <<<"$ref")")"
        echo "   (lossy: B's answer differs from the full prefill's; docs/BENCHMARKS.md has this setting's measured fidelity)"
    fi
    kill "$DAEMON_PID" "$STORE_PID"
    wait "$DAEMON_PID" "$STORE_PID" 2>/dev/null || true
}

echo "demo: model $(basename "$GGUF"), document $(basename "$DOC"), $THREADS CPU threads"
round exact 16
round default-8bit 8
# Transform coding with the committed SmolLM2 profile at the default target (docs/BENCHMARKS.md:
# 5.4x at mean KL <= 0.01); lossy, so B's answer may differ from a full prefill's.
mkdir -p "$TMP/profiles"
cp "$ROOT/data/smollm2-135m-instruct-q4_1.kvfp" "$TMP/profiles/"
SAVE_VARIANT=rans PROFILE_DIR="$TMP/profiles" round transform-rans 8
echo "demo: done in ${SECONDS}s"
