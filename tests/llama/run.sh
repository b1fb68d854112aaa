#!/usr/bin/env bash
# tests/llama/run.sh: the llama.cpp engine (examples/llama, kvf-llama) against llama.cpp alone,
# the numpy llama2.c reference, and a real store + daemon on loopback, with the real pretrained
# model SmolLM2-135M-Instruct (scripts/fetch-model.sh) wherever a model is not the point.
#
#   1. kv_state unit test (no llama.cpp); every C program here runs under AddressSanitizer/UBSan;
#   2. the toy, where a toy is the point: llama.cpp reproduces the llama2.c forward pass
#      (scripts/llama2_reference.py) on stories260K: K/V in the cache, logits and greedy tokens;
#      its K/V equal those of the Rust forward pass (kv/src/llama2.rs via `kvfetcher kv
#      capture`); a checkpoint converted with the (wrong) HF Q/K permutation must fail the
#      reference check (the check can fail);
#   3. SmolLM2, prompts tokenized from real text (prose and code): `kvfetcher-bench kv capture --gguf`
#      writes the engine's own ids and KV with the model's shapes; --selftest (KV <-> llama.cpp
#      state round trip and prefix reuse, flash attention off/on);
#   4. bit-exact store (bits = 16, 64-token chunks): greedy continuations after a fetched prefix
#      equal those after a full local prefill, token for token, for several prompts and prefix
#      lengths, including prefixes that end mid-chunk; and equal, logits bit for bit, a local
#      prefill split at the same point;
#   5. model identity: a renamed copy of the GGUF reuses the stored KV; a file of the same name
#      with one changed weight does not;
#   6. cross-engine (toy): KV of the Rust llama2.c forward pass, stored bit-exact, is reused by
#      llama.cpp (token agreement and logit difference reported);
#   7. fallbacks: daemon down, prefix absent, store down: prefill with a logged reason, same
#      tokens;
#   8. the daemon's default lossy setting (8-bit zstd): continuations from a fetched prefix
#      (agreement reported), and `kvfetcher-bench fidelity` through llama.cpp on a fixed text
#      within the bound measured for it (mean KL, top-1), with 4 bits outside it (the check can
#      fail).
#
# Needs: cmake, a C/C++ compiler, python3 with numpy and PyYAML, cargo. Builds llama.cpp once
# (scripts/llama-build.sh, cached in build/llama/) and fetches the model once
# (scripts/fetch-model.sh). KVF_PROFILE=debug uses debug Rust builds (default release).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="$ROOT/data/stories260K.bin"
SMOL="$ROOT/build/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROFILE="${KVF_PROFILE:-release}"
HERE="$ROOT/tests/llama"
# shellcheck source=tests/llama/lib.sh
source "$HERE/lib.sh"

if [[ ! -f "$DATA" ]]; then
    [[ "${CI:-}" == true || "${KVF_REQUIRE_GPU:-}" == 1 ]] && fail "$DATA is absent (shared data beside the repository)"
    echo "skipped: $DATA is absent"
    exit 0
fi
"$ROOT/scripts/fetch-model.sh" >/dev/null

step "build llama.cpp, the GGUF model, kvfetcher, libkvfetcher and kvf-llama"
# The converter and the checks need numpy and PyYAML (gguf-py imports yaml).
python3 -c "import numpy, yaml" 2>/dev/null || python3 -m pip install --quiet numpy pyyaml
"$ROOT/scripts/llama-build.sh"
GGUF="$ROOT/build/llama/stories260K.gguf"
if [[ ! -f "$GGUF" || "$GGUF" -ot "$ROOT/scripts/convert-stories-gguf.py" || "$GGUF" -ot "$DATA" ]]; then
    python3 "$ROOT/scripts/convert-stories-gguf.py" --model "$DATA" --out "$GGUF"
fi
cargo_flags=(--locked --workspace --lib --bins --tests)
[[ "$PROFILE" == release ]] && cargo_flags+=(--release)
(cd "$ROOT" && cargo build --quiet "${cargo_flags[@]}")
make -s -B -C "$ROOT/examples/llama" KVF_LIB="$ROOT/target/$PROFILE"
KVF="$ROOT/target/$PROFILE/kvfetcher"
KVF_BENCH="$ROOT/target/$PROFILE/kvfetcher-bench"
# Every engine call runs the AddressSanitizer/UBSan build (timings here are not benchmarks).
ENGINE="$ROOT/build/llama/bin/kvf-llama-asan"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"

step "kv_state unit test (ASan/UBSan)"
"$ROOT/build/llama/bin/test-kv-state"

step "toy prompts: token ids sampled from stories260K at fixed seeds"
engine --sample 60 --seed 11 >"$TMP/s60.txt"

step "llama.cpp vs the numpy llama2.c reference (f32 cache)"
out="$(engine --tokens-file "$TMP/s60.txt" --gen 16 --no-remote --kv-f32 --kv-out "$TMP/kv.st" --logits-out "$TMP/lg.f32")"
python3 "$HERE/check_reference.py" "$DATA" "$TMP/s60.txt" "$TMP/kv.st" "$TMP/lg.f32" "$(field gen <<<"$out")" \
    --tol-kv 1e-4 --tol-logit 1e-3 || fail "llama.cpp does not reproduce the llama2.c forward pass"
out="$(engine --tokens-file "$TMP/s60.txt" --gen 16 --no-remote --kv-out "$TMP/kv16.st" --logits-out "$TMP/lg16.f32")"
python3 "$HERE/check_reference.py" "$DATA" "$TMP/s60.txt" "$TMP/kv16.st" "$TMP/lg16.f32" "$(field gen <<<"$out")" \
    --tol-kv 1e-2 --tol-logit 1e-1 || fail "f16 cache: llama.cpp drifts from the reference"
step "llama.cpp vs the Rust llama2.c forward pass (kvfetcher-bench kv capture): same K/V"
"$KVF_BENCH" kv capture --model "$DATA" --tokens 120 --seed 7 --dtype f32 --out "$TMP/rust.st" >/dev/null 2>"$TMP/kvf.err"
python3 "$HERE/check_rust_kv.py" tokens "$TMP/rust.st" >"$TMP/prust.txt"
engine --tokens-file "$TMP/prust.txt" --gen 1 --no-remote --kv-f32 --kv-out "$TMP/llama.st" >/dev/null
python3 "$HERE/check_rust_kv.py" compare "$TMP/rust.st" "$TMP/llama.st" --tol 1e-4 ||
    fail "llama.cpp's KV differs from kv/src/llama2.rs's"
step "negative control: the HF Q/K permutation must fail the reference check"
python3 "$ROOT/scripts/convert-stories-gguf.py" --model "$DATA" --out "$TMP/permuted.gguf" --permute-qk >/dev/null
out="$("$ENGINE" --model "$TMP/permuted.gguf" --tokens-file "$TMP/s60.txt" --gen 16 --no-remote --kv-f32 \
    --kv-out "$TMP/kvp.st" --logits-out "$TMP/lgp.f32" 2>/dev/null)"
if python3 "$HERE/check_reference.py" "$DATA" "$TMP/s60.txt" "$TMP/kvp.st" "$TMP/lgp.f32" "$(field gen <<<"$out")"; then
    fail "a Q/K-permuted conversion passed the reference check"
fi

STORIES="$GGUF"
GGUF="$SMOL"
step "SmolLM2 prompts: real text (prose and code) tokenized by the model"
prompt_ids() { engine --prompt-file "$1" --max-tokens "$2" --print-prompt --no-remote --gen 1 | field prompt_ids; }
prompt_ids "$ROOT/data/texts/declaration.txt" 300 >"$TMP/pA.txt"
prompt_ids "$ROOT/data/texts/code-quant.rs.txt" 300 >"$TMP/pB.txt"
[[ "$(wc -w <"$TMP/pA.txt")" == 300 && "$(wc -w <"$TMP/pB.txt")" == 300 ]] || fail "tokenizing the texts"
first_n "$TMP/pA.txt" 60 >"$TMP/p60.txt"
first_n "$TMP/pA.txt" 150 >"$TMP/p150.txt"
first_n "$TMP/pA.txt" 187 >"$TMP/p187.txt"
# Shares pA's first 100 tokens, then pB's.
{ first_n "$TMP/pA.txt" 100; awk '{for (i = 101; i <= 170; i++) printf "%s ", $i} END {print ""}' "$TMP/pB.txt"; } | tr '\n' ' ' >"$TMP/pX.txt"
first_n "$TMP/pB.txt" 256 >"$TMP/p256.txt"
first_n "$TMP/pB.txt" 200 >"$TMP/pC.txt"

step "kvfetcher-bench kv capture --gguf: the engine's own KV with the model's shapes and metadata"
"$KVF_BENCH" kv capture --gguf "$SMOL" --engine "$ROOT/build/llama/bin/kvf-llama" --text "$ROOT/data/texts/declaration.txt" \
    --tokens 300 --out "$TMP/capture.st" >/dev/null 2>"$TMP/kvf.err" || { cat "$TMP/kvf.err"; fail "kv capture --gguf"; }
# The same tokens and, bit for bit, the KV the engine itself writes for that prompt.
engine --tokens-file "$TMP/pA.txt" --gen 1 --no-remote --kv-out "$TMP/engine-kv.st" >/dev/null
python3 - "$TMP/capture.st" "$TMP/engine-kv.st" "$TMP/pA.txt" <<'PY' || fail "kv capture --gguf: wrong file"
import json, struct, sys
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]
(h, data), (e, edata) = load(sys.argv[1]), load(sys.argv[2])
meta = h["__metadata__"]
ids = [int(t) for t in open(sys.argv[3]).read().split()]
m = h["token_ids"]
got = list(struct.unpack("<%d%s" % (len(ids), {"U32": "I", "I32": "i"}[m["dtype"]]), data[m["data_offsets"][0]:m["data_offsets"][1]]))
assert got == ids, "token ids differ from the engine's tokenization"
assert meta["source"] == "llama.cpp" and meta["model_id"].startswith("sha256:"), meta
assert (meta["n_layer"], meta["kv_heads"], meta["head_dim"]) == ("30", "3", "64"), meta
assert meta["meta.general.architecture"] == "llama", meta
for l in range(30):
    for kind in ("key", "value"):
        t, u = h[f"layers.{l}.{kind}"], e[f"layers.{l}.{kind}"]
        assert t["shape"] == [300, 3, 64] and t["dtype"] == "F16", t
        a, b = t["data_offsets"], u["data_offsets"]
        assert data[a[0]:a[1]] == edata[b[0]:b[1]], f"layer {l} {kind} differs"
print("   30 layers x 300 tokens x 3 x 64, f16, ids and KV equal the engine's own, model", meta["model_id"][:23] + "...")
PY

step "selftest (SmolLM2): state round trip and prefix reuse in llama.cpp alone"
for fa in "" --flash-attn; do
    out="$(engine --tokens-file "$TMP/p150.txt" --gen 24 --selftest $fa)" || { echo "$out"; cat "$TMP/engine.err"; fail "selftest $fa"; }
    grep -E "^(roundtrip|prefix)" <<<"$out" | sed "s/^/   ${fa:---no-flash-attn} /"
done

# expect_case LABEL PROMPT WANT_SOURCE WANT_REUSED [ENGINE ARGS]: a request through the daemon
# must give the same tokens as a full local prefill, and the same tokens and logits (bit for bit)
# as a local prefill split at the reused length. ENGINE ARGS go to all three runs.
GEN=32
expect_case() {
    local label="$1" prompt="$2" want_source="$3" want_reused="$4" out ref split src reused
    shift 4
    out="$(engine --tokens-file "$prompt" --gen "$GEN" --socket "$SOCK" --logits-out "$TMP/case.f32" "$@")" ||
        { cat "$TMP/engine.err"; fail "$label: engine failed"; }
    cp "$TMP/engine.err" "$TMP/case.err"
    src="$(field source <<<"$out")"
    reused="$(field reused <<<"$out")"
    ref="$(engine --tokens-file "$prompt" --gen "$GEN" --no-remote "$@" | field gen)"
    split="$(engine --tokens-file "$prompt" --gen "$GEN" --split "$reused" --logits-out "$TMP/split.f32" "$@" | field gen)"
    printf '   %-34s source=%-7s reused=%-4s ttft_ms=%s\n' "$label" "$src" "$reused" "$(field ttft_ms <<<"$out")"
    [[ "$src" == "$want_source" ]] || { cat "$TMP/case.err"; fail "$label: source $src, want $want_source"; }
    [[ "$want_reused" == "*" || "$reused" == "$want_reused" ]] || fail "$label: reused $reused, want $want_reused"
    [[ "$(field gen <<<"$out")" == "$ref" ]] || fail "$label: continuation differs from a full local prefill"
    [[ "$(field gen <<<"$out")" == "$split" ]] || fail "$label: continuation differs from a split local prefill"
    cmp -s "$TMP/case.f32" "$TMP/split.f32" || fail "$label: logits differ from a split local prefill"
}

step "bit-exact store (bits 16, 64-token chunks): fetched prefix vs local prefill, $GEN tokens"
start_stack exact 16 64
expect_case "150 tokens, cold (save)" "$TMP/p150.txt" prefill 0
grep -q "prefix not in the store" "$TMP/case.err" || fail "cold request did not log its reason"
expect_case "150 tokens again (mid-chunk 150)" "$TMP/p150.txt" fetch 149
expect_case "187 = 150 + 37 (whole chunks)" "$TMP/p187.txt" fetch 128
expect_case "187 again (mid-chunk 187)" "$TMP/p187.txt" fetch 186
expect_case "shares 100 tokens, then differs" "$TMP/pX.txt" fetch 64
expect_case "300 tokens (first 128 stored)" "$TMP/pA.txt" fetch 128
expect_case "300 tokens again (mid-chunk 300)" "$TMP/pA.txt" fetch 299
# V in rows in llama.cpp's state (flash attention on): the other orientation of the mapping.
# llama.cpp's CPU flash attention is not batch-invariant (a prefill split at P differs from a
# full prefill, llama.cpp alone; the selftest above holds the mapping to the invariant that does
# hold), so here the fetch must happen and its continuation is reported against a full prefill.
# Its KV differs from the default engine's, so it saves and reuses its own prompt.
expect_case "200, flash attention on, cold" "$TMP/pC.txt" prefill 0 --flash-attn
out="$(engine --tokens-file "$TMP/pC.txt" --gen "$GEN" --socket "$SOCK" --flash-attn --logits-out "$TMP/fa.f32")"
[[ "$(field source <<<"$out")" == fetch && "$(field reused <<<"$out")" == 199 ]] ||
    { cat "$TMP/engine.err"; fail "flash attention: the stored prompt was not reused"; }
ref="$(engine --tokens-file "$TMP/pC.txt" --gen "$GEN" --no-remote --flash-attn --logits-out "$TMP/faref.f32")"
echo "   200 again, flash attention on: reused 199, against a full prefill: $(python3 "$HERE/compare_runs.py" \
    "$(field gen <<<"$out")" "$TMP/fa.f32" "$(field gen <<<"$ref")" "$TMP/faref.f32" 49152)"
expect_case "60 tokens (no whole chunk)" "$TMP/p60.txt" prefill 0 --no-save

step "model identity: a renamed copy shares the stored KV, a changed file of the same name does not"
cp "$SMOL" "$TMP/renamed-copy.gguf"
out="$("$ENGINE" --model "$TMP/renamed-copy.gguf" --tokens-file "$TMP/p150.txt" --gen 4 --socket "$SOCK" --no-save 2>"$TMP/engine.err")"
[[ "$(field source <<<"$out")" == fetch ]] || { cat "$TMP/engine.err"; fail "a renamed copy of the model did not reuse its KV"; }
mkdir -p "$TMP/other"
cp "$SMOL" "$TMP/other/$(basename "$SMOL")"
# One byte of the last tensor's data changed: same name, same shapes, another model.
python3 -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(-1,2); b=f.read(1); f.seek(-1,2); f.write(bytes([b[0]^1]))" \
    "$TMP/other/$(basename "$SMOL")"
out="$("$ENGINE" --model "$TMP/other/$(basename "$SMOL")" --tokens-file "$TMP/p150.txt" --gen 4 --socket "$SOCK" --no-save 2>"$TMP/engine.err")"
[[ "$(field source <<<"$out")" == prefill ]] || fail "a different model of the same file name reused another model's KV"
grep -q "prefix not in the store" "$TMP/engine.err" || { cat "$TMP/engine.err"; fail "changed model: no logged reason"; }
rm -rf "$TMP/renamed-copy.gguf" "$TMP/other"
echo "   renamed copy: fetch; same name, one weight changed: prefill (prefix not in the store)"

step "cross-engine (toy): KV computed by the Rust forward pass, stored bit-exact, used by llama.cpp"
GGUF="$STORIES"
"$KVF_BENCH" kv capture --model "$DATA" --tokens 200 --seed 9 --out "$TMP/rust200.st" >/dev/null 2>"$TMP/kvf.err"
python3 "$HERE/check_rust_kv.py" tokens "$TMP/rust200.st" >"$TMP/prust200.txt"
"$KVF" encode --input "$TMP/rust200.st" --out "$TMP/rust-chunks" --exact --chunk-tokens 64 \
    --model-id "rust-llama2c" >/dev/null 2>>"$TMP/kvf.err"
"$KVF" put --store "127.0.0.1:$STORE_PORT" --ca "$TMP/certs" --server-name localhost "$TMP"/rust-chunks/* >/dev/null
out="$(engine --tokens-file "$TMP/prust200.txt" --gen "$GEN" --socket "$SOCK" --model-id rust-llama2c \
    --no-save --logits-out "$TMP/rust.f32")"
ref="$(engine --tokens-file "$TMP/prust200.txt" --gen "$GEN" --no-remote --logits-out "$TMP/rustref.f32")"
[[ "$(field source <<<"$out")" == fetch && "$(field reused <<<"$out")" == 199 ]] ||
    { cat "$TMP/engine.err"; fail "cross-engine: the Rust-computed prefix was not reused"; }
echo "   reused 199 of 200 (Rust f32 KV stored as f16): $(python3 "$HERE/compare_runs.py" \
    "$(field gen <<<"$out")" "$TMP/rust.f32" "$(field gen <<<"$ref")" "$TMP/rustref.f32" 512)"
GGUF="$SMOL"

step "fallbacks"
out="$(engine --tokens-file "$TMP/p150.txt" --gen "$GEN" --socket "$TMP/no-such.sock")"
why="$(grep -o 'daemon unavailable.*' "$TMP/engine.err" || true)"
[[ -n "$why" ]] || fail "daemon down: no logged reason"
[[ "$(field source <<<"$out")" == prefill && "$(field gen <<<"$out")" == "$(engine --tokens-file "$TMP/p150.txt" --gen "$GEN" --no-remote | field gen)" ]] ||
    fail "daemon down: wrong fallback"
echo "   daemon down: ${why:0:150}"
expect_case "prefix absent (--no-save)" "$TMP/p256.txt" prefill 0 --no-save
grep -q "prefix not in the store" "$TMP/case.err" || fail "absent prefix: no logged reason"
kill "$STORE_PID"
wait "$STORE_PID" 2>/dev/null || true
expect_case "store down, prompt stored" "$TMP/p150.txt" prefill 0 --no-save
why="$(grep -o 'kvf-llama: .*falling back to prefill' "$TMP/case.err" | head -1 || true)"
[[ -n "$why" ]] || fail "store down: no logged reason"
echo "   store down: ${why:0:200}"
kill "$DAEMON_PID"

step "8-bit store (the daemon's default, 64-token chunks): 64 generated tokens after a fetched prefix"
start_stack q8 8 64
engine --tokens-file "$TMP/p256.txt" --gen 4 --socket "$SOCK" >/dev/null
out="$(engine --tokens-file "$TMP/p256.txt" --gen 64 --socket "$SOCK" --logits-out "$TMP/q8.f32")"
[[ "$(field source <<<"$out")" == fetch ]] || { cat "$TMP/engine.err"; fail "8-bit: no fetch"; }
ref="$(engine --tokens-file "$TMP/p256.txt" --gen 64 --no-remote --logits-out "$TMP/ref.f32")"
echo "   8-bit, reused $(field reused <<<"$out") of 256 prompt tokens: $(python3 "$HERE/compare_runs.py" \
    "$(field gen <<<"$out")" "$TMP/q8.f32" "$(field gen <<<"$ref")" "$TMP/ref.f32" 49152)"
kill "$DAEMON_PID" "$STORE_PID"

# Measured (docs/BENCHMARKS.md, same command): 8 bits mean KL 1.9e-3, top-1 0.977; 4 bits mean
# KL 0.51, top-1 0.63. The bound leaves room for other CPUs' rounding, and 4 bits must break it.
KL_BOUND=0.005
# Measured 2026-12-03 on this split: 4.85x at mean KL 3.7e-2 (target 4e-3 on the calibration
# text; 128 positions right after a 256-token prefix react most); garbage restores give KL > 1.
RANS_KL_BOUND=0.08
TOP1_BOUND=0.95
step "fidelity through llama.cpp: the default 8-bit setting within mean KL $KL_BOUND, top-1 $TOP1_BOUND"
"$KVF_BENCH" fidelity --gguf "$SMOL" --engine "$ROOT/build/llama/bin/kvf-llama" \
    --text "$ROOT/data/texts/declaration.txt" --prefix 256 --continuation 128 --bits 8,4 --gen 8 \
    --json >"$TMP/fidelity.json" 2>"$TMP/fidelity.err" || { cat "$TMP/fidelity.err"; fail "bench fidelity"; }
python3 - "$TMP/fidelity.json" "$KL_BOUND" "$TOP1_BOUND" <<'PY' || fail "fidelity outside the measured bound"
import json, sys
report = json.load(open(sys.argv[1]))
kl_bound, top1_bound = float(sys.argv[2]), float(sys.argv[3])
rows = {r["bits"]: r for r in report["results"]}
for bits, r in sorted(rows.items(), reverse=True):
    print(f"   {r['setting']}: {r['ratio_vs_16bit']:.2f}x, mean KL {r['mean_kl']:.2e}, top-1 {r['top1_agreement']:.4f}, {r['positions']} positions")
ok8 = rows[8]["mean_kl"] <= kl_bound and rows[8]["top1_agreement"] >= top1_bound
bad4 = rows[4]["mean_kl"] > kl_bound
if not ok8:
    print("   8 bits is outside the bound")
if not bad4:
    print("   4 bits is inside the bound: the check cannot tell settings apart")
sys.exit(0 if ok8 and bad4 else 1)
PY

step "transform coding with the committed SmolLM2 profile: >= 4.5x within mean KL $RANS_KL_BOUND"
"$KVF_BENCH" fidelity --gguf "$SMOL" --engine "$ROOT/build/llama/bin/kvf-llama" \
    --text "$ROOT/data/texts/declaration.txt" --prefix 256 --continuation 128 --bits 8 --gen 8 \
    --profile "$ROOT/data/smollm2-135m-instruct-q4_1.kvfp" --target-kl 0.004 \
    --json >"$TMP/fidelity-rans.json" 2>"$TMP/fidelity-rans.err" || { cat "$TMP/fidelity-rans.err"; fail "bench fidelity --profile"; }
python3 - "$TMP/fidelity-rans.json" "$RANS_KL_BOUND" <<'PY' || fail "transform coding outside the measured bound"
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
bound = float(sys.argv[2])
for r in rows:
    print(f"   {r['setting']}: {r['ratio_vs_16bit']:.2f}x, mean KL {r['mean_kl']:.2e}, top-1 {r['top1_agreement']:.4f}")
rans = [r for r in rows if r["setting"].startswith("rans")][0]
sys.exit(0 if rans["ratio_vs_16bit"] >= 4.5 and rans["mean_kl"] <= bound else 1)
PY


echo "tests/llama: all checks passed"
